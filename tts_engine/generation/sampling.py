"""Sampling: the parameters of one request (validated once at the edge), and token choice for a batch of
streams that gives each row exactly what HF ``generate`` would give it alone, random stream included."""
from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Sequence

from tts_contract.limits import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_LIMIT

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


# -- choosing tokens for a batch of streams ---------------------------------------------------------------

@dataclass(frozen=True)
class Warp:
    """HF's sampling warpers for one row, in HF's order and under its conditions (skipped when neutral)."""

    temperature: float
    top_k: int
    top_p: float

    def apply(self, scores):
        """Warped scores, and the top-k indices ([rows, k], or None without top-k): every token top-k keeps
        is among them unless scores tie at the k-th value."""
        import torch
        from transformers.generation.logits_process import TopPLogitsWarper

        if self.temperature != 1.0:
            scores = scores / self.temperature  # TemperatureLogitsWarper
        candidates = None
        if self.top_k != 0:  # TopKLogitsWarper, keeping the indices it finds
            values, candidates = torch.topk(scores, min(max(self.top_k, 1), scores.size(-1)))
            scores = scores.masked_fill(scores < values[..., -1, None], NEG_INF)
        if self.top_p < 1.0:
            scores = TopPLogitsWarper(top_p=self.top_p, min_tokens_to_keep=1)(None, scores)
        return scores, candidates


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


def sample_with_uniforms(probs, uniforms, candidates=None):
    """``torch.multinomial(probs[r], 1)`` for every row, from each row's uniforms ([rows, vocab] float64).

    Only entries with p > 0 can win, so the logarithm is taken there alone: at ``candidates`` (indices that
    hold every p > 0 entry of their row) when given, else wherever p > 0. Ties go to the lowest index, as
    in multinomial's argmax."""
    import torch

    if candidates is None:
        noise = torch.ones_like(probs)
        keep = probs > 0
        noise[keep] = (-torch.log1p(-uniforms[keep])).to(probs.dtype)
        return torch.argmax(probs / noise, dim=-1)
    chosen = probs.gather(1, candidates)
    noise = torch.where(chosen > 0, -torch.log1p(-uniforms.gather(1, candidates)), 1.0).to(probs.dtype)
    ratio = chosen / noise
    best = ratio.max(dim=1, keepdim=True).values
    return torch.where(ratio == best, candidates, probs.shape[-1]).min(dim=1).values


def choose_tokens(scores, warps: Sequence[Optional[Warp]], uniforms: Sequence):
    """One token per row: argmax where ``warps[r]`` is None (greedy), else sampled after the row's warpers
    with the row's uniforms. Rows sharing warpers are warped together, exactly as HF's processors do."""
    import torch

    sampled = [row for row, warp in enumerate(warps) if warp is not None]
    if len(sampled) < len(warps):
        tokens = torch.argmax(scores, dim=-1)
    else:
        tokens = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
    groups: dict[Warp, list[int]] = {}
    for row in sampled:
        groups.setdefault(warps[row], []).append(row)
    for warp, rows in groups.items():
        index = torch.tensor(rows, device=scores.device) if len(rows) < scores.shape[0] else None
        warped, candidates = warp.apply(scores if index is None else scores[index])
        probs = torch.softmax(warped, dim=-1)
        if candidates is not None and bool((warped > NEG_INF).sum(dim=-1).gt(candidates.shape[-1]).any()):
            candidates = None  # ties at the k-th score keep more than k tokens
        row_uniforms = torch.stack([uniforms[row] for row in rows])
        chosen = sample_with_uniforms(probs, row_uniforms, candidates)
        if index is None:
            tokens = chosen
        else:
            tokens[index] = chosen
    return tokens


def penalise_repeats(scores, seen, penalties: Sequence[float]):
    """HF's repetition penalty per row: tokens in ``seen[r]`` (a [vocab] mask) get ``penalties[r]``."""
    import torch

    groups: dict[float, list[int]] = {}
    for row, penalty in enumerate(penalties):
        if penalty != 1.0:
            groups.setdefault(penalty, []).append(row)
    for penalty, rows in groups.items():
        index = torch.tensor(rows, device=scores.device)
        rows_scores = scores[index]
        penalised = torch.where(rows_scores < 0, rows_scores * penalty, rows_scores / penalty)
        scores[index] = torch.where(seen[index], penalised, rows_scores)
    return scores

