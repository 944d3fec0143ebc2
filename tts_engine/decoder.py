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
        codes_t = self._codes_tensor(codes)
        if codes_t.shape[-1] == 0:
            return np.zeros(0, dtype=np.float32)
        dec = self.decoder
        hidden = dec.quantizer.decode(codes_t)
        hidden = self._conv(dec.pre_conv, hidden, state, "pre_conv").transpose(1, 2)
        hidden = self._transformer(hidden, state).permute(0, 2, 1)
        for i, (upsampler, convnext) in enumerate(dec.upsample):
            hidden = self._trans_conv(upsampler, hidden, state, f"upsample.{i}")
            hidden = self._convnext(convnext, hidden, state, f"upsample.{i}.convnext")
        for i, block in enumerate(dec.decoder):
            key = f"decoder.{i}"
            if isinstance(block, Qwen3TTSTokenizerV2CausalConvNet):
                hidden = self._conv(block, hidden, state, key)
            elif isinstance(block, Qwen3TTSTokenizerV2DecoderDecoderBlock):
                hidden = self._decoder_block(block, hidden, state, key)
            else:  # pointwise activations
                hidden = block(hidden)
        state.frames += codes_t.shape[-1]
        return hidden.clamp(min=-1, max=1)[0, 0].float().cpu().numpy()

    # -- stateful pieces -------------------------------------------------------------------------------

    @staticmethod
    def _conv(module: Qwen3TTSTokenizerV2CausalConvNet, x: torch.Tensor, state: DecoderState, key: str):
        """Causal conv (stride 1): the one-shot left zero padding is replaced by the previous input tail."""
        if module.stride != 1:
            raise NotImplementedError("streaming decode supports stride-1 causal convolutions only")
        pad = module.padding
        if pad == 0:
            return module.conv(x)
        tail = state.tails.get(key)
        if tail is None:
            tail = x.new_zeros(x.shape[0], x.shape[1], pad)
        padded = torch.cat([tail, x], dim=-1)
        state.tails[key] = padded[..., -pad:]
        return module.conv(padded)

    @staticmethod
    def _trans_conv(module: Qwen3TTSTokenizerV2CausalTransConvNet, x: torch.Tensor, state: DecoderState,
                    key: str):
        """Causal transposed conv: output sample t depends on inputs t//s back to (t-k+1)//s."""
        kernel, stride = module.conv.kernel_size[0], module.conv.stride[0]
        context = math.ceil(kernel / stride) - 1
        length = x.shape[-1]
        if context == 0:
            return module.conv(x)[..., : length * stride]
        tail = state.tails.get(key)
        if tail is None:
            tail = x.new_zeros(x.shape[0], x.shape[1], context)
        padded = torch.cat([tail, x], dim=-1)
        state.tails[key] = padded[..., -context:]
        out = module.conv(padded)
        return out[..., context * stride: context * stride + length * stride]

    def _convnext(self, block, x: torch.Tensor, state: DecoderState, key: str):
        residual = x
        x = self._conv(block.dwconv, x, state, key + ".dwconv").permute(0, 2, 1)
        x = block.pwconv2(block.act(block.pwconv1(block.norm(x))))
        return residual + (block.gamma * x).permute(0, 2, 1)

    def _decoder_block(self, block: Qwen3TTSTokenizerV2DecoderDecoderBlock, x: torch.Tensor,
                       state: DecoderState, key: str):
        for j, layer in enumerate(block.block):
            sub = f"{key}.{j}"
            if isinstance(layer, Qwen3TTSTokenizerV2CausalTransConvNet):
                x = self._trans_conv(layer, x, state, sub)
            elif isinstance(layer, Qwen3TTSTokenizerV2DecoderDecoderResidualUnit):
                y = self._conv(layer.conv1, layer.act1(x), state, sub + ".conv1")
                x = x + self._conv(layer.conv2, layer.act2(y), state, sub + ".conv2")
            else:
                x = layer(x)
        return x

    def _transformer(self, x: torch.Tensor, state: DecoderState) -> torch.Tensor:
        """The sliding-window transformer with a per-stream window of past keys and values."""
        model = self.decoder.pre_transformer
        x = model.input_proj(x)
        n = x.shape[1]
        start = state.frames
        positions = torch.arange(start, start + n, device=x.device)
        cos, sin = model.rotary_emb(x, positions.unsqueeze(0))
        keep = self.window - 1
        for index, layer in enumerate(model.layers):
            attn = layer.self_attn
            residual = x
            h = layer.input_layernorm(x)
            shape = (1, n, -1, attn.head_dim)
            q = attn.q_norm(attn.q_proj(h).view(shape)).transpose(1, 2)
            k = attn.k_norm(attn.k_proj(h).view(shape)).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if index < len(state.keys):
                k_all = torch.cat([state.keys[index], k], dim=2)
                v_all = torch.cat([state.values[index], v], dim=2)
            else:
                k_all, v_all = k, v
            past = k_all.shape[2] - n
            key_pos = torch.arange(start - past, start + n, device=x.device)
            # Query at position p sees keys in (p - window, p], exactly the one-shot sliding-window mask.
            mask = (key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] > positions[:, None] - self.window)
            out = F.scaled_dot_product_attention(
                q, repeat_kv(k_all, attn.num_key_value_groups), repeat_kv(v_all, attn.num_key_value_groups),
                attn_mask=mask, scale=attn.scaling)
            out = attn.o_proj(out.transpose(1, 2).reshape(1, n, -1))
            x = residual + layer.self_attn_layer_scale(out)
            x = x + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(x)))
            k_keep, v_keep = k_all[:, :, -keep:], v_all[:, :, -keep:]
            if index < len(state.keys):
                state.keys[index], state.values[index] = k_keep, v_keep
            else:
                state.keys.append(k_keep)
                state.values.append(v_keep)
        return model.output_proj(model.norm(x))


def prime(decoder: StreamingDecoder, context_codes) -> DecoderState:
    """A state that has already decoded ``context_codes`` (the voice's reference codes in ICL mode)."""
    state = decoder.new_state()
    if context_codes is not None and len(context_codes):
        decoder.decode(state, context_codes)
    return state
