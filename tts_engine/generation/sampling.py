"""Sampling: the parameters of one request (validated once at the edge), and token choice for a batch of
streams that gives each row exactly what HF ``generate`` would give it alone (its processors and warpers, in
HF's order and float arithmetic), as one vectorised function a captured step can run."""
from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Sequence

from tts_contract.limits import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT
from tts_contract.speech_length import CAP_FRAMES_BASE, frame_cap

from ..errors import InvalidRequest

NEG_INF = -math.inf


@dataclass(frozen=True)
class SamplingParams:
    """Talker sampling options (code 0) and sub-talker options (codes 1..15), as in qwen-tts."""

    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 2  # EOS is suppressed until this many tokens are sampled (qwen-tts fixes it at 2)
    seed: Optional[int] = None
    greedy: bool = False
    subtalker_temperature: float = 0.9
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0
    subtalker_greedy: Optional[bool] = None  # None: follow ``greedy``
    # > 0: a stream also stops at tts_contract.speech_length.frame_cap of its (closed) text, so the cap grows with
    # text that is still being written (max_new_tokens stays the upper bound); 0: max_new_tokens alone, as qwen-tts
    frames_per_char: float = 0.0
    frames_base: int = CAP_FRAMES_BASE

    def frame_cap(self, characters: int) -> int:
        """The most tokens a stream of ``characters`` characters samples."""
        if not self.frames_per_char:
            return self.max_new_tokens
        return min(self.max_new_tokens, frame_cap(characters, self.frames_base, self.frames_per_char))

    @property
    def do_sample(self) -> bool:
        return not self.greedy

    @property
    def subtalker_do_sample(self) -> bool:
        greedy = self.greedy if self.subtalker_greedy is None else self.subtalker_greedy
        return not greedy

    def validate(self, max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT) -> "SamplingParams":
        def check(name: str, ok: bool, rule: str) -> None:
            if not ok:
                raise InvalidRequest(f"parameter '{name}'={getattr(self, name)!r} is out of range: {rule}")

        check("temperature", 0.0 < self.temperature <= 10.0, "0 < temperature <= 10")
        check("subtalker_temperature", 0.0 < self.subtalker_temperature <= 10.0, "0 < value <= 10")
        check("top_k", 0 <= self.top_k <= 4096, "0 <= top_k <= 4096 (0 disables)")
        check("subtalker_top_k", 0 <= self.subtalker_top_k <= 4096, "0 <= value <= 4096 (0 disables)")
        check("top_p", 0.0 < self.top_p <= 1.0, "0 < top_p <= 1")
        check("subtalker_top_p", 0.0 < self.subtalker_top_p <= 1.0, "0 < value <= 1")
        check("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "0 < repetition_penalty <= 10")
        check("max_new_tokens", 1 <= self.max_new_tokens <= max_new_tokens_limit,
              f"1 <= max_new_tokens <= {max_new_tokens_limit}")
        check("frames_per_char", 0.0 <= self.frames_per_char <= 100.0, "0 <= frames_per_char <= 100")
        check("frames_base", 0 <= self.frames_base <= max_new_tokens_limit, f"0 <= frames_base <= {max_new_tokens_limit}")
        check("min_new_tokens", 0 <= self.min_new_tokens <= max_new_tokens_limit,
              f"0 <= min_new_tokens <= {max_new_tokens_limit}")
        if self.seed is not None:
            check("seed", 0 <= self.seed < 2**63, "0 <= seed < 2**63")
        return self

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: Optional["SamplingParams"] = None,
                     max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT) -> "SamplingParams":
        """Overlay ``values`` (e.g. Triton request parameters) on ``base``; unknown names are errors."""
        known = {f.name: f for f in fields(cls)}
        merged = asdict(base or cls())
        for name, raw in values.items():
            if name not in known:
                raise InvalidRequest(f"unknown parameter '{name}'; known: {', '.join(sorted(known))}")
            merged[name] = _coerce(name, raw, known[name].type)
        return cls(**merged).validate(max_new_tokens_limit)


def _coerce(name: str, raw: Any, annotation: Any) -> Any:
    kind = str(annotation)
    try:
        if raw is None and "Optional" in kind:
            return None
        if "bool" in kind:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
                return raw.lower() in ("true", "1")
            if isinstance(raw, int) and raw in (0, 1):
                return bool(raw)
            raise ValueError
        if "int" in kind:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if "float" in kind:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
    except (TypeError, ValueError):
        pass
    else:
        return raw
    raise InvalidRequest(f"parameter '{name}' has the wrong type: {raw!r}")


# -- per-request random streams (the reference path's noise) ------------------------------------------------

