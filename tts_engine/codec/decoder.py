"""Exact streaming codec decoder: per-stream state makes chunked decoding equal one-shot decoding.

The 12 Hz decoder is strictly causal but sees 580 frames back (8 transformer layers with a 72-frame
sliding window, plus convolutions). Instead of re-decoding a short left context per chunk (an
approximation), each stream keeps exactly what the next chunk needs: the transformer's last 71 keys and
values per layer, every causal convolution's input tail, and each transposed convolution's last input
frame. Work per chunk is proportional to the chunk.

Those states are rows of one preallocated tensor (``DecoderSlots``); a decode is one static step over a bucket
of (streams, frames): gather the rows, run the decoder, write the rows back, with no host synchronisation and
no allocation that depends on values, so torch dynamo traces it as one graph and a GPU replays it as one.
"""
from __future__ import annotations

import math
import logging
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import (
    Qwen3TTSTokenizerV2CausalConvNet,
    Qwen3TTSTokenizerV2CausalTransConvNet,
    Qwen3TTSTokenizerV2DecoderDecoderBlock,
    Qwen3TTSTokenizerV2DecoderDecoderResidualUnit,
    apply_rotary_pos_emb,
    repeat_kv,
)

from ..graphs import CapturedGraphs, padded_size
from .slots import SCRATCH_ROW, DecoderSlots, DecoderState

log = logging.getLogger(__name__)


