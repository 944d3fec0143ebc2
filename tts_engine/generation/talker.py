"""Codec-frame generation for many utterances at once, each exactly equal to qwen-tts ``generate``.

The prompt embeddings are built by qwen-tts itself (its ``generate`` runs up to the point where it would
hand over to HF ``generate``) and prefilled through the model's own modules. Decoding is ``DecodeStep``: one
launch-free function advances a bucket of streams by one frame over KV blocks given out as streams grow. Each
stream keeps its own sampling parameters and noise: on the reference path the noise comes from the request's own
``torch.Generator``, drawn in qwen-tts's order, so its codes equal qwen-tts's sampled codes; on the counter path
it is a hash of (seed, frame, codebook, token), drawn inside the step (what a CUDA graph can replay). Either
way a stream's codes do not depend on its neighbours. No state lives on the shared model object (the upstream
talker stores ``rope_deltas`` on the module, which breaks concurrent streams).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.cache_utils import DynamicCache

from tts_contract.audio import NUM_CODEBOOKS
from tts_contract.limits import DEFAULT_ACTIVE_STREAMS, MAX_NEW_TOKENS_LIMIT, PROMPT_TOKENS

from ..errors import InvalidRequest
from ..graphs import CapturedGraphs, batch_buckets, capture_talker_steps, padded_size
from .decode_step import GREEDY, DecodeStep, RowState
from .kv_blocks import BlockPool, OutOfBlocks
from .noise import CODE0_GROUP, exponential_noise, noise_keys
from .prompt import SynthesisRequest, build_talker_inputs
from .sampling import choose, code0_scores, draw_uniforms, new_generator
from .text_feed import ROLE_IDS, SUFFIX_IDS

log = logging.getLogger(__name__)
NOISE_MODES = ("reference", "counter")
CANDIDATES = 64  # sampled rows with top_k up to this choose among their best CANDIDATES (no full sort)
TEXT_ROWS_MIN = 8


@dataclass(eq=False)
class TalkerStream:
    """One utterance in the batch: its request, its row of the state, and how far it got."""

    request: SynthesisRequest
    row: int
    length: int  # tokens in its KV blocks
    trailing_text: torch.Tensor  # [text tokens, hidden]: one is added to each step's input, then tts_pad
    tts_pad: torch.Tensor  # [hidden]
    generator: Optional[torch.Generator]  # the reference path's noise
    key: int = 0  # the engine's id of this stream (set when it starts)
    generated: int = 0  # code-0 tokens sampled so far (frames + the next one)
    frames: int = 0
    finished: bool = False
    finish_reason: Optional[str] = None
    text_open: bool = False  # more text may come: past the trailing text the row waits (never pad or eos)
    fed_ids: int = 0  # ids of its text feed turned into trailing text so far
    tts_eos: Optional[torch.Tensor] = None  # [hidden]: follows the text once it is closed

    @property
    def params(self):
        return self.request.params

    def text_ready(self) -> bool:
        """Whether this row's next text input is known (so it may step)."""
        return not self.text_open or self.frames < self.trailing_text.shape[0]

    def text_input(self) -> torch.Tensor:
        """What this step adds to the codec embeddings: the next text token, or tts_pad after the text."""
        if self.frames < self.trailing_text.shape[0]:
            return self.trailing_text[self.frames]
        if self.text_open:
            raise RuntimeError("a row waiting for its text must not step")
        return self.tts_pad


def context_buckets(max_blocks: int, smallest: int = 8) -> tuple[int, ...]:
    """The KV spans a step attends over, in blocks: powers of two from ``smallest`` (a prompt fills a few blocks)
    below the longest, then the longest."""
    return tuple(size for size in batch_buckets(max_blocks) if size >= min(smallest, max_blocks))


