"""Incremental codec-frame generation for one utterance, exactly equal to qwen-tts ``generate``.

The prompt embeddings are built by qwen-tts itself (its ``generate`` runs up to the point where it would
hand over to HF ``generate``); the decoding loop is ours, so that it can yield frame by frame, check for
cancellation between steps, use a per-request RNG, and keep no state on the shared model object (the
upstream talker stores ``rope_deltas`` on the module, which breaks concurrent streams).
"""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import Cancelled, InvalidText, UnsupportedLanguage
from .prompts import VoicePrompt
from .sampling import SamplingParams

log = logging.getLogger(__name__)
NUM_CODE_GROUPS = 16


@dataclass
class SynthesisRequest:
    text: str
    prompt: VoicePrompt
    language: str = "auto"
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class ChunkSchedule:
    """How many frames go into each streamed chunk: small first chunks for latency, then larger ones."""

    sizes: tuple[int, ...] = (2, 4, 8, 16)

    def size(self, chunk_index: int) -> int:
        return self.sizes[min(chunk_index, len(self.sizes) - 1)]

    @classmethod
    def parse(cls, text: str) -> "ChunkSchedule":
        """Parse ``"2,4,8,16"``: chunk i has sizes[i] frames, the last size repeats."""
        try:
            sizes = tuple(int(part) for part in str(text).split(",") if part.strip())
        except ValueError:
            raise ValueError(f"chunk schedule {text!r} must be comma-separated integers") from None
        if not sizes or any(not 1 <= s <= 512 for s in sizes):
            raise ValueError(f"chunk schedule {text!r}: every size must be within 1..512")
        return cls(sizes)


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


def normalise_language(tts, language: Optional[str]) -> str:
    """Map a language name (any case; empty means auto) to the model's spelling, or raise."""
    name = (language or "auto").strip().lower()
    supported = [lang.lower() for lang in tts.model.get_supported_languages()]
    if name not in supported:
        pretty = ", ".join(lang.capitalize() for lang in supported)
        raise UnsupportedLanguage(f"unsupported language '{language}'; supported: {pretty}")
    return name


def build_talker_inputs(tts, request: SynthesisRequest) -> dict:
    """Run qwen-tts's own prompt construction and return what it would pass to the talker's generate."""
    text = request.text
    if not text or not text.strip():
        raise InvalidText("text is empty")
    language = normalise_language(tts, request.language)
    item = request.prompt.to_item()
    prompt_dict = tts._prompt_items_to_voice_clone_prompt([item])
    input_ids = tts._tokenize_texts([tts._build_assistant_text(text)])
    ref_ids = None
    if item.ref_text:
        ref_ids = [tts._tokenize_texts([tts._build_ref_text(item.ref_text)])[0]]
    else:
        ref_ids = [None]
    params = request.params
    gen_kwargs = tts._merge_generate_kwargs(
        do_sample=params.do_sample, top_k=params.top_k, top_p=params.top_p, temperature=params.temperature,
        repetition_penalty=params.repetition_penalty, subtalker_dosample=params.subtalker_do_sample,
        subtalker_top_k=params.subtalker_top_k, subtalker_top_p=params.subtalker_top_p,
        subtalker_temperature=params.subtalker_temperature, max_new_tokens=params.max_new_tokens)
    model = tts.model
    try:
        type(model).generate(_ModelView(model), input_ids=input_ids, ref_ids=ref_ids,
                             voice_clone_prompt=prompt_dict, languages=[language], non_streaming_mode=False,
                             **gen_kwargs)
    except _PromptCaptured as captured:
        return captured.kwargs
    raise RuntimeError("qwen-tts generate did not reach the talker")  # pragma: no cover


def _new_generator(device: torch.device, seed: Optional[int]) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


def _warpers(temperature: float, top_k: int, top_p: float) -> list:
    """The warpers HF ``generate`` adds for sampling, in its order and under its conditions."""
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers


def _choose(scores: torch.Tensor, history: torch.Tensor, processors: list, do_sample: bool,
            generator: torch.Generator) -> torch.Tensor:
    for processor in processors:
        scores = processor(history, scores)
    if not do_sample:
        return torch.argmax(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


class TalkerStream:
    """One utterance being generated: ``step()`` returns the next [16] frame, or None when finished."""

    def __init__(self, tts, request: SynthesisRequest):
        self.request = request
        self.params = request.params
        model = tts.model
        self.talker = model.talker
        self.predictor = model.talker.code_predictor
        self.device = self.talker.device
        inputs = build_talker_inputs(tts, request)
        self._inputs_embeds = inputs["inputs_embeds"]
        self._trailing_text = inputs["trailing_text_hidden"]
        self._tts_pad_embed = inputs["tts_pad_embed"]
        self.eos_token_id = int(inputs["eos_token_id"])
        self.max_new_tokens = int(inputs["max_new_tokens"])
        params = self.params
        # Same logits processors as qwen-tts passes to HF generate for the talker (code 0).
        self._processors = []
        if params.repetition_penalty != 1.0:
            self._processors.append(RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty))
        self._processors.append(MinNewTokensLengthLogitsProcessor(
            prompt_length_to_skip=0, min_new_tokens=int(inputs["min_new_tokens"]), eos_token_id=self.eos_token_id,
            device=self.device))
        self._processors.append(SuppressTokensLogitsProcessor(inputs["suppress_tokens"], device=self.device))
        if params.do_sample:
            self._processors += _warpers(params.temperature, params.top_k, params.top_p)
        self._sub_warpers = _warpers(params.subtalker_temperature, params.subtalker_top_k,
                                     params.subtalker_top_p) if params.subtalker_do_sample else []
        self.generator = _new_generator(self.device, params.seed)
        self._cache = DynamicCache(config=self.talker.config)
        self._history = torch.zeros((1, 0), dtype=torch.long, device=self.device)  # sampled code-0 tokens
        self._next_token: Optional[torch.Tensor] = None
        self._past_hidden: Optional[torch.Tensor] = None
        self._seq_len = 0
        self.frames = 0
        self.finished = False
        self.finish_reason: Optional[str] = None

    @property
    def prompt_frames(self) -> int:
        return int(self._inputs_embeds.shape[1])

    def _forward(self, embeds: torch.Tensor) -> torch.Tensor:
        new = embeds.shape[1]
        positions = torch.arange(self._seq_len, self._seq_len + new, device=self.device)
        out = self.talker.model(
            inputs_embeds=embeds,
            attention_mask=torch.ones((1, self._seq_len + new), dtype=torch.long, device=self.device),
            position_ids=positions.view(1, 1, -1).expand(3, 1, -1),
            past_key_values=self._cache,
            cache_position=positions,
            use_cache=True,
        )
        self._seq_len += new
        hidden = out.last_hidden_state
        self._past_hidden = hidden[:, -1:, :]
        return self.talker.codec_head(hidden)[:, -1, :].to(dtype=torch.float32)

    def _sample_code0(self, scores: torch.Tensor) -> None:
        token = _choose(scores, self._history, self._processors, self.params.do_sample, self.generator)
        self._history = torch.cat([self._history, token[:, None]], dim=-1)
        self._next_token = token
        if int(token) == self.eos_token_id:
            self._finish("eos")
        elif self._history.shape[1] >= self.max_new_tokens:
            # HF stops once max_new_tokens are sampled; the last one never becomes a frame.
            self._finish("max_new_tokens")

    def _predict_subcodes(self, last_id_hidden: torch.Tensor) -> torch.Tensor:
        """Codes 1..15 for the current frame: the code predictor's own small autoregressive loop."""
        predictor = self.predictor
        embeds = predictor.small_to_mtp_projection(torch.cat((self._past_hidden, last_id_hidden), dim=1))
        cache = DynamicCache(config=predictor.config)
        seq_len = 0
        codes = []
        history = torch.zeros((1, 0), dtype=torch.long, device=self.device)
        do_sample = self.params.subtalker_do_sample
        for group in range(NUM_CODE_GROUPS - 1):
            new = embeds.shape[1]
            positions = torch.arange(seq_len, seq_len + new, device=self.device)
            out = predictor.model(
                inputs_embeds=embeds,
                attention_mask=torch.ones((1, seq_len + new), dtype=torch.long, device=self.device),
                position_ids=positions.unsqueeze(0),
                past_key_values=cache,
                cache_position=positions,
                use_cache=True,
            )
            seq_len += new
            logits = predictor.lm_head[group](out.last_hidden_state)[:, -1, :].to(dtype=torch.float32)
            token = _choose(logits, history, self._sub_warpers, do_sample, self.generator)
            history = torch.cat([history, token[:, None]], dim=-1)
            codes.append(token)
            if group < NUM_CODE_GROUPS - 2:
                embeds = predictor.small_to_mtp_projection(
                    predictor.model.get_input_embeddings()[group](token[:, None]))
        return torch.stack(codes, dim=-1)  # [1, 15]

    @torch.inference_mode()
    def step(self) -> Optional[torch.Tensor]:
        """Advance one frame; returns its 16 codes (int64, on the model's device) or None when done."""
        if self._next_token is None and not self.finished:
            self._sample_code0(self._forward(self._inputs_embeds))
        if self.finished:
            return None
        token = self._next_token
        last_id_hidden = self.talker.get_input_embeddings()(token[:, None])  # [1, 1, H]
        subcodes = self._predict_subcodes(last_id_hidden)
        frame = torch.cat([token[:, None], subcodes], dim=-1)  # [1, 16]
        embed_tables = self.predictor.get_input_embeddings()
        hiddens = [last_id_hidden] + [embed_tables[i](subcodes[:, i:i + 1]) for i in range(NUM_CODE_GROUPS - 1)]
        embeds = torch.cat(hiddens, dim=1).sum(1, keepdim=True)
        text_step = self.frames
        if text_step < self._trailing_text.shape[1]:
            embeds = embeds + self._trailing_text[:, text_step].unsqueeze(1)
        else:
            embeds = embeds + self._tts_pad_embed
        self.frames += 1
        self._sample_code0(self._forward(embeds))
        return frame[0]

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason

    def cancel(self) -> None:
        if not self.finished:
            self._finish("cancelled")
            self._cache = None


def iter_chunks(stream: TalkerStream, schedule: ChunkSchedule,
                is_cancelled: Callable[[], bool] = lambda: False) -> Iterator[torch.Tensor]:
    """Yield [n,16] chunks following ``schedule``; raises Cancelled when ``is_cancelled()`` turns true."""
    pending: list[torch.Tensor] = []
    chunk_index = 0
    while True:
        if is_cancelled():
            stream.cancel()
            raise Cancelled(f"cancelled after {stream.frames} frames")
        frame = stream.step()
        if frame is not None:
            pending.append(frame)
        if pending and (stream.finished or len(pending) >= schedule.size(chunk_index)):
            yield torch.stack(pending)
            pending = []
            chunk_index += 1
        if stream.finished:
            return


def generate_codes(tts, request: SynthesisRequest) -> torch.Tensor:
    """All frames of one utterance at once (the streaming loop, collected)."""
    stream = TalkerStream(tts, request)
    frames = []
    while (frame := stream.step()) is not None:
        frames.append(frame)
    if not frames:
        return torch.zeros((0, NUM_CODE_GROUPS), dtype=torch.long)
    return torch.stack(frames)
