"""The references fidelity tests compare against: qwen-tts itself (its public API, no mocks), and the
tolerances that separate exact streaming from a state bug.

Codes are read on their way out of ``model.generate`` (the public call decodes them to audio). qwen-tts fixes
``min_new_tokens`` at 2; tests of other values change it on its way into the talker's HF ``generate``, so
HF's own stopping rules still decide.
"""
from __future__ import annotations

import copy
import functools
from typing import Optional

import numpy as np
import torch

from tts_engine.voices.prompts import VoicePrompt

# Streamed vs one-shot, float64 decoder (the math): anything above this is a state bug.
EXACT_TOLERANCE = 1e-6
# Streamed vs one-shot, float32 decoder (the serving dtype), relative to the signal's RMS: float32 rounding
# through the awake tiny decoder reaches ~2e-5 x RMS; the smallest state bug measured is ~7e-2 x RMS.
FLOAT32_TOLERANCE = 1e-4


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


def float64_codec(speech_tokenizer_model):
    """A float64 copy of the codec whose RMSNorms compute in float64 too: qwen-tts's norm casts to float32,
    which would turn last-bit differences of float64 matrix products (thread partitioning) into float32
    steps. With it, streamed vs one-shot differ by nothing but float64 rounding."""
    model = copy.deepcopy(speech_tokenizer_model).double()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = functools.partial(_rms_norm_in_input_dtype, module)
    return model


def _rms_norm_in_input_dtype(module, hidden: torch.Tensor) -> torch.Tensor:
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return module.weight * (hidden * torch.rsqrt(variance + module.variance_epsilon))

def qwen_kwargs(params: dict) -> dict:
    """generate_voice_clone keyword arguments for the engine's sampling parameters (seed excluded)."""
    out = {}
    for name, value in params.items():
        if name in ("seed", "min_new_tokens"):
            continue
        if name == "greedy":
            out["do_sample"] = not value
            out.setdefault("subtalker_dosample", not value)
        elif name == "subtalker_greedy":
            out["subtalker_dosample"] = not value
        else:
            out[name] = value
    return out


def reference_generation(tts, prompt, text: str, language: str = "English", seed: Optional[int] = None,
                         min_new_tokens: Optional[int] = None, **generate_kwargs) -> tuple[torch.Tensor, np.ndarray]:
    """(codes [frames, 16], audio) from ``generate_voice_clone``; ``prompt`` is a VoicePrompt or a qwen-tts item."""
    item = prompt.to_item() if isinstance(prompt, VoicePrompt) else prompt
    return _captured(tts, seed, min_new_tokens, lambda: tts.generate_voice_clone(
        text=text, language=language, voice_clone_prompt=[item], **generate_kwargs))


def reference_custom_voice(tts, text: str, speaker: str, instruct: Optional[str] = None, language: str = "English",
                           seed: Optional[int] = None, **generate_kwargs) -> tuple[torch.Tensor, np.ndarray]:
    """(codes, audio) from ``generate_custom_voice`` (a CustomVoice checkpoint's named speaker)."""
    return _captured(tts, seed, None, lambda: tts.generate_custom_voice(
        text=text, speaker=speaker, language=language, instruct=instruct, **generate_kwargs))


def reference_voice_design(tts, text: str, instruct: str, language: str = "English", seed: Optional[int] = None,
                           **generate_kwargs) -> tuple[torch.Tensor, np.ndarray]:
    """(codes, audio) from ``generate_voice_design`` (a voice described in words)."""
    return _captured(tts, seed, None, lambda: tts.generate_voice_design(
        text=text, instruct=instruct, language=language, **generate_kwargs))


def _captured(tts, seed: Optional[int], min_new_tokens: Optional[int], call) -> tuple[torch.Tensor, np.ndarray]:
    """Run one qwen-tts entry point, reading its codes on their way out of ``model.generate``."""
    captured = {}
    model = tts.model
    inner_generate, inner_talker_generate = model.generate, model.talker.generate

    def spy(*args, **kwargs):
        codes_list, hidden = inner_generate(*args, **kwargs)
        captured["codes"] = codes_list[0]
        return codes_list, hidden

    def talker_generate(*args, **kwargs):
        if min_new_tokens is not None:
            kwargs["min_new_tokens"] = min_new_tokens
        captured["talker"] = result = inner_talker_generate(*args, **kwargs)
        return result

    model.generate, model.talker.generate = spy, talker_generate
    try:
        if seed is not None:
            torch.manual_seed(seed)
        wavs, _ = call()
    except RuntimeError as exc:
        # EOS as the very first token: HF generate stops with no frame, and qwen-tts then fails to stack
        # zero frames (an upstream bug its fixed min_new_tokens=2 hides). The talker's verdict stands.
        first = captured["talker"].sequences[0] if "talker" in captured else None
        if "non-empty TensorList" not in str(exc) or first is None or len(first) != 1 or \
                int(first[0]) != model.config.talker_config.codec_eos_token_id:
            raise
        return torch.zeros((0, 16), dtype=torch.long), np.zeros(0, dtype=np.float32)
    finally:
        del model.generate, model.talker.generate
    return captured["codes"].cpu(), wavs[0]