class BatchedTalker:
    """The talker and code predictor over up to ``rows`` streams: ``add`` prefills one stream, ``step`` advances
    streams by one frame, ``remove`` frees a row. Not thread-safe: one thread drives it.

    ``pool_tokens``: the KV pool, in tokens, shared by all rows (blocks are given out as streams grow; one row
    may hold up to ``max_tokens``). ``pad_batches``: a step pads its batch to the next of ``batch_buckets`` and
    its KV span to the next of ``context_buckets``, so each bucket's step has the same shapes every time (what a
    CUDA graph needs; on a CPU the padding is pure cost). ``noise``: "reference" or "counter" (see the module)."""

    def __init__(self, tts, rows: int = DEFAULT_ACTIVE_STREAMS, max_tokens: int = MAX_NEW_TOKENS_LIMIT + PROMPT_TOKENS,
                 pool_tokens: Optional[int] = None,
                 pad_batches: bool = False, noise: str = "reference"):
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, not {noise!r}")
        model = tts.model
        self.tts = tts
        self.talker = model.talker
        self.device = self.talker.device
        config = self.talker.config
        self.rows, self.max_tokens, self.noise = rows, max_tokens, noise
        self.buckets = batch_buckets(rows) if pad_batches else None
        self.vocab = config.vocab_size
        self.sub_vocab = self.talker.code_predictor.config.vocab_size
        self.eos = config.codec_eos_token_id
        self.scratch_row = rows  # padding rows step here, never in a stream's row
        self.pool = BlockPool(config, rows + 1, max_tokens, pool_tokens or rows * 1024, self.device,
                              self.talker.dtype)
        self.state = RowState.allocate(rows + 1, config.hidden_size, self.vocab, self.device, self.talker.dtype)
        suppress = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        suppress[[i for i in range(self.vocab - 1024, self.vocab) if i != self.eos]] = True  # as qwen-tts
        self.step_function = DecodeStep(self.talker, self.pool, self.state, suppress, self.eos, self.scratch_row)
        self.active: list[TalkerStream] = []
        self._free_rows = list(range(rows - 1, -1, -1))
        self.graphs: Optional[CapturedGraphs] = None
        log.info("talker KV pool: %d blocks of %d tokens = %.1f MiB (%s on %s; %.0f KiB per token); %d rows",
                 self.pool.blocks, self.pool.block_tokens, self.pool.nbytes / 2**20,
                 str(self.talker.dtype).replace("torch.", ""), self.device, self.pool.bytes_per_token / 1024, rows)

    def __len__(self) -> int:
        return len(self.active)

    def capture_graphs(self) -> None:
        """On CUDA, on the counter path with padded batches: capture the step for every (batch, KV span) bucket,
        before serving; steps then replay them (one launch per step)."""
        if not str(self.device).startswith("cuda") or self.noise != "counter" or self.buckets is None:
            raise RuntimeError("CUDA graphs need a CUDA device, counter noise and padded batches")
        with torch.inference_mode():
            self.graphs = capture_talker_steps(self.step_function, self.buckets, context_buckets(self.pool.max_blocks),
                                               self.talker.config.hidden_size, self.talker.dtype, self.device,
                                               CANDIDATES)

    def buckets_up_to_rows(self) -> tuple[int, ...]:
        return batch_buckets(self.rows)

    # -- admission ------------------------------------------------------------------------------------------

    def add(self, request: SynthesisRequest) -> TalkerStream:
        """Prefill one stream (see ``add_many``); raises what its request failed with."""
        (result,) = self.add_many([request])
        if isinstance(result, BaseException):
            raise result
        return result

    @torch.inference_mode()
    def add_many(self, requests: list[SynthesisRequest]) -> list:
        """Build each prompt (qwen-tts's construction), prefill them together in one forward (padded to the
        longest), and sample each first code 0. Returns, per request, its stream (which may already be finished:
        EOS or max_new_tokens before any frame) or the exception it failed with; a failure is its own."""
        results: list = [None] * len(requests)
        admitted = []  # (index, request, inputs, row)
        for index, request in enumerate(requests):
            try:
                if len(self._free_rows) <= len(admitted):
                    raise RuntimeError("no free talker row")  # the scheduler admits within capacity
                inputs = build_talker_inputs(self.tts, request)
                length = inputs["inputs_embeds"].shape[1]
                if length + request.params.max_new_tokens > self.max_tokens:
                    raise InvalidRequest(f"prompt of {length} tokens + max_new_tokens {request.params.max_new_tokens}"
                                         f" exceeds the talker's {self.max_tokens}-token context")
                row = self._free_rows[-1 - len(admitted)]
                self.pool.ensure(row, length + 1)
                admitted.append((index, request, inputs, row))
            except BaseException as exc:  # noqa: BLE001 - handed back for that request alone
                results[index] = exc
        if not admitted:
            return results
        for _ in admitted:
            self._free_rows.pop()
        try:
            logits = self._prefill([(inputs["inputs_embeds"], row) for _, _, inputs, row in admitted])
        except BaseException as exc:
            for index, _, _, row in admitted:
                self.pool.release(row)
                self._free_rows.append(row)
                results[index] = exc
            return results
        streams = [self._start(request, inputs, row) for _, request, inputs, row in admitted]
        self._first_codes(streams, logits)
        for (index, _, _, _), stream in zip(admitted, streams):
            results[index] = stream
        return results

    def _prefill(self, prompts: list) -> torch.Tensor:
        """Run the prompts ([(embeds [1, T, H], row)]) through the talker's own forward, padded to the longest,
        into their rows' blocks; each row's last hidden state goes to the state. Returns the code-0 logits
        [N, V] at each prompt's end."""
        lengths = [embeds.shape[1] for embeds, _ in prompts]
        longest = max(lengths)
        embeds = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[1])) for e, _ in prompts])
        mask = (torch.arange(longest, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None])
        positions = torch.arange(longest, device=self.device)
        cache = DynamicCache(config=self.talker.config)
        out = self.talker.model(inputs_embeds=embeds, attention_mask=mask.long(),
                                position_ids=positions.view(1, 1, -1).expand(3, len(prompts), -1),
                                past_key_values=cache, cache_position=positions, use_cache=True)
        logits = self.talker.codec_head(out.last_hidden_state).to(torch.float32)  # as upstream: every position
        ends = torch.tensor(lengths, device=self.device) - 1
        for index, ((_, row), length) in enumerate(zip(prompts, lengths)):
            self.pool.write_prompt(row, [layer.keys[index] for layer in cache.layers],
                                   [layer.values[index] for layer in cache.layers], length)
            self.state.past_hidden[row] = out.last_hidden_state[index, length - 1]
            self.state.lengths[row] = length
        return logits[torch.arange(len(prompts), device=self.device), ends]

    def _start(self, request: SynthesisRequest, inputs: dict, row: int) -> TalkerStream:
        """A prefilled request's stream, its parameters and counts in its row."""
        params = request.params
        sampled = params.do_sample or params.subtalker_do_sample
        stream = TalkerStream(request=request, row=row, length=inputs["inputs_embeds"].shape[1],
                              trailing_text=inputs["trailing_text_hidden"][0],
                              tts_pad=inputs["tts_pad_embed"].reshape(-1),
                              generator=new_generator(self.device, params.seed) if sampled and
                              self.noise == "reference" else None)
        if inputs.get("text_open"):  # the rest of the text is fed as it commits
            stream.text_open = True
            stream.tts_eos = stream.trailing_text[-1]  # the construction ends the text it saw with tts_eos
            if not request.icl:  # the prefill holds the first text id; the rest is projected here
                stream.fed_ids, stream.trailing_text = ROLE_IDS + 1, stream.trailing_text[:0]
            else:  # ICL: the text past the reference frames' alignment is already trailing text
                stream.fed_ids, stream.trailing_text = inputs["fed_ids"], stream.trailing_text[:-1]
            self.feed_text(stream)
        state = self.state
        state.set_params(row, params)
        state.seed[row] = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
        state.seen[row] = False
        state.generated[row] = 0
        self.active.append(stream)
        return stream

    def _first_codes(self, streams: list[TalkerStream], logits: torch.Tensor) -> None:
        """Sample each new stream's first code 0 from its prompt's logits (the step's choice, rows at once)."""
        state = self.state
        rows = torch.tensor([s.row for s in streams], device=self.device)
        scores = code0_scores(logits, state.seen[rows], state.penalty[rows], state.min_new[rows] > 0,
                              self.step_function.eos_onehot, self.step_function.suppress)
        if self.noise == "reference":
            noise = self._reference_noise(streams, subcodes=False, code0=True)[1]
        else:
            noise = exponential_noise(noise_keys(state.seed[rows], state.generated[rows])[:, CODE0_GROUP],
                                      torch.arange(self.vocab, device=self.device))
        tokens = choose(scores, state.temperature[rows], state.top_k[rows], state.top_p_cut[rows],
                        state.use_top_p[rows], state.sample[rows], noise)
        state.next_token[rows] = tokens
        state.seen[rows, tokens] = True
        state.generated[rows] = 1
        for stream, token in zip(streams, tokens.tolist()):
            self._record(stream, token)

    def ready_to_start(self, request: SynthesisRequest) -> bool:
        """Whether a request's prompt can be built exactly as for its whole text (its text may still be arriving):
        an x-vector voice, a named speaker or a designed voice needs its first text id; an ICL voice enough text
        to fill the alignment of its reference text and frames (qwen-tts lines reference text + text + tts_eos up
        with codec_bos + the reference frames: the prefill must hold no tts_eos while the text is open)."""
        if not request.text_open:
            return True
        prompt = request.prompt
        if not request.icl:
            return request.feed.text_ids >= 1
        reference_ids = prompt.ref_text_ids(self.tts).shape[1] - ROLE_IDS - 2  # qwen-tts reads ref_ids[:, 3:-2]
        return request.feed.text_ids >= max(1, len(prompt.ref_code) + 1 - reference_ids)

    @torch.inference_mode()
    def feed_text(self, stream: TalkerStream) -> None:
        """Turn the ids its text feed committed since the last call into trailing text (and, once the feed is
        closed, tts_eos after them: from then on the row never waits)."""
        if not stream.text_open:
            return
        ids, closed = stream.request.feed.snapshot()  # together: a close in between would pass its turn end as text
        new = ids[stream.fed_ids: len(ids) - SUFFIX_IDS if closed else len(ids)]
        rows = [self._text_rows(new)] if new else []
        if closed:
            rows.append(stream.tts_eos[None])
        if rows:
            stream.trailing_text = torch.cat([stream.trailing_text, *rows])
            stream.fed_ids += len(new)
        stream.text_open = not closed

    def _text_rows(self, ids: list) -> torch.Tensor:
        """Text ids projected into the talker's space, one row each: [len(ids), hidden]. Run over at least
        TEXT_ROWS_MIN rows: on CPU a matrix product of one or two rows rounds differently from a longer one, and
        qwen-tts projects the whole text at once."""
        padded = ids + [ids[-1]] * max(0, TEXT_ROWS_MIN - len(ids))
        tensor = torch.tensor([padded], dtype=torch.long, device=self.device)
        return self.talker.text_projection(self.talker.get_text_embeddings()(tensor))[0, :len(ids)]

    def remove(self, stream: TalkerStream) -> None:
        """Free a stream's row and its KV blocks."""
        if stream not in self.active:
            raise ValueError("stream is not active")
        self.active.remove(stream)
        self.pool.release(stream.row)
        self._free_rows.append(stream.row)

    # -- one step --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, streams: Optional[list[TalkerStream]] = None) -> list[tuple[TalkerStream, torch.Tensor]]:
        """Advance ``streams`` (default: every active stream) by one frame: [(stream, its 16 codes on the CPU)].
        Streams left out keep their state untouched (a row waiting for its deadline or its text)."""
        streams = self.active if streams is None else streams
        if any(s.finished for s in streams):
            raise RuntimeError("finished streams must be removed before the next step")
        streams = [s for s in streams if s.text_ready() and self._room_for_next_key(s)]
        if not streams:
            return []
        rows, text, blocks, noise_sub, noise_code0, candidates = self.prepare(streams)
        if self.graphs is not None and candidates == CANDIDATES:
            frames, tokens = self.graphs.run((rows.shape[0], blocks), rows, text)
        else:  # (on a GPU with graphs: a request with top_k 0 or beyond CANDIDATES steps eagerly)
            frames, tokens = self.step_function(rows, text, blocks, noise_sub, noise_code0, candidates)
        batch = len(streams)
        frames, tokens = frames[:batch].cpu(), tokens[:batch].tolist()  # the step's one host synchronisation
        for stream, token in zip(streams, tokens):
            stream.length += 1
            stream.frames += 1
            self._record(stream, token)
        return list(zip(streams, frames))

    def prepare(self, streams: list[TalkerStream]) -> tuple:
        """The decode step's arguments for ``streams``: rows padded to the bucket, text inputs, the KV span in
        blocks, the reference noise (None on the counter path), and how many candidates the choice looks at."""
        batch = len(streams)
        padded = padded_size(batch, self.buckets)
        rows = torch.tensor([s.row for s in streams] + [self.scratch_row] * (padded - batch), device=self.device)
        text = torch.nn.functional.pad(torch.stack([s.text_input() for s in streams]), (0, 0, 0, padded - batch))
        blocks = self.pool.blocks_for(max(s.length for s in streams) + 1)
        if self.buckets is not None:
            blocks = padded_size(blocks, context_buckets(self.pool.max_blocks))
        noise_sub = noise_code0 = None
        exact = self.noise == "reference"
        if not any(s.params.do_sample or s.params.subtalker_do_sample for s in streams):
            candidates = GREEDY
        elif all(self._within_candidates(s.params, exact) for s in streams):
            candidates = CANDIDATES
        else:
            candidates = 0  # the whole vocabulary: HF's arithmetic, top-p included, to the last bit
        if exact and candidates != GREEDY:
            noise_sub, noise_code0 = self._reference_noise(streams, subcodes=True, code0=True, padded=padded)
        return rows, text, blocks, noise_sub, noise_code0, candidates

    @staticmethod
    def _within_candidates(params, exact: bool) -> bool:
        """Whether every token this request can sample is among the CANDIDATES best (and, where the choice must
        be HF's to the last bit, it uses no top-p), or it samples nothing."""
        return all(not sample or (0 < top_k <= CANDIDATES and not (exact and top_p < 1.0)) for sample, top_k, top_p in (
            (params.do_sample, params.top_k, params.top_p),
            (params.subtalker_do_sample, params.subtalker_top_k, params.subtalker_top_p)))

    def _room_for_next_key(self, stream: TalkerStream) -> bool:
        """A new block every BLOCK_TOKENS steps; with the pool empty (admission reserves against that) the stream
        sits this step out rather than failing."""
        try:
            self.pool.ensure(stream.row, stream.length + 1)
            return True
        except OutOfBlocks:
            log.warning("stream in row %d waits for a free KV block", stream.row)
            return False

    def free_tokens(self) -> int:
        """Tokens the KV pool can still give out."""
        return self.pool.free_blocks * self.pool.block_tokens

    def _reference_noise(self, streams, subcodes: bool, code0: bool, padded: Optional[int] = None):
        """Each stream's noise from its own generator, in qwen-tts's order (15 sub-code draws, then one code-0
        draw; greedy heads draw nothing): Exponential(1) as ``-log1p(-u)``, the numbers CPU ``multinomial``
        uses. Rows that draw nothing (greedy, padding) get ones."""
        padded = padded or len(streams)
        sub = torch.ones(padded, NUM_CODEBOOKS - 1, self.sub_vocab, device=self.device) if subcodes else None
        zero = torch.ones(padded, self.vocab, device=self.device) if code0 else None
        for index, stream in enumerate(streams):
            params = stream.params
            sub_count = (NUM_CODEBOOKS - 1) * self.sub_vocab if subcodes and params.subtalker_do_sample else 0
            code0_count = self.vocab if code0 and params.do_sample else 0
            if not sub_count + code0_count:
                continue
            exponentials = (-torch.log1p(-draw_uniforms(stream.generator, sub_count + code0_count))).to(torch.float32)
            if sub_count:
                sub[index] = exponentials[:sub_count].view(NUM_CODEBOOKS - 1, self.sub_vocab)
            if code0_count:
                zero[index] = exponentials[sub_count:]
        return sub, zero

    def _record(self, stream: TalkerStream, token: int) -> None:
        stream.generated += 1
        if token == self.eos:
            stream.finished, stream.finish_reason = True, "eos"
        elif stream.generated >= stream.params.max_new_tokens or (
                not stream.text_open and stream.generated >= stream.params.frame_cap(len(stream.request.text))):
            # HF stops once max_new_tokens are sampled; the last one never becomes a frame. Text still being
            # written is never cut short by its length so far.
            stream.finished, stream.finish_reason = True, "max_new_tokens"
