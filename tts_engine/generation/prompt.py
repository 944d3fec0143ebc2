"""The talker's prompt, built by qwen-tts itself: its ``generate`` runs until it would hand over to HF
``generate``, which is intercepted, so every embedding is exactly upstream's."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from tts_contract.languages import UnknownLanguage, normalise_language

from ..errors import InvalidText, UnsupportedLanguage
from ..voices.prompts import VoicePrompt
from .sampling import SamplingParams
from .text_feed import ROLE_IDS, TURN_SUFFIX, TextFeed


@dataclass
class SynthesisRequest:
    """What to say, in which voice and language, sampled how. The voice is one of: a cloned voice's ``prompt``
    (Base models), a named ``speaker`` (CustomVoice), or neither (VoiceDesign: ``instruct`` describes it);
    ``instruct``: a style instruction or a voice's description, for the models that follow one
    (tts_contract.models). ``feed``: text that is still arriving (``text`` is then what has arrived so far); None
    when ``text`` is all of it."""

    text: str
    prompt: Optional[VoicePrompt]
    language: str = "auto"
    params: SamplingParams = field(default_factory=SamplingParams)
    feed: Optional[TextFeed] = None
    speaker: Optional[str] = None
    instruct: Optional[str] = None
    # qwen-tts's switch: the whole text in the prompt (True) or read one token per frame (False). None: its
    # default for the entry point of this kind (generate_voice_clone: False; generate_custom_voice and
    # generate_voice_design: True). Text still being written is always read as it comes.
    non_streaming_mode: Optional[bool] = None

    @property
    def text_in_prompt(self) -> bool:
        if self.feed is not None:
            return False
        return self.prompt is None if self.non_streaming_mode is None else self.non_streaming_mode

    @property
    def text_open(self) -> bool:
        return self.feed is not None and not self.feed.closed

    @property
    def icl(self) -> bool:
        """Whether its prompt holds a reference clip's frames and transcript (an ICL cloned voice)."""
        return self.prompt is not None and not self.prompt.x_vector_only

    @property
    def reference_codes(self):
        """The reference frames the codec decoder must see before this stream's codes (None: none)."""
        return self.prompt.ref_code if self.prompt is not None else None


class _PromptCaptured(Exception):
    def __init__(self, kwargs: dict):
        super().__init__("prompt captured")
        self.kwargs = kwargs


class _TalkerView:
    """The real talker, except that ``generate`` hands back its arguments instead of running."""

    def __init__(self, talker):
        self._talker = talker

    def __getattr__(self, name):
        return getattr(self._talker, name)

    def generate(self, **kwargs):
        raise _PromptCaptured(kwargs)


class _ModelView:
    def __init__(self, model):
        self._model = model
        self.talker = _TalkerView(model.talker)

    def __getattr__(self, name):
        return getattr(self._model, name)


def build_talker_inputs(tts, request: SynthesisRequest) -> dict:
    """Run qwen-tts's own prompt construction and return what it would pass to the talker's generate."""
    text = request.feed.text if request.feed is not None else request.text
    if not text or not text.strip():
        raise InvalidText("text is empty")
    try:
        language = normalise_language(request.language).lower()  # the model's spelling
    except UnknownLanguage as exc:
        raise UnsupportedLanguage(str(exc)) from None
    fed = _turn_ids(tts, request.feed) if request.feed is not None else None
    input_ids = [fed[0]] if fed is not None else tts._tokenize_texts([tts._build_assistant_text(text)])
    conditioning = {}
    if request.prompt is not None:  # generate_voice_clone's arguments
        conditioning["voice_clone_prompt"] = tts._prompt_items_to_voice_clone_prompt([request.prompt.to_item()])
        conditioning["ref_ids"] = [request.prompt.ref_text_ids(tts)]
    else:  # generate_custom_voice's (a speaker) or generate_voice_design's (none)
        conditioning["speakers"] = [request.speaker]
    if request.instruct:  # as those two tokenise it; an empty instruction is none
        conditioning["instruct_ids"] = [tts._tokenize_texts([tts._build_instruct_text(request.instruct)])[0]]
    model = tts.model
    try:  # sampling options do not shape the prompt; the engine applies them itself
        type(model).generate(_ModelView(model), input_ids=input_ids, languages=[language],
                             non_streaming_mode=request.text_in_prompt, **conditioning)
    except _PromptCaptured as captured:
        if fed is not None:  # how many of the feed's ids this prompt holds, and whether that was all of them
            captured.kwargs["fed_ids"], captured.kwargs["text_open"] = fed[1], fed[2]
        return captured.kwargs
    raise RuntimeError("qwen-tts generate did not reach the talker")  # pragma: no cover


def _turn_ids(tts, feed: TextFeed) -> tuple[torch.Tensor, int, bool]:
    """The turn's ids for a fed text: what is committed, and (while open) the turn's end after it, so that
    qwen-tts's construction reads role, first text id and end where it expects them; with how many of the
    feed's ids that is and whether the text was still open (read together: text may arrive meanwhile)."""
    ids, closed = feed.snapshot()
    if len(ids) <= ROLE_IDS:
        raise InvalidText("no text id is committed yet")
    used = len(ids)
    if not closed:
        ids = ids + tts.processor.tokenizer(TURN_SUFFIX, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long, device=tts.device), used, not closed
