"""Pure-logic units: the voice store, the decoder stream table, the render tool, gateway text, auth."""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import SAMPLE_RATE, synthetic_reference
from tools.render_model_repository import RenderError, render, resolve
from tts_engine.codec.streams import StreamTable
from tts_engine.errors import InvalidRequest, VoiceNotFound
from tts_engine.voices.prompts import VoicePrompt
from tts_engine.voices.store import VoiceStore, checked_voice_id


# -- voices -----------------------------------------------------------------------------------------------

def _fake_builder(calls):
    def build(audio, sample_rate, ref_text):
        calls.append((len(audio), sample_rate, ref_text))
        code = None if ref_text is None else torch.zeros((3, 16), dtype=torch.long)
        return VoicePrompt(spk_embedding=torch.full((8,), float(len(calls))), ref_code=code, ref_text=ref_text)
    return build


def _add_voice(root, voice_id, transcript=None, meta=None, seconds=3.0):
    folder = root / voice_id
    folder.mkdir(parents=True)
    sf.write(folder / "reference.wav", synthetic_reference(seconds=seconds), SAMPLE_RATE)
    if transcript is not None:
        (folder / "transcript.txt").write_text(transcript)
    if meta is not None:
        import json
        (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("voice_id", ["../etc", "a/b", "", "UPPER", "x" * 65, "dot.dot", "spa ce"])
def test_voice_ids_outside_the_pattern_are_refused(voice_id):
    """Ids that are not [a-z0-9_-]{1,64} are refused before any path is built."""
    with pytest.raises(InvalidRequest):
        checked_voice_id(voice_id)


def test_voice_prompt_is_computed_once_then_served_from_cache(tmp_path):
    """The first lookup computes and writes the prompt; later ones (even a new store) read it back."""
    _add_voice(tmp_path, "alice", transcript="Hello.", meta={"isDefault": True})
    calls = []
    store = VoiceStore(tmp_path, _fake_builder(calls), fingerprint="m1")
    assert store.get_prompt("alice")[1].ref_text == "Hello."
    store.get_prompt("alice")
    VoiceStore(tmp_path, _fake_builder(calls), fingerprint="m1").get_prompt(None)
    assert len(calls) == 1 and list((tmp_path / "alice").glob("prompt-*.safetensors"))


def test_voice_prompt_is_recomputed_when_transcript_or_model_changes(tmp_path):
    """Changing the transcript or the model fingerprint invalidates the cached prompt."""
    folder = _add_voice(tmp_path, "bob", transcript="One.")
    calls = []
    VoiceStore(tmp_path, _fake_builder(calls), fingerprint="m1").get_prompt("bob")
    (folder / "transcript.txt").write_text("Two.")
    assert VoiceStore(tmp_path, _fake_builder(calls), fingerprint="m1").get_prompt("bob")[1].ref_text == "Two."
    VoiceStore(tmp_path, _fake_builder(calls), fingerprint="m2").get_prompt("bob")
    assert len(calls) == 3


def test_voice_without_transcript_is_x_vector_only(tmp_path):
    """No transcript.txt means an x-vector-only prompt."""
    _add_voice(tmp_path, "carol")
    calls = []
    _, prompt = VoiceStore(tmp_path, _fake_builder(calls)).get_prompt("carol")
    assert prompt.x_vector_only and calls[0][2] is None


def test_voice_listing_skips_empty_slots_and_marks_the_default(tmp_path):
    """Folders without reference.wav (like the makima slot) are not listed; isDefault is reported."""
    _add_voice(tmp_path, "dora", meta={"name": "Dora", "language": "German", "isDefault": True})
    _add_voice(tmp_path, "erin")
    (tmp_path / "makima").mkdir()
    voices = VoiceStore(tmp_path).list()
    assert [(v.id, v.name, v.is_default) for v in voices] == [("dora", "Dora", True), ("erin", "erin", False)]
    with pytest.raises(VoiceNotFound):
        VoiceStore(tmp_path).get_prompt("makima")


def test_unknown_voice_raises_voice_not_found(tmp_path):
    """A well-formed id with no folder raises VoiceNotFound."""
    with pytest.raises(VoiceNotFound):
        VoiceStore(tmp_path, _fake_builder([])).get_prompt("nobody")


# -- decoder stream table ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stream_table_decoder(loaded):
    from tts_engine.codec.decoder import StreamingDecoder

    return StreamingDecoder(loaded.tts.model.speech_tokenizer.model)


def test_stream_table_frees_state_on_final_cancel_and_idle(stream_table_decoder):
    """State is held per stream and released by `final`, by cancel, and by the idle timeout."""
    table = StreamTable(stream_table_decoder, idle_timeout=10)
    codes = np.ones((2, 16), dtype=np.int32)
    for stream_id in (1, 2, 3):
        table.decode(stream_id, codes, None, final=False)
    table.decode(1, codes, None, final=True)
    assert table.cancel(2) and not table.cancel(2)
    assert len(table) == 1
    assert table.expire(now=time.monotonic() + 11) == 1 and len(table) == 0
    assert table.freed == {"final": 1, "cancelled": 1, "failed": 0, "idle": 1}


def test_a_stream_cancelled_anywhere_in_a_batch_keeps_no_decoder_state(stream_table_decoder):
    """Two chunks of one stream in one batch, the first from before the client cancelled (its request never says
    so), the second cancelled: neither is decoded and the stream holds no state; later chunks are not decoded
    either. (Decoding the first made a new state that stayed held until the idle timeout.)"""
    from tts_engine.codec.streams import DecodeItem

    table = StreamTable(stream_table_decoder, idle_timeout=60)
    codes = np.ones((2, 16), dtype=np.int32)
    table.decode(7, codes, None, final=False)  # the stream is running
    batch = [DecodeItem(7, codes), DecodeItem(7, codes), DecodeItem(8, codes)]
    decode, cancelled = table.split_cancelled(batch, [False, True, False])
    assert decode == [2] and cancelled == [7] and len(table) == 0
    assert table.split_cancelled([DecodeItem(7, codes, final=True)], [False]) == ([], [])
    assert table.freed["cancelled"] == 1


def test_a_failed_last_chunk_still_ends_its_triton_request():
    """If sending a stream's last chunk fails, the stream's end still sends the request its final response (a
    Triton request never left without one)."""
    from types import SimpleNamespace

    from triton_support.cancellation import CancellationWatcher
    from triton_support.streaming import CodesSink

    sent = []

    class Sender:
        def send(self, response=None, flags=0):
            if flags and not sent:
                sent.append("failed")
                raise RuntimeError("the parent is busy")
            sent.append(("final" if flags else "chunk", response))

    pb_utils = SimpleNamespace(Tensor=lambda name, value: (name, value), TRITONSERVER_RESPONSE_COMPLETE_FINAL=1,
                               InferenceResponse=lambda output_tensors=(), error=None: output_tensors)
    watcher = CancellationWatcher(lambda stream_id: None, interval_s=60)
    try:
        request = SimpleNamespace(get_response_sender=Sender, is_cancelled=lambda: False)
        sink = CodesSink(pb_utils, request, 7, None, watcher)
        with pytest.raises(RuntimeError):
            sink.chunk(torch.zeros((2, 16), dtype=torch.long), 0, last=True)
        sink.end(None, "eos")
    finally:
        watcher.stop()
    assert sent[0] == "failed" and [kind for kind, _ in sent[1:]] == ["final"]


def test_stream_table_refuses_bad_codes_and_late_context(stream_table_decoder):
    """Out-of-range codes, wrong shapes and context codes after the first chunk are refused."""
    table = StreamTable(stream_table_decoder)
    with pytest.raises(InvalidRequest):
        table.decode(7, np.full((1, 16), 5000, dtype=np.int32), None, False)
    with pytest.raises(InvalidRequest):
        table.decode(7, np.zeros((1, 8), dtype=np.int32), None, False)
    table.decode(8, np.zeros((1, 16), dtype=np.int32), None, False)
    with pytest.raises(InvalidRequest):
        table.decode(8, np.zeros((1, 16), dtype=np.int32), np.zeros((2, 16), dtype=np.int32), False)
    assert len(table) == 0 and table.freed["failed"] == 1  # a stream that failed holds no state
    with pytest.raises(InvalidRequest, match="context codes out of the codebook range"):
        table.decode(9, np.zeros((1, 16), dtype=np.int32), np.full((2, 16), 5000, dtype=np.int32), False)


def test_a_failed_stream_is_never_decoded_again_from_a_fresh_state(stream_table_decoder):
    """Two chunks of one stream in one batch: when the first fails, the second fails with it (decoding it
    from a fresh state would send wrong audio as if nothing happened); other streams are unaffected."""
    from tts_engine.codec.streams import DecodeItem

    table = StreamTable(stream_table_decoder)
    good = np.zeros((2, 16), dtype=np.int32)
    results = table.decode_many([DecodeItem(1, np.full((2, 16), 5000, dtype=np.int32)), DecodeItem(2, good),
                                 DecodeItem(1, good, final=True)])
    assert isinstance(results[0], InvalidRequest) and results[2] is results[0]
    assert isinstance(results[1], np.ndarray) and len(table) == 1


# -- render tool -------------------------------------------------------------------------------------------

def test_gpu_profile_renders_gpu_kinds_and_single_decoder(tmp_path):
    """The GPU profile renders KIND_GPU, bf16 and cuda; talker and codec_decoder have exactly one instance."""
    values = resolve("gpu", {"MODEL_DIR": "/models/qwen", "VOICE_ENCODER_INSTANCES": "2"}, environ={})
    repo = render(tmp_path / "repo", values)
    talker = (repo / "talker" / "config.pbtxt").read_text()
    assert "count: 1 kind: KIND_GPU" in talker and '"bf16"' in talker and '"cuda"' in talker
    assert "count: 2 kind: KIND_GPU" in (repo / "voice_encoder" / "config.pbtxt").read_text()
    assert "count: 1 kind: KIND_GPU" in (repo / "codec_decoder" / "config.pbtxt").read_text()
    assert (repo / "tts" / "1").is_dir() and (repo / "talker" / "1" / "model.py").is_file()
    assert "${" not in "".join(p.read_text() for p in repo.rglob("config.pbtxt"))


@pytest.mark.parametrize("overrides, message", [
    ({}, "MODEL_DIR is empty"),
    ({"MODEL_DIR": "/m", "KIND": "KIND_TPU"}, "KIND"),
    ({"MODEL_DIR": "/m", "VOICE_ENCODER_INSTANCES": "0"}, "positive integer"),
    ({"MODEL_DIR": "/m", "NOPE": "1"}, "unknown parameter"),
    ({"MODEL_DIR": "/m", "SERVED_NAME": "Qwen3-TTS"}, "SERVED_NAME: invalid model name"),
])
def test_render_refuses_bad_values(overrides, message):
    """Missing model dir, bad kinds, bad counts, unknown names and a served name a gateway would refuse are refused
    with a clear message."""
    with pytest.raises(RenderError, match=message):
        resolve("cpu", overrides, environ={})


def _config(repo, model: str) -> str:
    return (repo / model / "config.pbtxt").read_text()


def test_several_models_render_a_talker_and_an_ensemble_each(tmp_path, tiny_model_dir, tiny_custom_voice_dir,
                                                             tiny_voice_design_dir):
    """MODELS renders talker/tts for the first model and talker_<name>/tts_<name> for the others, each talker with
    its directory and served name, each ensemble over its own talker; codec_decoder cancels on every talker and
    voice_encoder loads the Base checkpoint, wherever it is in the list."""
    values = resolve("cpu", {"MODELS": f"custom={tiny_custom_voice_dir}, base={tiny_model_dir},"
                                       f"design={tiny_voice_design_dir}"}, environ={})
    repo = render(tmp_path / "repo", values)
    assert sorted(p.name for p in repo.iterdir()) == ["codec_decoder", "talker", "talker_base", "talker_design",
                                                      "tts", "tts_base", "tts_design", "voice_encoder"]
    for talker, tts, name, model_dir in (("talker", "tts", "custom", tiny_custom_voice_dir),
                                         ("talker_base", "tts_base", "base", tiny_model_dir),
                                         ("talker_design", "tts_design", "design", tiny_voice_design_dir)):
        config = _config(repo, talker)
        assert f'name: "{talker}"' in config and f'"model_dir" value {{ string_value: "{model_dir}" }}' in config
        assert f'"served_name" value {{ string_value: "{name}" }}' in config
        assert f'"tts_model" value {{ string_value: "{tts}" }}' in config
        ensemble = _config(repo, tts)
        assert f'name: "{tts}"' in ensemble and f'model_name: "{talker}"' in ensemble
        assert (repo / talker / "1" / "model.py").is_file() and (repo / tts / "1").is_dir()
    assert '"talkers" value { string_value: "talker,talker_base,talker_design" }' in _config(repo, "codec_decoder")
    for shared in ("codec_decoder", "voice_encoder"):
        assert f'"model_dir" value {{ string_value: "{tiny_model_dir}" }}' in _config(repo, shared)
    assert "${" not in "".join(p.read_text() for p in repo.rglob("config.pbtxt"))


def test_without_a_base_model_no_voice_encoder_is_rendered(tmp_path, tiny_custom_voice_dir, tiny_voice_design_dir):
    """No Base checkpoint among the models: no voice_encoder (nothing clones); the codec decoder loads the first."""
    values = resolve("cpu", {"MODELS": f"custom={tiny_custom_voice_dir},design={tiny_voice_design_dir}"}, environ={})
    repo = render(tmp_path / "repo", values)
    assert not (repo / "voice_encoder").exists()
    assert f'string_value: "{tiny_custom_voice_dir}"' in _config(repo, "codec_decoder")


def test_one_model_dir_renders_as_before(tmp_path):
    """A single MODEL_DIR renders `talker` and `tts` (served name empty: derived by the talker), a voice_encoder
    (its kind unreadable here counts as Base), and a codec_decoder that cancels on `talker`."""
    repo = render(tmp_path / "repo", resolve("cpu", {"MODEL_DIR": "/m"}, environ={}))
    assert sorted(p.name for p in repo.iterdir()) == ["codec_decoder", "talker", "tts", "voice_encoder"]
    assert '"served_name" value { string_value: "" }' in _config(repo, "talker")
    assert 'name: "tts"' in _config(repo, "tts") and 'model_name: "talker"' in _config(repo, "tts")
    assert '"talkers" value { string_value: "talker" }' in _config(repo, "codec_decoder")


@pytest.mark.parametrize("models, message", [
    ("a=/x,a=/y", "the name 'a' is given twice"),
    ("Big=/x", "invalid model name 'Big'"),
    ("a=/x,b", "'b' is not name=dir"),
    ("a=", "'a=' is not name=dir"),
    (" , ", "MODELS names no model"),
])
def test_bad_models_are_refused(models, message):
    """Duplicate or invalid names and entries without a directory are refused, saying which."""
    with pytest.raises(RenderError, match=message):
        resolve("cpu", {"MODELS": models}, environ={})


def test_models_and_served_name_together_are_refused():
    """SERVED_NAME names the one MODEL_DIR model: beside MODELS it is refused (MODELS names each model)."""
    with pytest.raises(RenderError, match="with MODELS, name each model there"):
        resolve("cpu", {"MODELS": "a=/x", "SERVED_NAME": "b"}, environ={})


def test_the_render_command_lists_models_and_prints_what_it_serves(tmp_path, capsys, tiny_model_dir,
                                                                   tiny_custom_voice_dir):
    """--list documents MODELS; a render prints each model's served name, Triton names and kind."""
    from tools.render_model_repository import main

    assert main(["--list"]) == 0
    assert "MODELS" in capsys.readouterr().out
    models = f"MODELS=base={tiny_model_dir},custom={tiny_custom_voice_dir}"
    assert main(["--out", str(tmp_path / "repo"), "--set", models]) == 0
    out = capsys.readouterr().out
    assert re.search(r"base +Triton tts/talker +base .*\(default\)", out)
    assert re.search(r"custom +Triton tts_custom/talker_custom +custom_voice", out)


@pytest.mark.parametrize("message, code, text", [
    ("in ensemble 'tts', [VOICE_NOT_FOUND] voice 'x' not found", "VOICE_NOT_FOUND", "voice 'x' not found"),
    ("[StatusCode.INTERNAL] [INTERNAL] [INVALID_TEXT] text is empty", "INVALID_TEXT", "text is empty"),
    ("Socket closed", "SYNTHESIS_ERROR", "Socket closed"),
])
def test_engine_error_codes_survive_triton_prefixes(message, code, text):
    """The first known [CODE] in a Triton error message is the code; what follows is the text."""
    from tts_contract.errors import parse_wire

    assert parse_wire(message) == (code, text)


def test_tiny_model_build_is_deterministic(tiny_model_dir, tmp_path):
    """Building the tiny model twice gives byte-identical weights and tokenizer."""
    from tts_engine.tiny_model import build_tiny_model

    again = build_tiny_model(tmp_path / "tiny")
    for name in ("model.safetensors", "speech_tokenizer/model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


# -- incremental text ---------------------------------------------------------------------------------------

async def test_buffered_text_waits_until_appends_pause_for_the_idle_time():
    """The idle flush counts from the last append: words arriving every 0.1 s are never cut mid-sentence."""
    import asyncio

    from gateway.text import SentenceFeed

    feed = SentenceFeed(idle_s=0.3)
    sentence = asyncio.create_task(feed.next())
    words = "a slow writer takes its time with this sentence".split()
    for word in words:
        feed.append(word + " ")
        await asyncio.sleep(0.1)
        assert not sentence.done()
    assert await asyncio.wait_for(sentence, 2) == " ".join(words)


async def test_a_fragment_after_blank_text_is_flushed_when_idle():
    """Text that arrives after a blank append (an LLM's newlines) is still spoken after the idle time."""
    import asyncio

    from gateway.text import SentenceFeed

    feed = SentenceFeed(idle_s=0.2)
    feed.append("Hello there.\n")
    assert await feed.next() == "Hello there."
    feed.append("\n\n")
    waiting = asyncio.create_task(feed.next())
    await asyncio.sleep(0.05)
    feed.append("And then")
    assert await asyncio.wait_for(waiting, 2) == "And then"


def test_a_long_text_without_sentence_ends_is_split_between_words():
    """Past the sentence limit with no sentence end, buffered text is cut at its last break: no word is split,
    and the unfinished last word waits for more text."""
    from gateway.text import SentenceFeed

    feed = SentenceFeed(max_sentence_chars=400)
    feed.append("x" * 390 + " aa  bb   cc")
    assert feed.take_ready().endswith(" aa  bb") and feed.take_ready() is None
    feed.append("c done.")
    feed.close()
    assert feed.take_ready() == "ccc done."


# -- continuous text: segments ------------------------------------------------------------------------------

async def _segments(text: "WrittenText") -> list[str]:
    """Every segment's text as a stream would receive it (opening text, then pieces)."""
    out, start = [], 0
    while True:
        segment = text.segment(start)
        received = segment.text
        async for piece, _ in segment.pieces(len(received)):
            received += piece
        out.append(received)
        if segment.last:
            return out
        start = segment.end


async def test_a_long_continuous_text_is_cut_at_sentence_ends_past_the_segment_length():
    """Each stream's text ends at the first sentence end past segment_chars; together they are the whole text."""
    from gateway.text import WrittenText

    sentences = [f"Sentence number {n} says a few words." for n in range(12)]
    text = WrittenText(segment_chars=100, hard_chars=2000)
    text.append(" ".join(sentences))
    text.close()
    segments = await _segments(text)
    assert "".join(segments) == " ".join(sentences) and len(segments) > 2
    for segment in segments[:-1]:
        assert len(segment) > 100 and segment.rstrip().endswith(".")


async def test_a_continuous_text_without_sentence_ends_is_cut_at_a_space_before_the_talker_limit():
    """No sentence end at all: segments end at a space and never exceed hard_chars."""
    from gateway.text import WrittenText

    words = " ".join(f"word{n}" for n in range(200))
    text = WrittenText(segment_chars=100, hard_chars=300)
    text.append(words)
    text.close()
    segments = await _segments(text)
    assert "".join(segments) == words and all(len(s) <= 300 for s in segments)
    assert all(s.endswith(" ") for s in segments[:-1])


# -- auth ------------------------------------------------------------------------------------------------------

def test_a_jwks_file_with_an_unusable_key_still_serves_its_good_keys(tmp_path):
    """A JWKS holding a key the gateway cannot use (unknown type, a curve that does not fit its algorithm) skips
    that key and verifies tokens signed with the others."""
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    from gateway.auth import Authenticator, AuthSettings

    good, wrong_curve = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1())
    keys = [{"kty": "X9", "kid": "strange"},
            {**json.loads(ECAlgorithm.to_jwk(wrong_curve.public_key())), "kid": "mislabelled", "alg": "ES256"},
            {**json.loads(ECAlgorithm.to_jwk(good.public_key())), "kid": "good"}]
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": keys}))
    auth = Authenticator(AuthSettings(jwks_file=str(tmp_path / "jwks.json")))
    signed = jwt.encode({"sub": "s", "exp": time.time() + 60}, good, algorithm="ES256", headers={"kid": "good"})
    assert auth.verify(signed).subject == "s" and list(auth._keys) == ["good"]


def test_opaque_tokens_are_not_limited_per_subject_but_jwt_subjects_are():
    """The per-subject limit holds a JWT subject to its count; an opaque (shared) token is never limited."""
    from gateway.auth import Identity, SubjectSessions

    sessions = SubjectSessions(limit=1)
    alice, shared = Identity("alice", time.time() + 60), Identity("token:abc", shared=True)
    assert sessions.try_open(alice) and not sessions.try_open(alice)
    assert all(sessions.try_open(shared) for _ in range(5))
    sessions.close(alice)
    assert sessions.try_open(alice)