class StreamingDecoder:
    """Decodes [n,16] code chunks of a stream to float32 PCM, exactly as one decode of all frames would.
    ``capacity``: state rows to start with (the table grows when more streams are open); ``buckets``: batch sizes
    a decode pads to with the scratch row (what captured graphs need; None: no padding)."""

    def __init__(self, speech_tokenizer_model, capacity: int = 16, buckets: Optional[tuple[int, ...]] = None):
        self.decoder = speech_tokenizer_model.decoder
        self.device = next(self.decoder.parameters()).device
        self.dtype = next(self.decoder.parameters()).dtype
        self.samples_per_frame = int(self.decoder.total_upsample)
        self.window = int(self.decoder.config.sliding_window)
        self.num_quantizers = int(self.decoder.config.num_quantizers)
        self.layout = state_layout(self.decoder)
        width = sum(math.prod(shape) for _, shape in self.layout.values())
        self.slots = DecoderSlots(width, self.dtype, self.device, capacity)
        self.buckets = buckets
        self.graphs: Optional[CapturedGraphs] = None
        self._graphs_generation = 0

    def new_state(self) -> DecoderState:
        return DecoderState(self.slots)

    def warm_up(self, max_batch: int) -> None:
        """Decode once in the shapes the first requests use (1, 2 and up to 4 streams of 1 to 16 frames), so
        that they find every code path and buffer ready."""
        for batch in sorted({1, 2, min(4, max_batch)}):
            for frames in (1, 2, 3, 4, 8, 16):
                self.decode_batch([self.new_state() for _ in range(batch)],
                                  [np.zeros((frames, self.num_quantizers), dtype=np.int32)] * batch)

    def chunk_costs(self, sizes=(1, 2, 4, 8, 16), rounds: int = 5) -> dict[int, float]:
        """Seconds to decode one chunk of each size for a stream past its attention window (the fastest of
        ``rounds``: measured while other models load): what sending a chunk of that size costs, for pacing."""
        import time

        state = self.new_state()
        self.decode(state, np.zeros((self.window, self.num_quantizers), dtype=np.int32))
        costs = {}
        for frames in sizes:
            chunk = np.zeros((frames, self.num_quantizers), dtype=np.int32)
            timings = []
            for _ in range(rounds):
                trial = state.clone()
                started = time.perf_counter()
                self.decode(trial, chunk)
                timings.append(time.perf_counter() - started)
            costs[frames] = min(timings)
        return costs

    def capture_graphs(self, frame_buckets=(1, 2, 4, 8, 16)) -> None:
        """On CUDA with padded batches: capture the step for every (streams, frames) bucket before serving (the
        frame buckets: the pacing ladder's chunk sizes; other sizes decode eagerly)."""
        if not str(self.device).startswith("cuda") or self.buckets is None:
            raise RuntimeError("CUDA graphs need a CUDA device and padded batches")
        graphs = CapturedGraphs()
        with torch.inference_mode():
            for batch in self.buckets:
                rows = torch.full((batch,), SCRATCH_ROW, dtype=torch.long, device=self.device)
                for frames in frame_buckets:
                    codes = torch.zeros(batch, self.num_quantizers, frames, dtype=torch.long, device=self.device)
                    graphs.capture((batch, frames), self.step, rows, codes)
        self.graphs, self._graphs_generation = graphs, self.slots.generation
        log.info("captured %d codec-decoder graphs (streams %s, frames %s)", len(graphs.graphs),
                 list(self.buckets), list(frame_buckets))

    def piece(self, state: DecoderState, key: str) -> torch.Tensor:
        """A view of one piece of a stream's state (a ``layout`` key), for inspection and tests."""
        offset, shape = self.layout[key]
        return self.slots.values[state.row, offset: offset + math.prod(shape)].view(shape)

    def _codes_tensor(self, codes) -> torch.Tensor:
        codes = torch.as_tensor(np.asarray(codes) if not torch.is_tensor(codes) else codes)
        if codes.ndim != 2 or codes.shape[1] != self.num_quantizers:
            raise ValueError(f"codes must have shape [frames, {self.num_quantizers}], got {list(codes.shape)}")
        return codes.to(device=self.device, dtype=torch.long).clamp(min=0).T.unsqueeze(0)  # [1, 16, n]

    @torch.inference_mode()
    def decode_full(self, codes) -> np.ndarray:
        """One-shot reference decode of all frames (the upstream decoder's forward)."""
        codes_t = self._codes_tensor(codes)
        if codes_t.shape[-1] == 0:
            return np.zeros(0, dtype=np.float32)
        return self.decoder(codes_t)[0, 0].float().cpu().numpy()

    @torch.inference_mode()
    def decode(self, state: DecoderState, codes) -> np.ndarray:
        """Decode the next frames of a stream; returns len(codes) * samples_per_frame samples."""
        return self.decode_batch([state], [codes])[0]

    @torch.inference_mode()
    def decode_batch(self, states: list[DecoderState], chunks: list) -> list[np.ndarray]:
        """Decode the next chunk of several streams in one step; every chunk has the same frame count.

        Each row carries its own state (tails, cached keys, position), so each stream's audio is exactly
        what decoding it alone would give."""
        codes = torch.cat([self._codes_tensor(chunk) for chunk in chunks])  # [B, 16, n]
        batch, frames = len(states), codes.shape[-1]
        if frames == 0:
            return [np.zeros(0, dtype=np.float32) for _ in states]
        rows = [state.row for state in states]
        if len(set(rows)) != len(rows):
            raise ValueError("a stream can decode only one chunk per step")
        size = padded_size(batch, self.buckets)
        rows_t = torch.tensor(rows + [SCRATCH_ROW] * (size - batch), device=self.device)
        if size > batch:
            codes = torch.cat([codes, codes.new_zeros(size - batch, *codes.shape[1:])])
        if self.graphs is not None and self._graphs_generation != self.slots.generation:
            log.warning("decoder state table grew to %d rows: captured graphs dropped", self.slots.capacity)
            self.graphs = None
        if self.graphs is not None and (size, frames) in self.graphs:
            audio = self.graphs.run((size, frames), rows_t, codes)
        else:
            audio = self.step(rows_t, codes)
        return list(audio[:batch].float().cpu().numpy())  # the one host synchronisation

    def step(self, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The static step: decode ``codes`` [B, 16, n] for the state rows ``rows`` [B] (padding: the scratch
        row), updating those rows in place; returns audio [B, n * samples_per_frame]. In inference mode."""
        slots = self.slots
        run = _StepRows(slots.values.index_select(0, rows), self.layout)
        start = slots.frames.index_select(0, rows)  # [B]: each row's next position
        frames = codes.shape[-1]
        dec = self.decoder
        hidden = dec.quantizer.decode(codes)
        hidden = self._conv(dec.pre_conv, hidden, run, "pre_conv").transpose(1, 2)
        hidden = self._transformer(hidden, start, run).permute(0, 2, 1)
        for i, (upsampler, convnext) in enumerate(dec.upsample):
            hidden = self._trans_conv(upsampler, hidden, run, f"upsample.{i}.0")
            hidden = self._convnext(convnext, hidden, run, f"upsample.{i}.1")
        for i, block in enumerate(dec.decoder):
            key = f"decoder.{i}"
            if isinstance(block, Qwen3TTSTokenizerV2CausalConvNet):
                hidden = self._conv(block, hidden, run, key)
            elif isinstance(block, Qwen3TTSTokenizerV2DecoderDecoderBlock):
                hidden = self._decoder_block(block, hidden, run, key)
            else:  # pointwise activations
                hidden = block(hidden)
        slots.values.index_copy_(0, rows, run.packed())
        slots.frames.index_copy_(0, rows, start + frames)
        return hidden.clamp(min=-1, max=1)[:, 0]

    # -- stateful pieces (each row has its own state) ---------------------------------------------------

    @staticmethod
    def _with_tail(x: torch.Tensor, run: "_StepRows", key: str) -> torch.Tensor:
        """``x`` with each row's previous input tail in front (zeros for a new stream); keeps the new tail."""
        tail = run.read(key)
        padded = torch.cat([tail, x], dim=-1)
        run.write(key, padded[..., -tail.shape[-1]:])
        return padded

    def _conv(self, module: Qwen3TTSTokenizerV2CausalConvNet, x: torch.Tensor, run: "_StepRows", key: str):
        """Causal conv (stride 1): the one-shot left zero padding is replaced by the previous input tail."""
        if module.stride != 1:
            raise NotImplementedError("streaming decode supports stride-1 causal convolutions only")
        if module.padding == 0:
            return module.conv(x)
        return module.conv(self._with_tail(x, run, key))

    def _trans_conv(self, module: Qwen3TTSTokenizerV2CausalTransConvNet, x: torch.Tensor, run: "_StepRows",
                    key: str):
        """Causal transposed conv: output sample t depends on inputs t//s back to (t-k+1)//s."""
        stride = module.conv.stride[0]
        context = _trans_conv_context(module)
        length = x.shape[-1]
        if context == 0:
            return module.conv(x)[..., : length * stride]
        out = module.conv(self._with_tail(x, run, key))
        return out[..., context * stride: context * stride + length * stride]

    def _convnext(self, block, x: torch.Tensor, run: "_StepRows", key: str):
        residual = x
        x = self._conv(block.dwconv, x, run, key + ".dwconv").permute(0, 2, 1)
        x = block.pwconv2(block.act(block.pwconv1(block.norm(x))))
        return residual + (block.gamma * x).permute(0, 2, 1)

    def _decoder_block(self, block: Qwen3TTSTokenizerV2DecoderDecoderBlock, x: torch.Tensor, run: "_StepRows",
                       key: str):
        for j, layer in enumerate(block.block):
            sub = f"{key}.block.{j}"
            if isinstance(layer, Qwen3TTSTokenizerV2CausalTransConvNet):
                x = self._trans_conv(layer, x, run, sub)
            elif isinstance(layer, Qwen3TTSTokenizerV2DecoderDecoderResidualUnit):
                y = self._conv(layer.conv1, layer.act1(x), run, sub + ".conv1")
                x = x + self._conv(layer.conv2, layer.act2(y), run, sub + ".conv2")
            else:
                x = layer(x)
        return x

    def _transformer(self, x: torch.Tensor, start: torch.Tensor, run: "_StepRows") -> torch.Tensor:
        """The sliding-window transformer; each row attends to its own window of past keys and values, kept
        right-aligned in ``window - 1`` slots (slots before a young stream's first frame are masked out)."""
        model = self.decoder.pre_transformer
        x = model.input_proj(x)
        batch, n = x.shape[:2]
        device = x.device
        positions = start[:, None] + torch.arange(n, device=device)  # [B, n]
        cos, sin = model.rotary_emb(x, positions)
        keep = self.window - 1
        key_pos = start[:, None] - keep + torch.arange(keep + n, device=device)[None, :]  # [B, keep + n]
        # Query at position p sees keys in (p - window, p], exactly the one-shot sliding-window mask; slots
        # before position 0 hold nothing.
        mask = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= positions[:, :, None]) & \
            (key_pos[:, None, :] > positions[:, :, None] - self.window)
        mask = mask[:, None]  # [B, 1, n, keep + n]
        past = run.read("attention")  # [B, 2, layers, kv_heads, keep, head_dim]
        kept = []
        for index, layer in enumerate(model.layers):
            attn = layer.self_attn
            residual = x
            h = layer.input_layernorm(x)
            shape = (batch, n, -1, attn.head_dim)
            q = attn.q_norm(attn.q_proj(h).view(shape)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(h).view(shape)).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k_all = torch.cat([past[:, 0, index], k], dim=2)
            v_all = torch.cat([past[:, 1, index], v], dim=2)
            out = F.scaled_dot_product_attention(
                q, repeat_kv(k_all, attn.num_key_value_groups), repeat_kv(v_all, attn.num_key_value_groups),
                attn_mask=mask, scale=attn.scaling)
            out = attn.o_proj(out.transpose(1, 2).reshape(batch, n, -1))
            x = residual + layer.self_attn_layer_scale(out)
            x = x + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(x)))
            kept.append(torch.stack([k_all[:, :, -keep:], v_all[:, :, -keep:]], dim=1))
        run.write("attention", torch.stack(kept, dim=2))
        return model.output_proj(model.norm(x))


