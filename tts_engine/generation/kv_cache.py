"""A per-slot KV cache for the talker: one preallocated arena per layer, one row per active stream.

HF's caches write every row at one shared position, which cannot hold streams of different lengths. Here
each row has its own length: a decode step writes row r's new key at ``lengths[r]`` and attention reads
keys ``[0, lengths[r]]`` through a padding mask. Active streams occupy rows 0..B-1 (a finished stream's
row is refilled with the last one), so a step reads a view of the arena and never gathers.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

log = logging.getLogger(__name__)


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values, [slots, kv_heads, max_tokens, head_dim] each."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, arena: "SlotKVCache"):
        super().__init__()
        self.keys, self.values, self.arena = keys, values, arena
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor) -> None:  # preallocated
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: Optional[dict[str, Any]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's one new key/value at its own length; return the rows' keys up to the view length."""
        rows, positions, length = self.arena.rows, self.arena.positions, self.arena.view_length
        written = self.arena.row_index
        self.keys[written, :, positions] = key_states[:, :, 0]
        self.values[written, :, positions] = value_states[:, :, 0]
        return self.keys[rows, :, :length], self.values[rows, :, :length]  # a view for a slice, a copy for an index

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.arena.view_length, 0

    def get_seq_length(self) -> int:
        return self.arena.view_length - 1

    def get_max_cache_shape(self) -> int:
        return self.keys.shape[2]


class SlotKVCache(Cache):
    """The talker's KV arena. ``begin_step(lengths)`` prepares one decode step over rows 0..B-1."""

    def __init__(self, config, slots: int, max_tokens: int, device, dtype):
        shape = (slots, config.num_key_value_heads, max_tokens, config.head_dim)
        layers = [_SlotLayer(torch.zeros(shape, device=device, dtype=dtype),
                             torch.zeros(shape, device=device, dtype=dtype), self)
                  for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.slots, self.max_tokens = slots, max_tokens
        self._all_rows = torch.arange(slots, device=device)
        self.rows, self.row_index = slice(0, 0), self._all_rows[:0]
        self.positions = torch.zeros(0, dtype=torch.long, device=device)
        self.view_length = 0
        self.nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)

    def begin_step(self, lengths: torch.Tensor, rows=None, whole_arena: bool = False) -> None:
        """Next forward over ``rows`` (a slice or an index of arena rows; default 0..B-1): the i-th writes at
        ``lengths[i]`` and attends to keys 0..lengths[i]. Attention reads keys up to the longest row, or the
        whole arena (``whole_arena``: the same shapes at every step)."""
        self.rows = slice(0, lengths.shape[0]) if rows is None else rows
        self.row_index = self._all_rows[self.rows] if isinstance(self.rows, slice) else self.rows
        self.positions = lengths
        self.view_length = self.max_tokens if whole_arena else int(lengths.max()) + 1

    def store(self, row: int, cache: Cache) -> None:
        """Copy a prefilled batch-1 cache (HF DynamicCache) into ``row``."""
        for layer, source in zip(self.layers, cache.layers):
            length = source.keys.shape[2]
            layer.keys[row, :, :length] = source.keys[0]
            layer.values[row, :, :length] = source.values[0]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy row ``source``'s first ``length`` positions to row ``target`` (compaction)."""
        for layer in self.layers:
            layer.keys[target, :, :length] = layer.keys[source, :, :length]
            layer.values[target, :, :length] = layer.values[source, :, :length]
