"""Exact streaming codec decoder: per-stream state makes chunked decoding equal one-shot decoding.

The 12 Hz decoder is strictly causal but sees 580 frames back (8 transformer layers with a 72-frame
sliding window, plus convolutions). Instead of re-decoding a short left context per chunk (an
approximation), each stream keeps exactly what the next chunk needs: the transformer's last 71 keys and
values per layer, every causal convolution's input tail, and each transposed convolution's last input
frame. Work per chunk is proportional to the chunk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

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


@dataclass
class DecoderState:
    """Everything one stream carries between chunks."""

    frames: int = 0  # frames decoded so far (the transformer's next position)
    tails: dict = field(default_factory=dict)  # convolution input tails, by module path
    keys: list = field(default_factory=list)  # per transformer layer: [1, kv_heads, <=window-1, head_dim]
    values: list = field(default_factory=list)

    def clone(self) -> "DecoderState":
        return DecoderState(self.frames, {k: v.clone() for k, v in self.tails.items()},
                            [k.clone() for k in self.keys], [v.clone() for v in self.values])


class StreamingDecoder:
    """Decodes [n,16] code chunks of a stream to float32 PCM, exactly as one decode of all frames would."""

    def __init__(self, speech_tokenizer_model):
        self.decoder = speech_tokenizer_model.decoder
        self.device = next(self.decoder.parameters()).device
        self.dtype = next(self.decoder.parameters()).dtype
        self.samples_per_frame = int(self.decoder.total_upsample)
        self.window = int(self.decoder.config.sliding_window)
        self.num_quantizers = int(self.decoder.config.num_quantizers)

    def new_state(self) -> DecoderState:
        return DecoderState()

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
        """Decode the next chunk of several streams in one forward; every chunk has the same frame count.

        Each row carries its own state (tails, cached keys, position), so each stream's audio is exactly
        what decoding it alone would give."""
        codes_t = torch.cat([self._codes_tensor(chunk) for chunk in chunks])  # [B, 16, n]
        frames = codes_t.shape[-1]
        if frames == 0:
            return [np.zeros(0, dtype=np.float32) for _ in states]
        dec = self.decoder
        hidden = dec.quantizer.decode(codes_t)
        hidden = self._conv(dec.pre_conv, hidden, states, "pre_conv").transpose(1, 2)
        hidden = self._transformer(hidden, states).permute(0, 2, 1)
        for i, (upsampler, convnext) in enumerate(dec.upsample):
            hidden = self._trans_conv(upsampler, hidden, states, f"upsample.{i}")
            hidden = self._convnext(convnext, hidden, states, f"upsample.{i}.convnext")
        for i, block in enumerate(dec.decoder):
            key = f"decoder.{i}"
            if isinstance(block, Qwen3TTSTokenizerV2CausalConvNet):
                hidden = self._conv(block, hidden, states, key)
            elif isinstance(block, Qwen3TTSTokenizerV2DecoderDecoderBlock):
                hidden = self._decoder_block(block, hidden, states, key)
            else:  # pointwise activations
                hidden = block(hidden)
        for state in states:
            state.frames += frames
        return list(hidden.clamp(min=-1, max=1)[:, 0].float().cpu().numpy())

    # -- stateful pieces (each row has its own state) ---------------------------------------------------

    @staticmethod
    def _with_tails(x: torch.Tensor, states: list[DecoderState], key: str, width: int) -> torch.Tensor:
        """``x`` with each row's previous input tail (zeros for a new stream) in front; stores the new tails."""
        tails = [state.tails.get(key) for state in states]
        if any(tail is None for tail in tails):
            zeros = x.new_zeros(1, x.shape[1], width)
            tails = [zeros if tail is None else tail for tail in tails]
        padded = torch.cat([torch.cat(tails), x], dim=-1)
        new_tails = padded[..., -width:]
        for row, state in enumerate(states):  # copies: a view would keep the whole padded input alive
            state.tails[key] = new_tails[row:row + 1].clone()
        return padded

    def _conv(self, module: Qwen3TTSTokenizerV2CausalConvNet, x: torch.Tensor, states: list[DecoderState],
              key: str):
        """Causal conv (stride 1): the one-shot left zero padding is replaced by the previous input tail."""
        if module.stride != 1:
            raise NotImplementedError("streaming decode supports stride-1 causal convolutions only")
        if module.padding == 0:
            return module.conv(x)
        return module.conv(self._with_tails(x, states, key, module.padding))

    def _trans_conv(self, module: Qwen3TTSTokenizerV2CausalTransConvNet, x: torch.Tensor,
                    states: list[DecoderState], key: str):
        """Causal transposed conv: output sample t depends on inputs t//s back to (t-k+1)//s."""
        kernel, stride = module.conv.kernel_size[0], module.conv.stride[0]
        context = math.ceil(kernel / stride) - 1
        length = x.shape[-1]
        if context == 0:
            return module.conv(x)[..., : length * stride]
        out = module.conv(self._with_tails(x, states, key, context))
        return out[..., context * stride: context * stride + length * stride]

    def _convnext(self, block, x: torch.Tensor, states: list[DecoderState], key: str):
        residual = x
        x = self._conv(block.dwconv, x, states, key + ".dwconv").permute(0, 2, 1)
        x = block.pwconv2(block.act(block.pwconv1(block.norm(x))))
        return residual + (block.gamma * x).permute(0, 2, 1)

    def _decoder_block(self, block: Qwen3TTSTokenizerV2DecoderDecoderBlock, x: torch.Tensor,
                       states: list[DecoderState], key: str):
        for j, layer in enumerate(block.block):
            sub = f"{key}.{j}"
            if isinstance(layer, Qwen3TTSTokenizerV2CausalTransConvNet):
                x = self._trans_conv(layer, x, states, sub)
            elif isinstance(layer, Qwen3TTSTokenizerV2DecoderDecoderResidualUnit):
                y = self._conv(layer.conv1, layer.act1(x), states, sub + ".conv1")
                x = x + self._conv(layer.conv2, layer.act2(y), states, sub + ".conv2")
            else:
                x = layer(x)
        return x

    def _transformer(self, x: torch.Tensor, states: list[DecoderState]) -> torch.Tensor:
        """The sliding-window transformer; each row attends to its own window of past keys and values."""
        model = self.decoder.pre_transformer
        x = model.input_proj(x)
        batch, n = x.shape[:2]
        device = x.device
        positions = torch.tensor([s.frames for s in states], device=device)[:, None] + torch.arange(n, device=device)
        cos, sin = model.rotary_emb(x, positions)
        keep = self.window - 1
        past_keys = [list(state.keys) or None for state in states]  # per row: one tensor per layer, or None
        past_values = [list(state.values) or None for state in states]
        pasts = [keys[0].shape[2] if keys else 0 for keys in past_keys]
        width = max(pasts)  # rows with a shorter past are padded on the left, and those keys masked out
        slots = torch.arange(width + n, device=device)
        key_pos = positions[:, :1] - width + slots[None, :]  # [B, width + n]
        real = slots[None, :] >= width - torch.tensor(pasts, device=device)[:, None]
        # Query at position p sees keys in (p - window, p], exactly the one-shot sliding-window mask.
        mask = real[:, None, :] & (key_pos[:, None, :] <= positions[:, :, None]) & \
            (key_pos[:, None, :] > positions[:, :, None] - self.window)
        mask = mask[:, None]  # [B, 1, n, width + n]
        for index, layer in enumerate(model.layers):
            attn = layer.self_attn
            residual = x
            h = layer.input_layernorm(x)
            shape = (batch, n, -1, attn.head_dim)
            q = attn.q_norm(attn.q_proj(h).view(shape)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(h).view(shape)).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if width:
                k_all = torch.cat([self._left_padded([p and p[index] for p in past_keys], k, width), k], dim=2)
                v_all = torch.cat([self._left_padded([p and p[index] for p in past_values], v, width), v], dim=2)
            else:
                k_all, v_all = k, v
            out = F.scaled_dot_product_attention(
                q, repeat_kv(k_all, attn.num_key_value_groups), repeat_kv(v_all, attn.num_key_value_groups),
                attn_mask=mask, scale=attn.scaling)
            out = attn.o_proj(out.transpose(1, 2).reshape(batch, n, -1))
            x = residual + layer.self_attn_layer_scale(out)
            x = x + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(x)))
            for row, state in enumerate(states):  # the last `keep` real keys of each row
                kept = min(pasts[row] + n, keep)
                k_keep, v_keep = k_all[row:row + 1, :, -kept:].clone(), v_all[row:row + 1, :, -kept:].clone()
                if index < len(state.keys):
                    state.keys[index], state.values[index] = k_keep, v_keep
                else:
                    state.keys.append(k_keep)
                    state.values.append(v_keep)
        return model.output_proj(model.norm(x))

    @staticmethod
    def _left_padded(pasts: list, like: torch.Tensor, width: int) -> torch.Tensor:
        """Each row's cached keys, right-aligned in ``width`` slots (zeros in front): [B, heads, width, dim]."""
        rows = []
        for past in pasts:
            length = 0 if past is None else past.shape[2]
            if length == width:
                rows.append(past)
                continue
            pad = like.new_zeros(1, like.shape[1], width - length, like.shape[3])
            rows.append(pad if past is None else torch.cat([pad, past], dim=2))
        return torch.cat(rows)


def prime(decoder: StreamingDecoder, context_codes) -> DecoderState:
    """A state that has already decoded ``context_codes`` (the voice's reference codes in ICL mode)."""
    state = decoder.new_state()
    if context_codes is not None and len(context_codes):
        decoder.decode(state, context_codes)
    return state
