"""What a request's ``voice`` and ``instruct`` mean for the checkpoint being served: a cloned voice's prompt
(Base), a named speaker (CustomVoice) or a described voice (VoiceDesign); anything the checkpoint cannot follow
is refused with the contract's reason (tts_contract.models)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tts_contract.models import BASE, CUSTOM_VOICE, ServedModel, conditioning_error

from ..errors import Unfollowable, VoiceNotFound
from .prompts import VoicePrompt
from .store import VoiceStore


@dataclass(frozen=True)
class Voicing:
    """What the talker is conditioned on for one request (SynthesisRequest's prompt, speaker and instruct)."""

    prompt: Optional[VoicePrompt] = None
    speaker: Optional[str] = None
    instruct: Optional[str] = None


class Conditioning:
    """Resolves requests for one served checkpoint; ``voices``: the cloned voices (Base models only)."""

    def __init__(self, model: ServedModel, voices: Optional[VoiceStore] = None):
        if model.kind == BASE and voices is None:
            raise ValueError("a Base model needs its voices")
        if model.kind == CUSTOM_VOICE and not model.speakers:
            raise ValueError(f"CustomVoice model '{model.name}' lists no speakers")
        self.model, self.voices = model, voices

    def default_voice(self) -> Optional[str]:
        """The voice a request without one gets: the default cloned voice or speaker (None: a described voice)."""
        if self.model.kind == BASE:
            return self.voices.default_id()
        return self.model.default_speaker()

    def resolve(self, voice: Optional[str], instruct: Optional[str]) -> Voicing:
        """The conditioning for ``voice`` (None: the default) and ``instruct``; Unfollowable or VoiceNotFound
        say why a request cannot have it."""
        refusal = conditioning_error(self.model, voice, instruct)
        if refusal is not None:
            raise Unfollowable(refusal.code, refusal.message)
        voice = (voice or "").strip() or None
        instruct = instruct if instruct and instruct.strip() else None  # as written: qwen-tts tokenises it so
        if self.model.kind == BASE:
            return Voicing(prompt=self.voices.get_prompt(voice)[1])
        if self.model.kind == CUSTOM_VOICE:
            name = voice or self.default_voice()
            speaker = self.model.speaker(name)
            if speaker is None:  # a configured default that the checkpoint lacks
                raise VoiceNotFound(f"model '{self.model.name}' has no speaker '{name}'")
            return Voicing(speaker=speaker.name, instruct=instruct)
        return Voicing(instruct=instruct)
