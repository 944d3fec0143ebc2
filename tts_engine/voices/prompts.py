"""Voice prompts: built from reference audio (+ transcript), serialised to safetensors and back."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from tts_contract.limits import MAX_REFERENCE_SECONDS, MAX_TRANSCRIPT_CHARS, MIN_REFERENCE_SECONDS
from tts_contract.voices import PROMPT_FORMAT, UndecodableAudio, prompt_metadata, read_audio

from ..errors import InvalidAudio, InvalidRequest


@dataclass
class VoicePrompt:
    """What the talker is conditioned on: speaker embedding, and for ICL mode the reference codes and text."""

    spk_embedding: "object"  # torch.Tensor [hidden]
    ref_code: Optional["object"] = None  # torch.LongTensor [frames, 16]; None in x-vector-only mode
    ref_text: Optional[str] = None
    _ref_text_ids: Optional["object"] = field(default=None, repr=False, compare=False)

    def ref_text_ids(self, tts):
        """The transcript tokenised as qwen-tts does it, once per prompt (not once per request)."""
        if self.ref_text and self._ref_text_ids is None:
            self._ref_text_ids = tts._tokenize_texts([tts._build_ref_text(self.ref_text)])[0]
        return self._ref_text_ids

    @property
    def x_vector_only(self) -> bool:
        return self.ref_code is None

    def to_item(self):
        """The qwen-tts ``VoiceClonePromptItem`` equivalent of this prompt."""
        from qwen_tts import VoiceClonePromptItem

        return VoiceClonePromptItem(ref_code=self.ref_code, ref_spk_embedding=self.spk_embedding,
                                    x_vector_only_mode=self.x_vector_only, icl_mode=not self.x_vector_only,
                                    ref_text=self.ref_text)

    def to_bytes(self, metadata: Optional[dict] = None) -> bytes:
        from safetensors.torch import save

        tensors = {"spk_embedding": self.spk_embedding.detach().float().cpu().contiguous()}
        if self.ref_code is not None:
            tensors["ref_code"] = self.ref_code.detach().to(dtype=_int64()).cpu().contiguous()
        meta = {"format": PROMPT_FORMAT, "mode": "xvector" if self.x_vector_only else "icl",
                "ref_text": json.dumps(self.ref_text)}
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple["VoicePrompt", dict]:
        from safetensors.torch import load

        tensors = load(data)
        meta = prompt_metadata(data)
        if meta.get("format") != PROMPT_FORMAT:
            raise ValueError(f"not a voice prompt (format {meta.get('format')!r})")
        prompt = cls(spk_embedding=tensors["spk_embedding"], ref_code=tensors.get("ref_code"),
                     ref_text=json.loads(meta.get("ref_text", "null")))
        return prompt, meta

    def save(self, path: Path, metadata: Optional[dict] = None) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(self.to_bytes(metadata))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> tuple["VoicePrompt", dict]:
        return cls.from_bytes(path.read_bytes())


def _int64():
    import torch

    return torch.int64


def check_reference_audio(audio: np.ndarray, sample_rate: int, min_seconds: float = MIN_REFERENCE_SECONDS,
                          max_seconds: float = MAX_REFERENCE_SECONDS) -> np.ndarray:
    """Return mono float32 audio, or raise InvalidAudio saying what is wrong with it."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1 if audio.shape[1] <= 8 else 0)
    if audio.ndim != 1:
        raise InvalidAudio(f"reference audio must be mono or [samples, channels], got shape {audio.shape}")
    if not 8000 <= int(sample_rate) <= 192000:
        raise InvalidAudio(f"sample rate {sample_rate} Hz is outside 8000..192000 Hz")
    seconds = audio.shape[0] / float(sample_rate)
    if seconds < min_seconds:
        raise InvalidAudio(f"reference audio is {seconds:.2f} s; at least {min_seconds:g} s is needed")
    if seconds > max_seconds:
        raise InvalidAudio(f"reference audio is {seconds:.2f} s; at most {max_seconds:g} s is allowed")
    if not np.isfinite(audio).all():
        raise InvalidAudio("reference audio contains NaN or infinite samples")
    if float(np.abs(audio).max(initial=0.0)) < 1e-4:
        raise InvalidAudio("reference audio is silent")
    return audio


def check_transcript(ref_text: Optional[str]) -> Optional[str]:
    """The stripped transcript (None when empty: x-vector only), or InvalidRequest when it is too long."""
    ref_text = (ref_text or "").strip() or None
    if ref_text is not None and len(ref_text) > MAX_TRANSCRIPT_CHARS:
        raise InvalidRequest(f"the transcript has {len(ref_text)} characters; the limit is {MAX_TRANSCRIPT_CHARS}")
    return ref_text


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode an audio file (WAV, FLAC, OGG...) from bytes to mono float32."""
    try:
        return read_audio(data)
    except UndecodableAudio as exc:
        raise InvalidAudio(str(exc)) from None


def build_prompt(tts, audio: np.ndarray, sample_rate: int, ref_text: Optional[str]) -> VoicePrompt:
    """Compute a voice prompt with the model's speech tokenizer and speaker encoder (ICL when text is given)."""
    import torch

    audio = check_reference_audio(audio, sample_rate)
    ref_text = check_transcript(ref_text)
    with torch.inference_mode():
        items = tts.create_voice_clone_prompt(ref_audio=(audio, int(sample_rate)), ref_text=ref_text,
                                              x_vector_only_mode=ref_text is None)
    item = items[0]
    ref_code = None if item.ref_code is None else item.ref_code.detach().to(torch.int64).cpu()
    return VoicePrompt(spk_embedding=item.ref_spk_embedding.detach().float().cpu(), ref_code=ref_code,
                       ref_text=item.ref_text if ref_code is not None else None)


def reference_codes(speech_tokenizer, audio: np.ndarray, sample_rate: int):
    """A reference clip's codec frames [frames, 16], computed as ``create_voice_clone_prompt`` does (the codec
    decoder primes its state for the default voice with them at start-up)."""
    import torch

    audio = check_reference_audio(audio, sample_rate)
    with torch.inference_mode():
        codes = speech_tokenizer.encode([audio], sr=int(sample_rate)).audio_codes[0]
    return codes.detach().to(torch.int64).cpu()
