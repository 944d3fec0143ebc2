"""One frame for a bucket of streams as one launch-free function: the talker's forward over the KV blocks, the
code predictor's 15 forwards, and the choice of every token, with no host synchronisation.

Everything the step reads or writes lives in preallocated tensors: the KV pool and block tables
(``kv_blocks``), each row's state (its next code 0, last hidden state, code-0 history, counts, position) and its
sampling parameters (``RowState``). A step takes the rows to advance (padded to a bucket with the scratch row),
their text inputs, and, on the reference path, the sampling noise drawn on the host; it returns the frames and
the next code 0 of every row, and updates the state in place. So a bucket's step has the same shapes every time:
``torch.compile(fullgraph=True)`` traces it without a graph break and a CUDA graph replays it.

The attention is ours (over the block tables, masked per row); every other piece is the model's own module
(projections, norms, MLPs, heads, embeddings), called in qwen-tts's order, so codes equal qwen-tts's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from tts_contract.audio import NUM_CODEBOOKS

from .kv_blocks import BlockPool
from .noise import CODE0_GROUP, exponential_noise, noise_keys
from .sampling import choose, choose_among, code0_scores

GROUPS = NUM_CODEBOOKS - 1  # codes 1..15, one code-predictor forward each
GREEDY = -1  # ``candidates`` when no row samples: every token is an argmax


@dataclass
class RowState:
    """Per-row tensors (``rows`` rows: the slots plus the scratch row) that steps read and update in place."""

    next_token: torch.Tensor  # [R] code 0 of the frame the next step completes
    past_hidden: torch.Tensor  # [R, H] the talker's last hidden state
    seen: torch.Tensor  # [R, V] bool: code-0 tokens sampled so far (repetition penalty)
    generated: torch.Tensor  # [R] code-0 tokens sampled so far
    lengths: torch.Tensor  # [R] tokens in the row's KV blocks
    seed: torch.Tensor  # [R] int64: the counter noise's key
    # code 0: repetition penalty, min_new_tokens, temperature, top-k, top-p (1 - top_p, in float32 as HF compares
    # it), whether top-p applies, whether to sample (else argmax)
    penalty: torch.Tensor
    min_new: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p_cut: torch.Tensor
    use_top_p: torch.Tensor
    sample: torch.Tensor
    # codes 1..15 (the sub-talker): the same warpers, no penalty
    sub_temperature: torch.Tensor
    sub_top_k: torch.Tensor
    sub_top_p_cut: torch.Tensor
    sub_use_top_p: torch.Tensor
    sub_sample: torch.Tensor

    @classmethod
    def allocate(cls, rows: int, hidden: int, vocab: int, device, dtype) -> "RowState":
        def zeros(dtype_, *shape):
            return torch.zeros(rows, *shape, dtype=dtype_, device=device)

        ones = lambda dtype_: torch.ones(rows, dtype=dtype_, device=device)  # noqa: E731
        return cls(zeros(torch.long), zeros(dtype, hidden), zeros(torch.bool, vocab), zeros(torch.long),
                   zeros(torch.long), zeros(torch.long), ones(torch.float32), zeros(torch.long), ones(torch.float32),
                   zeros(torch.long), zeros(torch.float32), zeros(torch.bool), zeros(torch.bool), ones(torch.float32),
                   zeros(torch.long), zeros(torch.float32), zeros(torch.bool), zeros(torch.bool))

    def set_params(self, row: int, params) -> None:
        """A request's sampling parameters into its row (host side, between steps)."""
        for prefix, sample, temperature, top_k, top_p in (
                ("", params.do_sample, params.temperature, params.top_k, params.top_p),
                ("sub_", params.subtalker_do_sample, params.subtalker_temperature, params.subtalker_top_k,
                 params.subtalker_top_p)):
            getattr(self, prefix + "sample")[row] = sample
            getattr(self, prefix + "temperature")[row] = temperature
            getattr(self, prefix + "top_k")[row] = top_k
            getattr(self, prefix + "top_p_cut")[row] = 1.0 - top_p  # in double, then float32: as HF's comparison
            getattr(self, prefix + "use_top_p")[row] = top_p < 1.0
        self.penalty[row] = params.repetition_penalty
        self.min_new[row] = params.min_new_tokens


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecodeStep:
    """The step for one talker over ``pool`` and ``state``. ``__call__`` is the function to trace or capture."""

    def __init__(self, talker, pool: BlockPool, state: RowState, suppress: torch.Tensor, eos: int, scratch_row: int):
        self.talker, self.predictor = talker, talker.code_predictor
        self.pool, self.state, self.suppress, self.eos, self.scratch_row = pool, state, suppress, eos, scratch_row
        config = talker.config
        self.head_dim = config.head_dim
        self.kv_heads = config.num_key_value_heads
        self.groups = config.num_attention_heads // config.num_key_value_heads
        self.sub_vocab = self.predictor.config.vocab_size
        self.vocab = config.vocab_size
        rotary = talker.model.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq.float(), rotary.attention_scaling
        self.eos_onehot = torch.zeros(self.vocab, dtype=torch.bool, device=suppress.device)
        self.eos_onehot[eos] = True
        # The code predictor's positions are always 0..16: its rotary tables once, as its own module makes them.
        positions = torch.arange(GROUPS + 1, device=suppress.device)[None, :]
        self.predictor_cos, self.predictor_sin = self.predictor.model.rotary_emb(
            torch.zeros(1, dtype=torch.float32, device=suppress.device), positions)

    def __call__(self, rows: torch.Tensor, text: torch.Tensor, context_blocks: int,
                 noise_sub: Optional[torch.Tensor] = None, noise_code0: Optional[torch.Tensor] = None,
                 candidates: int = 0):
        """Advance ``rows`` ([B]; padding: the scratch row) by one frame. ``text`` [B, H]: this step's text input
        per row; ``context_blocks``: KV blocks each row attends over (a bucket; at least its length + 1);
        ``noise_*``: Exponential(1) noise drawn on the host (the reference path), or None to draw it here;
        ``candidates``: 0 to choose over the whole vocabulary (exactly HF's arithmetic), K to choose among each
        row's K best tokens (every sampled row has 0 < top_k <= K: much cheaper), or GREEDY when no row samples.
        Returns (frames [B, 16], next
        code 0 [B]). Call it in inference mode."""
        state = self.state
        tokens = state.next_token[rows]
        last_id = self.talker.model.codec_embedding(tokens[:, None])  # [B, 1, H]
        subcodes = self._subcodes(state.past_hidden[rows][:, None], last_id, rows, noise_sub, candidates)  # [B, 15]
        tables = self.predictor.model.codec_embedding
        embeds = torch.cat([last_id] + [tables[g](subcodes[:, g:g + 1]) for g in range(GROUPS)], dim=1)
        embeds = embeds.sum(1, keepdim=True) + text[:, None, :]
        hidden = self._talker(embeds, rows, context_blocks)  # [B, 1, H]
        logits = self.talker.codec_head(hidden)[:, -1, :].to(torch.float32)
        generated = state.generated[rows]
        scores = code0_scores(logits, state.seen[rows], state.penalty[rows],
                              generated < state.min_new[rows], self.eos_onehot, self.suppress)
        new = self._choose(scores, self._params(rows, ""), noise_code0, candidates,
                           noise_keys(state.seed[rows], generated)[:, CODE0_GROUP])
        # The state moves on in place; the scratch row stays at position 0.
        padding = rows == self.scratch_row
        state.past_hidden[rows] = hidden[:, -1]
        state.next_token[rows] = new
        state.seen[rows, new] = True
        state.generated[rows] = generated + 1
        state.lengths[rows] = torch.where(padding, 0, state.lengths[rows] + 1)
        return torch.cat([tokens[:, None], subcodes], dim=-1), new

    # -- the code predictor: 15 small forwards, all rows in lockstep ------------------------------------------

    def _params(self, rows, prefix: str) -> tuple:
        """One head's sampling parameters for ``rows`` (``prefix`` "" for code 0, "sub_" for codes 1..15)."""
        return tuple(getattr(self.state, prefix + name)[rows]
                     for name in ("temperature", "top_k", "top_p_cut", "use_top_p", "sample"))

    @staticmethod
    def _choose(scores, params: tuple, noise, candidates: int, key) -> torch.Tensor:
        """One head's tokens: ``noise`` from the host (reference path) or drawn from ``key`` ([B] noise keys)."""
        if candidates == GREEDY:
            return torch.argmax(scores, dim=-1)
        if candidates:
            def noise_at(ids):
                return noise.gather(1, ids) if noise is not None else exponential_noise(key, ids)

            return choose_among(scores, *params, noise_at, candidates, exact=noise is not None)
        if noise is None:
            noise = exponential_noise(key, torch.arange(scores.shape[-1], device=scores.device))
        return choose(scores, *params, noise)

    def _subcodes(self, past_hidden, last_id, rows, noise_sub, candidates: int) -> torch.Tensor:
        state, predictor = self.state, self.predictor
        model = predictor.model
        # The frame these codes belong to: its code 0 is already sampled, so one less than the code-0 count.
        keys_noise = noise_keys(state.seed[rows], state.generated[rows] - 1)
        params = self._params(rows, "sub_")
        embeds = predictor.small_to_mtp_projection(torch.cat((past_hidden, last_id), dim=1))  # [B, 2, h]
        keys: list = [None] * len(model.layers)
        values: list = [None] * len(model.layers)
        start, codes = 0, []
        for group in range(GROUPS):
            length = embeds.shape[1]
            cos = self.predictor_cos[:, start:start + length].to(embeds.dtype)
            sin = self.predictor_sin[:, start:start + length].to(embeds.dtype)
            hidden = embeds
            for index, layer in enumerate(model.layers):
                attention = layer.self_attn
                x = layer.input_layernorm(hidden)
                q, k, v = self._qkv(attention, x, cos, sin)
                keys[index] = k if keys[index] is None else torch.cat([keys[index], k], dim=2)
                values[index] = v if values[index] is None else torch.cat([values[index], v], dim=2)
                out = F.scaled_dot_product_attention(q, keys[index], values[index], is_causal=length > 1,
                                                     scale=attention.scaling, enable_gqa=True)
                hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(*hidden.shape[:2], -1))
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = model.norm(hidden)
            start += length
            logits = predictor.lm_head[group](hidden)[:, -1, :].to(torch.float32)
            noise = noise_sub[:, group] if noise_sub is not None else None
            token = self._choose(logits, params, noise, candidates, keys_noise[:, group])
            codes.append(token)
            if group < GROUPS - 1:
                embeds = predictor.small_to_mtp_projection(model.codec_embedding[group](token[:, None]))
        return torch.stack(codes, dim=-1)

    # -- the talker: one token per row over its KV blocks ----------------------------------------------------

    def snapshot(self) -> dict:
        """Copies of everything a step changes (the row state and the KV pool), to replay a step exactly."""
        tensors = {name: value.clone() for name, value in vars(self.state).items()}
        tensors["keys"] = [k.clone() for k in self.pool.keys]
        tensors["values"] = [v.clone() for v in self.pool.values]
        return tensors

    def restore(self, snapshot: dict) -> None:
        for name, value in snapshot.items():
            if name in ("keys", "values"):
                for target, source in zip(getattr(self.pool, name), value):
                    target.copy_(source)
            else:
                getattr(self.state, name).copy_(value)

    def _talker(self, embeds, rows, context_blocks: int) -> torch.Tensor:
        pool, state = self.pool, self.state
        positions = state.lengths[rows]  # where each row's new token goes
        freqs = positions[:, None, None].to(torch.float32) * self.inv_freq[None, None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.rope_scale).to(embeds.dtype)
        sin = (angles.sin() * self.rope_scale).to(embeds.dtype)
        block = pool.table[rows, positions // pool.block_tokens]
        offset = positions % pool.block_tokens
        table = pool.table[rows, :context_blocks]  # [B, blocks]
        span = context_blocks * pool.block_tokens
        mask = (torch.arange(span, device=rows.device)[None, :] <= positions[:, None])[:, None, None, :]
        batch, hidden = rows.shape[0], embeds
        for index, layer in enumerate(self.talker.model.layers):
            attention = layer.self_attn
            q, k, v = self._qkv(attention, layer.input_layernorm(hidden), cos, sin)
            pool.keys[index][block, :, offset] = k[:, :, 0]
            pool.values[index][block, :, offset] = v[:, :, 0]
            keys = self._gather(pool.keys[index], table, batch, span)
            values = self._gather(pool.values[index], table, batch, span)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attention.scaling)
            hidden = hidden + attention.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.talker.model.norm(hidden)

    def _gather(self, pool: torch.Tensor, table: torch.Tensor, batch: int, span: int) -> torch.Tensor:
        """A row's blocks as one [B, heads, span, head_dim] (key heads repeated for the query heads, as HF does)."""
        gathered = pool[table].permute(0, 2, 1, 3, 4).reshape(batch, self.kv_heads, span, self.head_dim)
        if self.groups == 1:
            return gathered
        return gathered[:, :, None].expand(batch, self.kv_heads, self.groups, span, self.head_dim).reshape(
            batch, self.kv_heads * self.groups, span, self.head_dim)

    def _qkv(self, attention, x, cos, sin):
        """Queries, keys and values of ``x`` [B, n, H] with rotary positions: [B, heads, n, head_dim] each."""
        shape = (*x.shape[:2], -1, attention.head_dim)
        q = attention.q_norm(attention.q_proj(x).view(shape)).transpose(1, 2)
        k = attention.k_norm(attention.k_proj(x).view(shape)).transpose(1, 2)
        v = attention.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v