def new_generator(device, seed: Optional[int]):
    """A request's own RNG (seeded, or random when no seed is given)."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


def draw_uniforms(generator, count: int):
    """``count`` uniform doubles from ``generator``: the numbers ``torch.multinomial`` would consume.

    CPU multinomial (one sample) draws ``q = Exponential(1)`` per vocabulary entry, each one uniform double
    ``u`` turned into ``-log1p(-u)``, and returns ``argmax(p / q)``. Drawing the uniforms of several
    consecutive draws in one call gives the same numbers and leaves the generator in the same state."""
    import torch

    return torch.rand(count, dtype=torch.float64, generator=generator, device=generator.device)


# -- choosing tokens: every row at once, capturable (the decode step's) -------------------------------------------

def code0_scores(logits, seen, penalty, early, eos_onehot, suppress):
    """qwen-tts's processors for code 0, every row at once: the repetition penalty over the row's code-0 tokens
    so far, EOS masked while ``early`` (before min_new_tokens), the control ids suppressed."""
    import torch

    factor = penalty[:, None].to(logits.dtype)
    penalised = torch.where(logits < 0, logits * factor, logits / factor)
    scores = torch.where(seen, penalised, logits)
    scores = scores.masked_fill(early[:, None] & eos_onehot[None, :], NEG_INF)
    return scores.masked_fill(suppress[None, :], NEG_INF)


def choose(scores, temperature, top_k, top_p_cut, use_top_p, sample, noise):
    """One token per row, HF's way: argmax where ``sample`` is false; else temperature, top-k (ties at the k-th
    score kept), top-p where ``use_top_p`` (``top_p_cut`` = 1 - top_p), softmax, and the exponential race
    ``argmax(p / noise)`` that ``torch.multinomial`` runs. No host synchronisation, no data-dependent branch."""
    import torch

    greedy = torch.argmax(scores, dim=-1)
    warped = scores / temperature[:, None].to(scores.dtype)
    ordered = torch.sort(warped, dim=-1, descending=True).values
    kth = ordered.gather(1, (top_k.clamp(min=1, max=scores.shape[-1]) - 1)[:, None])
    warped = torch.where((top_k[:, None] > 0) & (warped < kth), NEG_INF, warped)
    ascending, order = torch.sort(warped, dim=-1, descending=False)  # TopPLogitsWarper, row by row
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= top_p_cut[:, None].to(cumulative.dtype)
    remove[..., -1] = False  # min_tokens_to_keep
    remove = remove.scatter(1, order, remove)
    warped = torch.where(use_top_p[:, None] & remove, NEG_INF, warped)
    probs = torch.softmax(warped, dim=-1)
    ratio = torch.where(probs > 0, probs / noise.to(probs.dtype), 0.0)
    return torch.where(sample, torch.argmax(ratio, dim=-1), greedy)


def choose_among(scores, temperature, top_k, top_p_cut, use_top_p, sample, noise_at, candidates: int,
                 exact: bool = True):
    """``choose`` among each row's ``candidates`` best tokens (every sampled row has 0 < top_k <= candidates, so no
    other token can win): one top-k instead of two full sorts, and noise only where it is used
    (``noise_at(token_ids [B, K])``). ``exact``: the softmax runs over the whole (masked) vocabulary, so rows
    without top-p get ``choose``'s token to the last bit (the reference path); otherwise everything after the top-k
    runs over the candidates alone (the same distribution, rounded differently). For top-p rows the cumulative sum
    always runs over the candidates, so its cut may differ from HF's in the last bit."""
    import torch

    greedy = torch.argmax(scores, dim=-1)  # (not ids[:, 0]: among equal scores, argmax's choice is HF's)
    values, ids = torch.topk(scores, candidates, dim=-1)  # descending; a positive temperature keeps the order
    values = values / temperature[:, None].to(scores.dtype)
    kth = values.gather(1, (top_k.clamp(min=1, max=candidates) - 1)[:, None])
    values = torch.where(values < kth, NEG_INF, values)  # TopKLogitsWarper (ties at the k-th score kept)
    remove = values.flip(-1).softmax(dim=-1).cumsum(dim=-1) <= top_p_cut[:, None].to(values.dtype)
    remove[..., -1] = False  # min_tokens_to_keep
    values = torch.where(use_top_p[:, None] & remove.flip(-1), NEG_INF, values)
    if exact:
        warped = torch.full_like(scores, NEG_INF).scatter(1, ids, values)
        probs = torch.softmax(warped, dim=-1).gather(1, ids)
    else:
        probs = torch.softmax(values, dim=-1)
    ratio = torch.where(probs > 0, probs / noise_at(ids).to(probs.dtype), 0.0)
    return torch.where(sample, ids.gather(1, torch.argmax(ratio, dim=-1, keepdim=True))[:, 0], greedy)
