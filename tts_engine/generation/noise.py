"""Sampling noise that a captured step can draw by itself: the same for a stream whatever else runs.

Sampling a token is ``argmax(p / q)`` with ``q ~ Exponential(1)`` per vocabulary entry (what ``torch.multinomial``
computes). The reference path draws ``q`` from each request's own ``torch.Generator`` in qwen-tts's order, so
codes equal qwen-tts's; that is a host loop per stream. Here ``q`` is a hash of (seed, frame, codebook, token):
no state, no host, the same numbers at any batch size, in any bucket, on any device.
"""
from __future__ import annotations

import torch

# splitmix64's constants as signed 64-bit integers (torch has no uint64 arithmetic).
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB
CODE0_GROUP = 15  # code 0 is drawn after the 15 sub-codes of its frame


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (``>>`` is arithmetic on signed integers)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser (wrapping int64 arithmetic): every input bit reaches every output bit."""
    x = (x ^ _shift(x, 30)) * _MIX1
    x = (x ^ _shift(x, 27)) * _MIX2
    return x ^ _shift(x, 31)


def noise_keys(seeds: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """One key per (seed, frame, codebook): ``[B, 16]`` for rows with ``seeds``/``frames`` ([B] int64)."""
    groups = torch.arange(16, device=seeds.device)
    return _mix((seeds * _GOLDEN + frames * 16)[:, None] + groups[None, :])


def exponential_noise(keys: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Exponential(1) noise, float32, for rows with ``keys`` ([B] int64, from ``noise_keys``) at vocabulary
    ``tokens`` (``[V]`` or ``[B, K]``): ``[B, V]`` or ``[B, K]``."""
    token_ids = tokens if tokens.dim() == 2 else tokens[None, :]
    bits = _mix(keys[:, None] ^ (token_ids * _GOLDEN))
    uniform = (_shift(bits, 41).to(torch.float32) + 0.5) * (1.0 / (1 << 23))  # (0, 1): 23 bits, exact in float32
    return -torch.log(uniform)
