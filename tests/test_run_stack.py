"""`make run`'s supervisor (tools.run_stack): how soon it restarts a process that died."""
from __future__ import annotations

from tools.run_stack import Restarts


def test_a_first_exit_restarts_at_once_and_repeated_exits_back_off(capsys):
    """The first exit restarts at once; exits that follow within a minute wait 1, 2, 4 ... up to 30 s."""
    restarts = Restarts("tritonserver")
    delays = [restarts.after_exit(-9, "log") for _ in range(8)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert "restarting it now" in capsys.readouterr().err


def test_a_minute_of_running_resets_the_backoff():
    """A process that ran for over a minute before dying is restarted at once again."""
    restarts = Restarts("tritonserver")
    restarts.after_exit(-9, "log")
    restarts.after_exit(-9, "log")
    restarts.started -= 61  # as if restarted over a minute ago
    assert restarts.after_exit(-9, "log") == 0.0


def _models(values) -> list:
    from tools.render_model_repository import served_models

    return [(m.name, m.kind, m.tts_model) for m in served_models(values)]


def test_make_run_without_weights_serves_the_three_tiny_models(monkeypatch, tiny_model_dir, tiny_custom_voice_dir,
                                                              tiny_voice_design_dir):
    """With no model configured, `make run` serves the tiny Base model as the default plus the tiny CustomVoice and
    VoiceDesign models, named as the real checkpoints would be."""
    from tools import run_stack

    for name in ("QWEN_TTS_MODEL_DIR", "QWEN_TTS_MODELS", "QWEN_TTS_PROFILE", "QWEN_TTS_SERVED_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QWEN_TTS_ALIGNER_DIR", "")
    assert _models(run_stack._values()) == [
        ("qwen3-tts-0.6b-base", "base", "tts"),
        ("qwen3-tts-1.7b-custom-voice", "custom_voice", "tts_qwen3-tts-1.7b-custom-voice"),
        ("qwen3-tts-1.7b-voice-design", "voice_design", "tts_qwen3-tts-1.7b-voice-design")]


def test_make_run_serves_qwen_tts_models_else_the_one_model_dir(monkeypatch, tiny_model_dir, tiny_custom_voice_dir):
    """QWEN_TTS_MODEL_DIR alone serves one model as `tts`; QWEN_TTS_MODELS, when set, wins."""
    from tools import run_stack

    for name in ("QWEN_TTS_MODELS", "QWEN_TTS_PROFILE", "QWEN_TTS_SERVED_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QWEN_TTS_ALIGNER_DIR", "")
    monkeypatch.setenv("QWEN_TTS_MODEL_DIR", str(tiny_model_dir))
    assert _models(run_stack._values()) == [("", "base", "tts")]
    monkeypatch.setenv("QWEN_TTS_MODELS", f"clone={tiny_model_dir},speakers={tiny_custom_voice_dir}")
    assert _models(run_stack._values()) == [("clone", "base", "tts"), ("speakers", "custom_voice", "tts_speakers")]
