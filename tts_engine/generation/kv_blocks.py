"""The talker's KV cache, given out in blocks as streams grow (as paged attention does), so memory follows use.

One pool of fixed-size blocks per layer; each row (a stream's place in the batch) has a block table listing its
blocks in order. A decode step writes each row's new key at ``(table[row, length // BLOCK], length % BLOCK)``
and reads the row's first blocks through the table. Block 0 is scratch: padding rows of a fixed-shape step and
unused table entries point at it, so they never touch a stream's keys.
"""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)
BLOCK_TOKENS = 32


class OutOfBlocks(RuntimeError):
    """The pool has no free block left."""


class BlockPool:
    """``layers`` pairs of key/value pools ``[blocks, kv_heads, BLOCK_TOKENS, head_dim]``, block tables for
    ``rows`` rows, and the free list. Host-side bookkeeping only changes between steps."""

    def __init__(self, config, rows: int, max_tokens: int, pool_tokens: int, device, dtype):
        self.block_tokens = BLOCK_TOKENS
        self.max_blocks = math.ceil(max_tokens / BLOCK_TOKENS)  # per row: its longest possible context
        self.blocks = 1 + math.ceil(pool_tokens / BLOCK_TOKENS)  # + the scratch block
        shape = (self.blocks, config.num_key_value_heads, BLOCK_TOKENS, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.table = torch.zeros(rows, self.max_blocks, dtype=torch.long, device=device)  # 0: scratch
        self.owned: list[list[int]] = [[] for _ in range(rows)]
        self._free = list(range(self.blocks - 1, 0, -1))  # block 0 is scratch, never given out
        self.nbytes = sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))
        self.bytes_per_token = self.nbytes // (self.blocks * BLOCK_TOKENS)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.blocks - 1 - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / BLOCK_TOKENS)

    def ensure(self, row: int, tokens: int) -> None:
        """Give ``row`` enough blocks to hold ``tokens`` tokens."""
        owned = self.owned[row]
        need = self.blocks_for(tokens)
        if need > self.max_blocks:
            raise OutOfBlocks(f"{tokens} tokens exceed a row's {self.max_blocks * BLOCK_TOKENS}-token context")
        if need - len(owned) > len(self._free):
            raise OutOfBlocks(f"the KV pool has {len(self._free)} free blocks; {need - len(owned)} needed")
        while len(owned) < need:
            block = self._free.pop()
            self.table[row, len(owned)] = block
            owned.append(block)

    def release(self, row: int) -> None:
        """Return ``row``'s blocks to the pool."""
        self._free.extend(reversed(self.owned[row]))
        self.owned[row] = []
        self.table[row].zero_()

    def write_prompt(self, row: int, layer_keys, layer_values, length: int) -> None:
        """Copy a prefilled prompt's keys and values (``[kv_heads, >=length, head_dim]`` per layer) into ``row``'s
        blocks (which ``ensure`` gave it)."""
        positions = torch.arange(length, device=self.table.device)
        blocks = self.table[row, positions // BLOCK_TOKENS]
        offsets = positions % BLOCK_TOKENS
        for pool_k, pool_v, k, v in zip(self.keys, self.values, layer_keys, layer_values):
            pool_k[blocks, :, offsets] = k[:, :length].transpose(0, 1).to(pool_k.dtype)
            pool_v[blocks, :, offsets] = v[:, :length].transpose(0, 1).to(pool_v.dtype)
