"""Codec-frame generation for many utterances at once, each exactly equal to qwen-tts ``generate``.

The prompt embeddings are built by qwen-tts itself (its ``generate`` runs up to the point where it would
hand over to HF ``generate``). The decoding loop is ours: every active stream advances one frame per step
in one batched talker forward (a per-slot KV cache, each row at its own length) and 15 batched code
predictor forwards; each row keeps its own sampling parameters and RNG, drawn in qwen-tts's order, so a
stream's codes do not depend on its neighbours. No state lives on the shared model object (the upstream
talker stores ``rope_deltas`` on the module, which breaks concurrent streams).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.cache_utils import DynamicCache

from tts_contract.audio import NUM_CODEBOOKS

from ..errors import InvalidRequest
from .kv_cache import SlotKVCache
from .prompt import SynthesisRequest, build_talker_inputs
from .sampling import SamplingParams, Warp, choose_tokens, draw_uniforms, new_generator, penalise_repeats

log = logging.getLogger(__name__)


@dataclass(eq=False)
class TalkerStream:
    """One utterance in the batch: its request, where its row is, and how far it got."""

    request: SynthesisRequest
    row: int
    length: int  # tokens in its KV cache
    trailing_text: torch.Tensor  # [text tokens, hidden]: one is added to each step's input, then tts_pad
    tts_pad: torch.Tensor  # [hidden]
    generator: Optional[torch.Generator]
    code0_warp: Optional[Warp]  # None: greedy
    subcode_warp: Optional[Warp]
    generated: int = 0  # code-0 tokens sampled so far (frames + the next one)
    frames: int = 0
    finished: bool = False
    finish_reason: Optional[str] = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def text_input(self) -> torch.Tensor:
        """What this step adds to the codec embeddings: the next text token, or tts_pad after the text."""
        return self.trailing_text[self.frames] if self.frames < self.trailing_text.shape[0] else self.tts_pad

    def uniforms(self, subcodes: bool, code0: bool, sub_vocab: int, vocab: int):
        """This step's random numbers in qwen-tts's order: 15 sub-code draws, then one code-0 draw."""
        sub_count = (NUM_CODEBOOKS - 1) * sub_vocab if subcodes and self.subcode_warp else 0
        code0_count = vocab if code0 and self.code0_warp else 0
        if not sub_count + code0_count:
            return None, None
        drawn = draw_uniforms(self.generator, sub_count + code0_count)
        sub = drawn[:sub_count].view(NUM_CODEBOOKS - 1, sub_vocab) if sub_count else None
        return sub, (drawn[sub_count:] if code0_count else None)


def _warp(do_sample: bool, temperature: float, top_k: int, top_p: float) -> Optional[Warp]:
    return Warp(temperature, top_k, top_p) if do_sample else None


def batch_buckets(slots: int) -> tuple[int, ...]:
    """The batch sizes a fixed-shape step pads to: powers of two below ``slots``, then ``slots``."""
    return tuple(sorted({1 << i for i in range(slots.bit_length()) if 1 << i < slots} | {slots}))


class BatchedTalker:
    """The talker and code predictor over up to ``slots`` streams: ``add`` prefills one stream, ``step``
    advances all of them by one frame, ``remove`` frees a row. Not thread-safe: one thread drives it.

    With ``fixed_shapes`` a step pads the batch to the next of ``batch_buckets(slots)`` and attends over the
    whole KV arena (masked), so every step of a bucket has the same tensor shapes: what capturing the step
    as a CUDA graph per bucket needs. Padding rows compute and are discarded; a stream's codes are the same
    either way. Off by default: on a CPU the padding is pure cost."""

    def __init__(self, tts, slots: int = 16, max_tokens: int = 5120, fixed_shapes: bool = False):
        model = tts.model
        self.tts = tts
        self.talker = model.talker
        self.predictor = model.talker.code_predictor
        self.device = self.talker.device
        config = self.talker.config
        self.slots, self.max_tokens = slots, max_tokens
        self.buckets = batch_buckets(slots) if fixed_shapes else None
        self.vocab = config.vocab_size
        self.sub_vocab = self.predictor.config.vocab_size
        self.eos = config.codec_eos_token_id
        # Row ``slots`` is scratch: padding rows of a fixed-shape step write there, never into a stream's row.
        rows = slots + 1
        self.scratch_row = slots
        self.cache = SlotKVCache(config, rows, max_tokens, self.device, self.talker.dtype)
        self.next_tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.past_hidden = torch.zeros(rows, config.hidden_size, dtype=self.talker.dtype, device=self.device)
        self.seen = torch.zeros(rows, self.vocab, dtype=torch.bool, device=self.device)  # code-0 tokens so far
        suppressed = [i for i in range(self.vocab - 1024, self.vocab) if i != self.eos]  # as qwen-tts generate
        self.suppress = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        self.suppress[suppressed] = True
        self.active: list[TalkerStream] = []
        log.info("talker KV cache: %d slots x %d tokens = %.1f MiB (%s on %s)", slots, max_tokens,
                 self.cache.nbytes / 2**20, str(self.talker.dtype).replace("torch.", ""), self.device)

    def __len__(self) -> int:
        return len(self.active)

    def buckets_up_to_slots(self) -> tuple[int, ...]:
        return batch_buckets(self.slots)

    # -- admission ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, request: SynthesisRequest) -> TalkerStream:
        """Build the prompt (qwen-tts's construction), prefill it alone and sample its first code 0.

        The stream may come back already finished (EOS or max_new_tokens before any frame)."""
        if len(self.active) >= self.slots:
            raise RuntimeError("no free talker slot")  # the scheduler admits within capacity
        inputs = build_talker_inputs(self.tts, request)
        embeds, params = inputs["inputs_embeds"], request.params
        length = embeds.shape[1]
        if length + params.max_new_tokens > self.max_tokens:
            raise InvalidRequest(f"prompt of {length} tokens + max_new_tokens {params.max_new_tokens} exceeds "
                                 f"the talker's {self.max_tokens}-token context")
        cache = DynamicCache(config=self.talker.config)
        positions = torch.arange(length, device=self.device)
        out = self.talker.model(inputs_embeds=embeds, attention_mask=torch.ones((1, length), dtype=torch.long,
                                                                                 device=self.device),
                                position_ids=positions.view(1, 1, -1).expand(3, 1, -1), past_key_values=cache,
                                cache_position=positions, use_cache=True)
        row = len(self.active)
        self.cache.store(row, cache)
        hidden = out.last_hidden_state
        self.past_hidden[row] = hidden[0, -1]
        self.seen[row] = False
        sampled = params.do_sample or params.subtalker_do_sample
        stream = TalkerStream(
            request=request, row=row, length=length, trailing_text=inputs["trailing_text_hidden"][0],
            tts_pad=inputs["tts_pad_embed"].reshape(-1),
            generator=new_generator(self.device, params.seed) if sampled else None,
            code0_warp=_warp(params.do_sample, params.temperature, params.top_k, params.top_p),
            subcode_warp=_warp(params.subtalker_do_sample, params.subtalker_temperature, params.subtalker_top_k,
                               params.subtalker_top_p))
        _, uniforms = stream.uniforms(False, True, self.sub_vocab, self.vocab)
        logits = self.talker.codec_head(hidden)[:, -1, :].to(dtype=torch.float32)
        token = self._choose_code0(logits, [stream], [uniforms], rows=slice(row, row + 1))
        self.active.append(stream)
        self._record(stream, int(token[0]))
        return stream

    def remove(self, stream: TalkerStream) -> None:
        """Free a stream's row; the last row moves into it so active rows stay 0..B-1."""
        row, last = stream.row, len(self.active) - 1
        if self.active[row] is not stream:
            raise ValueError("stream is not active")
        if row != last:
            moved = self.active[last]
            self.cache.move(last, row, moved.length)
            self.next_tokens[row] = self.next_tokens[last]
            self.past_hidden[row] = self.past_hidden[last]
            self.seen[row] = self.seen[last]
            moved.row = row
            self.active[row] = moved
        self.active.pop()

    # -- one step for every active stream -------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, streams: Optional[list[TalkerStream]] = None) -> list[tuple[TalkerStream, torch.Tensor]]:
        """Advance ``streams`` (default: every active stream) by one frame: [(stream, its 16 codes on the CPU)].
        Streams left out keep their state untouched (a row waiting for its deadline or its text)."""
        streams = self.active if streams is None else streams
        if not streams:
            return []
        if any(s.finished for s in streams):
            raise RuntimeError("finished streams must be removed before the next step")
        batch = len(streams)
        padded = batch if self.buckets is None else next(size for size in self.buckets if size >= batch)
        rows = self._rows(streams, padded)
        draws = [s.uniforms(True, True, self.sub_vocab, self.vocab) for s in streams]
        tokens = self.next_tokens[rows]  # padding rows hold stale ids: computed, discarded
        last_id_hidden = self.talker.get_input_embeddings()(tokens[:, None])  # [R, 1, H]
        subcodes = self._predict_subcodes(self.past_hidden[rows][:, None], last_id_hidden, streams,
                                          [d[0] for d in draws])  # [R, 15]
        frames = torch.cat([tokens[:, None], subcodes], dim=-1)[:batch]  # [B, 16]
        tables = self.predictor.get_input_embeddings()
        embeds = torch.cat([last_id_hidden] + [tables[i](subcodes[:, i:i + 1]) for i in range(NUM_CODEBOOKS - 1)],
                           dim=1).sum(1, keepdim=True)
        text = torch.stack([s.text_input() for s in streams])
        embeds = embeds + torch.nn.functional.pad(text, (0, 0, 0, padded - batch))[:, None, :]
        # Padding rows write at position 0 of a free row or the scratch row, which no stream reads.
        lengths = torch.tensor([s.length for s in streams] + [0] * (padded - batch), device=self.device)
        self.cache.begin_step(lengths, rows, whole_arena=self.buckets is not None)
        view = self.cache.view_length
        mask = (torch.arange(view, device=self.device)[None, :] <= lengths[:, None]).long()
        out = self.talker.model(inputs_embeds=embeds, attention_mask=mask,
                                position_ids=lengths.view(1, padded, 1).expand(3, padded, 1),
                                past_key_values=self.cache, cache_position=torch.tensor([view - 1], device=self.device),
                                use_cache=True)
        hidden = out.last_hidden_state
        self.past_hidden[rows] = hidden[:, -1]
        logits = self.talker.codec_head(hidden[:batch])[:, -1, :].to(dtype=torch.float32)
        stepped = rows if isinstance(rows, slice) and padded == batch else torch.tensor(
            [s.row for s in streams], device=self.device)
        new_tokens = self._choose_code0(logits, streams, [d[1] for d in draws], rows=stepped).tolist()
        frames = frames.cpu()
        for stream, token in zip(streams, new_tokens):
            stream.length += 1
            stream.frames += 1
            self._record(stream, token)
        return list(zip(streams, frames))

    def _rows(self, streams: list[TalkerStream], padded: int):
        """The arena rows of a step: a slice when the streams are rows 0..B-1 and any padding lands on free
        rows (a view, no copy), else an index (padding on the scratch row)."""
        prefix = all(stream.row == i for i, stream in enumerate(streams))
        if prefix and (padded == len(streams) or (len(streams) == len(self.active) and padded <= self.slots)):
            return slice(0, padded)
        return torch.tensor([s.row for s in streams] + [self.scratch_row] * (padded - len(streams)),
                            device=self.device)

    def _predict_subcodes(self, past_hidden, last_id_hidden, streams, uniforms) -> torch.Tensor:
        """Codes 1..15 of the current frames: the code predictor's own small loop, all rows in lockstep."""
        predictor, batch = self.predictor, past_hidden.shape[0]
        embeds = predictor.small_to_mtp_projection(torch.cat((past_hidden, last_id_hidden), dim=1))
        cache = DynamicCache(config=predictor.config)
        seq_len, codes = 0, []
        warps = [s.subcode_warp for s in streams]
        tables = predictor.model.get_input_embeddings()
        for group in range(NUM_CODEBOOKS - 1):
            new = embeds.shape[1]
            positions = torch.arange(seq_len, seq_len + new, device=self.device)
            out = predictor.model(inputs_embeds=embeds,
                                  attention_mask=torch.ones((batch, seq_len + new), dtype=torch.long,
                                                            device=self.device),
                                  position_ids=positions.unsqueeze(0), past_key_values=cache, cache_position=positions,
                                  use_cache=True)
            seq_len += new
            logits = predictor.lm_head[group](out.last_hidden_state[:len(streams)])[:, -1, :].to(dtype=torch.float32)
            token = choose_tokens(logits, warps, [u[group] if u is not None else None for u in uniforms])
            if batch > len(streams):  # padding rows (fixed shapes) go on with code 0
                token = torch.nn.functional.pad(token, (0, batch - len(streams)))
            codes.append(token)
            if group < NUM_CODEBOOKS - 2:
                embeds = predictor.small_to_mtp_projection(tables[group](token[:, None]))
        return torch.stack(codes, dim=-1)

    def _choose_code0(self, logits, streams, uniforms, rows: slice) -> torch.Tensor:
        """The processors qwen-tts gives HF generate for code 0, per row: repetition penalty, min_new_tokens,
        suppressed control ids, then the warpers (sampled rows) or argmax (greedy rows)."""
        scores = penalise_repeats(logits, self.seen[rows], [s.params.repetition_penalty for s in streams])
        early = [i for i, s in enumerate(streams) if s.generated < s.params.min_new_tokens]
        if early:
            scores[early, self.eos] = -float("inf")
        scores = torch.where(self.suppress, -float("inf"), scores)
        return choose_tokens(scores, [s.code0_warp for s in streams], uniforms)

    def _record(self, stream: TalkerStream, token: int) -> None:
        stream.generated += 1
        self.next_tokens[stream.row] = token
        self.seen[stream.row, token] = True
        if token == self.eos:
            stream.finished, stream.finish_reason = True, "eos"
        elif stream.generated >= stream.params.max_new_tokens:
            # HF stops once max_new_tokens are sampled; the last one never becomes a frame.
            stream.finished, stream.finish_reason = True, "max_new_tokens"