class _StepRows:
    """One step's view of its rows' states: ``read`` slices a piece of the gathered rows, ``write`` keeps its
    new value, ``packed`` lays the new values out as rows again (every piece must have been written)."""

    def __init__(self, rows: torch.Tensor, layout: dict):
        self.rows, self.layout, self.new = rows, layout, {}

    def read(self, key: str) -> torch.Tensor:
        offset, shape = self.layout[key]
        return self.rows[:, offset: offset + math.prod(shape)].view(-1, *shape)

    def write(self, key: str, value: torch.Tensor) -> None:
        self.new[key] = value

    def packed(self) -> torch.Tensor:
        batch = self.rows.shape[0]
        return torch.cat([self.new[key].reshape(batch, -1) for key in self.layout], dim=1)


def _trans_conv_context(module) -> int:
    kernel, stride = module.conv.kernel_size[0], module.conv.stride[0]
    return math.ceil(kernel / stride) - 1


def state_layout(decoder) -> dict:
    """Where each piece of a stream's state sits in its row: {key: (offset, shape)}. Keys are module paths: every
    causal convolution with left padding keeps its input tail, every transposed convolution that overlaps frames
    its last inputs, and "attention" the transformer's last window - 1 keys and values per layer."""
    pieces = {}
    for name, module in decoder.named_modules():
        if isinstance(module, Qwen3TTSTokenizerV2CausalConvNet) and module.padding:
            pieces[name] = (module.conv.in_channels, module.padding)
        elif isinstance(module, Qwen3TTSTokenizerV2CausalTransConvNet) and _trans_conv_context(module):
            pieces[name] = (module.conv.in_channels, _trans_conv_context(module))
    transformer = decoder.pre_transformer
    attention = transformer.layers[0].self_attn
    pieces["attention"] = (2, len(transformer.layers), transformer.config.num_key_value_heads,
                           int(decoder.config.sliding_window) - 1, attention.head_dim)
    layout, offset = {}, 0
    for key, shape in pieces.items():
        layout[key] = (offset, shape)
        offset += math.prod(shape)
    return layout


def prime(decoder: StreamingDecoder, context_codes) -> DecoderState:
    """A state that has already decoded ``context_codes`` (the voice's reference codes in ICL mode)."""
    state = decoder.new_state()
    if context_codes is not None and len(context_codes):
        decoder.decode(state, context_codes)
    return state
