"""Build a tiny random-weight Qwen3-TTS-12Hz model offline, in the hub repo's on-disk layout.

The real architecture, codec ids and vocabulary sizes are kept; only widths and depths shrink, so the
model loads through ``Qwen3TTSModel.from_pretrained`` and exercises every code path in seconds. One preset per
kind of the family: ``tiny`` (Base), ``tiny-custom-voice`` (a few named speakers, one of them a dialect speaker;
sized as a 1.7B CustomVoice, so it follows instructions), ``tiny-voice-design``; and the real sizes with random
weights for timing: ``full`` (0.6B Base) and ``full-1.7b`` (1.7B Base).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# The ten languages of the real checkpoint, with codec ids in the real range (2048..2147 are control/lang ids).
LANGUAGE_CODEC_IDS = {
    "chinese": 2055, "english": 2050, "german": 2053, "italian": 2070, "portuguese": 2071,
    "spanish": 2054, "japanese": 2058, "korean": 2064, "french": 2061, "russian": 2069,
}
TEXT_VOCAB_SIZE = 151936
SPECIAL_TOKENS = {  # id -> content, as in the real Qwen2 tokenizer
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
    151671: "<tts_pad>", 151672: "<tts_text_bos>", 151673: "<tts_text_eod>",
}
BUILD_SEED = 1234
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
FORMAT_VERSION = "7"  # bump when the recipe changes so stale builds are rebuilt


# Real Qwen3-TTS-12Hz-0.6B-Base dimensions, for timing the full-size architecture with random weights.
FULL_SIZE = {
    "talker": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
               "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "text_hidden_size": 2048,
               "rope_scaling": {"interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}},
    "code_predictor": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 5,
                       "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128},
    "speaker_encoder": {"enc_dim": 1024, "enc_channels": [512, 512, 512, 512, 1536],
                        "enc_attention_channels": 128, "enc_res2net_scale": 8, "enc_se_channels": 128},
    "encoder": {"hidden_size": 512, "num_filters": 64, "codebook_dim": 256,
                "vector_quantization_hidden_dimension": 256, "upsample_groups": 512, "num_hidden_layers": 8,
                "intermediate_size": 2048, "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64},
    "decoder": {"hidden_size": 1024, "latent_dim": 1024, "codebook_dim": 512, "num_attention_heads": 16,
                "num_key_value_heads": 16, "head_dim": 64, "intermediate_size": 3072, "decoder_dim": 1536,
                "layer_scale_initial_scale": 0.01},
}
# Real Qwen3-TTS-12Hz-1.7B dimensions: a wider talker (its code predictor stays at 1024 and is reached through
# small_to_mtp_projection) and a wider speaker embedding.
FULL_SIZE_1B7 = {
    "talker": {**FULL_SIZE["talker"], "hidden_size": 2048, "intermediate_size": 6144},
    "speaker_encoder": {**FULL_SIZE["speaker_encoder"], "enc_dim": 2048},
}
# The tiny CustomVoice's speakers: name -> (codec id, dialect or False), as the real checkpoint's spk_id and
# spk_is_dialect hold them (its nine speakers sit in the same control range of the codec vocabulary).
TINY_SPEAKERS = {"aria": (3000, False), "kai": (3001, False), "mei": (3002, "sichuan_dialect")}
DIALECT_CODEC_IDS = {"sichuan_dialect": 2080}
# preset -> (tts_model_type, tts_model_size, sizes)
PRESET_SPECS = {
    "tiny": ("base", "0b6", None),
    "tiny-custom-voice": ("custom_voice", "1b7", None),
    "tiny-voice-design": ("voice_design", "1b7", None),
    "full": ("base", "0b6", FULL_SIZE),
    "full-1.7b": ("base", "1b7", {**FULL_SIZE, **FULL_SIZE_1B7}),
}
PRESETS = tuple(PRESET_SPECS)


def _talker_config() -> dict:
    head_dim = 16
    return {
        "vocab_size": 3072, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": head_dim,
        "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000, "rope_scaling": {"interleaved": True, "mrope_section": [3, 3, 2], "rope_type": "default"},
        "num_code_groups": 16, "text_hidden_size": 64, "text_vocab_size": TEXT_VOCAB_SIZE,
        "codec_eos_token_id": 2150, "codec_think_id": 2154, "codec_nothink_id": 2155,
        "codec_think_bos_id": 2156, "codec_think_eos_id": 2157, "codec_pad_id": 2148, "codec_bos_id": 2149,
        "codec_language_id": LANGUAGE_CODEC_IDS, "spk_id": {}, "spk_is_dialect": {},
        "position_id_per_seconds": 13,
        "code_predictor_config": {
            "vocab_size": 2048, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "hidden_act": "silu",
            "max_position_embeddings": 65536, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
            "num_code_groups": 16,
        },
    }


def _model_config() -> dict:
    return {
        "architectures": ["Qwen3TTSForConditionalGeneration"], "model_type": "qwen3_tts",
        "tokenizer_type": "qwen3_tts_tokenizer_12hz", "tts_model_size": "0b6", "tts_model_type": "base",
        "im_start_token_id": 151644, "im_end_token_id": 151645, "tts_pad_token_id": 151671,
        "tts_bos_token_id": 151672, "tts_eos_token_id": 151673,
        "talker_config": _talker_config(),
        "speaker_encoder_config": {
            "mel_dim": 128, "enc_dim": 64, "enc_channels": [32, 32, 32, 32, 96],
            "enc_kernel_sizes": [5, 3, 3, 3, 1], "enc_dilations": [1, 2, 3, 4, 1],
            "enc_attention_channels": 16, "enc_res2net_scale": 4, "enc_se_channels": 16, "sample_rate": 24000,
        },
    }


def _speech_tokenizer_config() -> dict:
    return {
        "model_type": "qwen3_tts_tokenizer_12hz", "architectures": ["Qwen3TTSTokenizerV2Model"],
        "encoder_valid_num_quantizers": 16, "input_sample_rate": 24000, "output_sample_rate": 24000,
        "decode_upsample_rate": 1920, "encode_downsample_rate": 1920,
        "encoder_config": {
            "sampling_rate": 24000, "frame_rate": 12.5, "hidden_size": 32, "num_filters": 4,
            "num_residual_layers": 1, "upsampling_ratios": [8, 6, 5, 4], "codebook_size": 2048,
            "codebook_dim": 32, "num_quantizers": 32, "vector_quantization_hidden_dimension": 32,
            "num_semantic_quantizers": 1, "upsample_groups": 32, "num_hidden_layers": 1,
            "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
            "sliding_window": 250, "use_causal_conv": True,
        },
        "decoder_config": {
            # The real decoder: 8 layers, sliding window 72, upsampling 8*5*4*3 and 2*2 = 1920 samples/frame.
            "codebook_size": 2048, "hidden_size": 32, "latent_dim": 32, "codebook_dim": 32,
            "max_position_embeddings": 8000, "rope_theta": 10000, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 72, "intermediate_size": 64,
            "hidden_act": "silu", "layer_scale_initial_scale": 1.0, "rms_norm_eps": 1e-5,
            "num_hidden_layers": 8, "num_quantizers": 16, "upsample_rates": [8, 5, 4, 3],
            "upsampling_ratios": [2, 2], "decoder_dim": 32, "attention_dropout": 0.0,
        },
    }


def train_text_tokenizer(out_dir: Path, special_tokens: dict = SPECIAL_TOKENS, plain_tokens: frozenset = frozenset(),
                         **tokenizer_kwargs) -> None:
    """Train a tiny byte-level BPE and save it as a Qwen2TokenizerFast with the real ids of ``special_tokens``.

    ``plain_tokens`` are added tokens that are not special in the real tokenizer (the aligner's ``<timestamp>``);
    ``tokenizer_kwargs`` go to Qwen2TokenizerFast (the aligner's named audio tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import ByteLevel as ByteLevelProcessor
    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

    corpus = [
        # The chat-template words must be single tokens, as in the real tokenizer: qwen-tts slices the
        # tokenised template by position (3 tokens of "<|im_start|>assistant\n" before the text).
        "assistant\n", "assistant", "user\n", "system\n",
        "Hello world. This is a tiny tokenizer for tests of streaming speech synthesis.",
        "The quick brown fox jumps over the lazy dog, again and again, 0123456789!",
        "Bonjour le monde. Hallo Welt. Hola mundo. Ciao mondo. Olá mundo. Привет мир.",
        "你好，世界。こんにちは世界。안녕하세요 세계.",
    ] * 20
    tok = Tokenizer(models.BPE())
    # Same pre-tokenizer shape as the real Qwen2 tokenizer (a regex Split, then ByteLevel): the loader
    # patches element 0 of this sequence.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = ByteLevelProcessor(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    # Special tokens must carry the real ids (far above the tiny vocabulary): set them in the serialised
    # form instead of padding the vocabulary up to them.
    # An added token whose content is already in the model vocabulary takes that entry's id.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({content: token_id for token_id, content in special_tokens.items()})
    # Fill the gap with never-produced placeholders: a vocabulary with holes is rejected on save.
    vocab.update({f"<|reserved_{i}|>": i for i in range(tok.get_vocab_size(), max(special_tokens))
                  if i not in special_tokens})
    spec["added_tokens"] = [
        {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": content not in plain_tokens}
        for token_id, content in sorted(special_tokens.items())
    ]
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    for token_id, content in special_tokens.items():
        assert fast.convert_tokens_to_ids(content) == token_id, (content, token_id)
    tmp = out_dir / "_tok"
    fast.save_pretrained(tmp)
    qwen = Qwen2TokenizerFast(tokenizer_file=str(tmp / "tokenizer.json"), unk_token=None,
                              bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", **tokenizer_kwargs)
    qwen.save_pretrained(out_dir)
    shutil.rmtree(tmp)


def _single_token_id(tokenizer_dir: Path, text: str) -> int:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tokenizer_dir))(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise RuntimeError(f"{text!r} must be one token of the tiny tokenizer, got {ids}")
    return ids[0]


def _log_uniform(tensor, low: float, high: float, generator) -> None:
    import math

    import torch

    with torch.no_grad():
        tensor.uniform_(math.log(low), math.log(high), generator=generator).exp_()


def _is_rms_norm(module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def _fan_in(module) -> int:
    """Inputs that reach one output: a transposed convolution's output sees kernel/stride taps per channel."""
    import torch

    if isinstance(module, torch.nn.ConvTranspose1d):
        return max(1, module.in_channels * module.kernel_size[0] // module.stride[0] // module.groups)
    return module.weight[0].numel()


def _wake_decoder(decoder, generator) -> None:
    """Give the codec decoder the parameter scales of a trained one, so that every stateful part matters.

    HF init leaves the codebooks at zero (exact silence), ConvNeXt layer scales at 1e-6 (those blocks are
    near-identity, so a streaming bug in them would go unseen), Snake parameters at zero and std-0.02
    layers that barely look back in time. Here: unit-variance codebooks, fan-in-scaled convolutions and
    linears (so the signal keeps its size through the upsamplers, and the output depends on the codes),
    ConvNeXt and transformer layer scales of 0.03..0.5, Snake log-parameters around zero, norm weights
    away from 1, and an output calibrated to be zero-mean with an RMS of about 0.2, like speech."""
    import torch

    with torch.no_grad():
        for name, param in decoder.named_parameters():
            if name.endswith("embedding_sum"):
                param.normal_(0.0, 1.0, generator=generator)
        for module in decoder.modules():
            if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d, torch.nn.Linear)):
                module.weight.uniform_(-1.0, 1.0, generator=generator).mul_(_fan_in(module) ** -0.5)
                if module.bias is not None:  # small biases: the output is driven by the codes, not by them
                    module.bias.uniform_(-0.1, 0.1, generator=generator).mul_(_fan_in(module) ** -0.5)
            kind = type(module).__name__
            if kind.endswith("ConvNeXtBlock"):
                _log_uniform(module.gamma, 0.03, 0.5, generator)
            elif kind.endswith("LayerScale"):
                _log_uniform(module.scale, 0.03, 0.5, generator)
            elif kind == "SnakeBeta":
                module.alpha.normal_(0.0, 0.5, generator=generator)
                module.beta.normal_(0.0, 0.5, generator=generator)
            elif _is_rms_norm(module):
                module.weight.uniform_(0.6, 1.4, generator=generator)
        # Calibrate the last convolution on random codes: remove the DC offset (SnakeBeta adds a positive
        # sin^2 term everywhere) and scale to speech-like loudness, far from the [-1, 1] clamp.
        # Measured in float64 and rounded, so that the build does not depend on how many threads (or which
        # kernels) computed the forward: float32 sums differ in their last bits between thread counts.
        codes = torch.randint(0, decoder.config.codebook_size, (1, decoder.config.num_quantizers, 60),
                              generator=generator)
        last = decoder.decoder[-1].conv
        decoder.double()
        last.weight.mul_(_rounded(0.2 / float(decoder(codes)[0, 0].std())))
        last.bias.zero_()
        last.bias.sub_(_rounded(float(decoder(codes)[0, 0].mean())))
        decoder.float()


def _rounded(value: float) -> float:
    return float(f"{value:.6g}")


# The tiny talker stops where the text has this character: its text embedding drives one channel of the
# residual stream that nothing else writes, and the codec head reads EOS from that channel alone. So EOS
# comes from the real weights through qwen-tts's real stopping rules, at a frame a test chooses, and
# never by chance (without the marker the EOS logit is exactly 0, far below the top-k cut).
EOS_MARKER = "~"
LOGIT_STD = 2.0  # the talker's and code predictor's logits: peaked like a trained model's, not uniform


def _wake_talker(talker, marker_id: int, eos_id: int, generator) -> None:
    """Norm weights away from 1, logits with a trained model's spread, and the EOS marker channel."""
    import torch

    cfg = talker.config
    with torch.no_grad():
        for module in talker.modules():
            if _is_rms_norm(module):
                module.weight.uniform_(0.6, 1.4, generator=generator)
        # A unit-RMS hidden state times N(0, s^2) rows gives logits with std s * sqrt(hidden).
        talker.codec_head.weight.normal_(0.0, LOGIT_STD / cfg.hidden_size ** 0.5, generator=generator)
        hidden = cfg.code_predictor_config.hidden_size
        for head in talker.code_predictor.lm_head:
            head.weight.normal_(0.0, LOGIT_STD / hidden ** 0.5, generator=generator)

        channel = cfg.hidden_size - 1  # residual-stream channel of the marker
        text_channel = cfg.text_hidden_size - 1  # text-embedding channel only the marker uses
        unit = cfg.text_hidden_size - 1  # text_projection hidden unit that reads it
        text = talker.model.text_embedding.weight
        text[:, text_channel] = 0.0
        text[marker_id, text_channel] = 1.0
        fc1, fc2 = talker.text_projection.linear_fc1, talker.text_projection.linear_fc2
        fc1.weight[unit] = 0.0
        fc1.weight[unit, text_channel] = 4.0
        fc1.bias[unit] = 0.0
        fc2.weight[:, unit] = 0.0
        fc2.weight[channel] = 0.0
        fc2.weight[channel, unit] = 1.0
        fc2.bias[channel] = 0.0
        talker.model.codec_embedding.weight[:, channel] = 0.0
        for table in talker.code_predictor.model.codec_embedding:
            table.weight[:, channel] = 0.0
        for layer in talker.model.layers:  # no layer writes into the channel: it carries the input through
            layer.self_attn.o_proj.weight[channel] = 0.0
            layer.mlp.down_proj.weight[channel] = 0.0
        talker.codec_head.weight[:, channel] = 0.0
        talker.codec_head.weight[eos_id] = 0.0
        talker.codec_head.weight[eos_id, channel] = 4.0


def _apply_preset(model_cfg: dict, tokenizer_cfg: dict, preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}")
    kind, size, sizes = PRESET_SPECS[preset]
    model_cfg["tts_model_type"], model_cfg["tts_model_size"] = kind, size
    talker = model_cfg["talker_config"]
    if kind == "custom_voice":
        talker["spk_id"] = {name: codec_id for name, (codec_id, _) in TINY_SPEAKERS.items()}
        talker["spk_is_dialect"] = {name: dialect for name, (_, dialect) in TINY_SPEAKERS.items()}
        talker["codec_language_id"] = {**talker["codec_language_id"], **DIALECT_CODEC_IDS}
    if sizes is not None:
        talker.update(sizes["talker"])
        talker["code_predictor_config"].update(sizes["code_predictor"])
        model_cfg["speaker_encoder_config"].update(sizes["speaker_encoder"])
        tokenizer_cfg["encoder_config"].update(sizes["encoder"])
        tokenizer_cfg["decoder_config"].update(sizes["decoder"])


def build_tiny_model(out_dir: str | os.PathLike, preset: str = "tiny") -> Path:
    """Write the random-weight model to ``out_dir`` (atomically) and return its path.

    ``preset``: one of PRESETS (see the module); the tiny ones shrink widths and depths, the full ones keep the
    real sizes (for memory and step-time benchmarks)."""
    import torch
    from transformers import EncodecFeatureExtractor

    from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent))
    try:
        torch.manual_seed(BUILD_SEED)
        generator = torch.Generator().manual_seed(BUILD_SEED)
        train_text_tokenizer(staging)
        marker_id = _single_token_id(staging, EOS_MARKER)
        model_cfg, tokenizer_cfg = _model_config(), _speech_tokenizer_config()
        _apply_preset(model_cfg, tokenizer_cfg, preset)
        config = Qwen3TTSConfig(**model_cfg)
        model = Qwen3TTSForConditionalGeneration(config).eval()
        _wake_talker(model.talker, marker_id, config.talker_config.codec_eos_token_id, generator)
        if preset.startswith("full"):
            model = model.to(torch.bfloat16)  # half the disk; served in bf16 on GPU anyway
        model.save_pretrained(staging, safe_serialization=True)
        # save_pretrained writes an empty model_type into speaker_encoder_config, which the loader rejects.
        cfg_path = staging / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["speaker_encoder_config"].pop("model_type", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        (staging / "generation_config.json").write_text(json.dumps({
            "do_sample": True, "repetition_penalty": 1.05, "temperature": 0.9, "top_p": 1.0, "top_k": 50,
            "subtalker_dosample": True, "subtalker_temperature": 0.9, "subtalker_top_k": 50,
            "subtalker_top_p": 1.0, "max_new_tokens": 8192,
        }, indent=2))
        # The processor is the tokenizer alone; this file only names its class.
        (staging / "preprocessor_config.json").write_text(json.dumps({
            "processor_class": "Qwen3TTSProcessor"}, indent=2))

        st_dir = staging / "speech_tokenizer"
        tok_model = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**tokenizer_cfg)).eval()
        _wake_decoder(tok_model.decoder, generator)
        tok_model.save_pretrained(st_dir, safe_serialization=True)
        EncodecFeatureExtractor(feature_size=1, sampling_rate=24000, padding_value=0.0,
                                return_attention_mask=True).save_pretrained(st_dir)
        (staging / "TINY_MODEL").write_text(
            f"format {FORMAT_VERSION}\npreset {preset}\nRandom weights (seed {BUILD_SEED}); "
            "for tests, local runs and timing only.\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def is_current(model_dir: str | os.PathLike, preset: str = "tiny") -> bool:
    """True when ``model_dir`` holds a model built by this recipe version and preset."""
    marker = Path(model_dir) / "TINY_MODEL"
    return marker.is_file() and marker.read_text().startswith(f"format {FORMAT_VERSION}\npreset {preset}\n")


def builder_main(argv, description: str, noun: str, full_help: str, build, is_current,
                 presets: tuple = ("tiny", "full")) -> int:
    """The command line of a random-weight builder (this model's, the aligner's): ``OUT_DIR [--preset P]
    [--force]``; a current build is kept unless forced."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help=f"where to write the {noun} directory")
    parser.add_argument("--force", action="store_true", help="rebuild even when a current build exists")
    parser.add_argument("--preset", choices=presets, default="tiny",
                        help=f"tiny (default); full: real sizes, random weights, {full_help}")
    args = parser.parse_args(argv)
    if is_current(args.out_dir, args.preset) and not args.force:
        print(f"{args.preset} {noun} already built at {args.out_dir}")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = build(args.out_dir, args.preset)
    print(f"{args.preset} random-weight {noun} written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return builder_main(argv, __doc__, "model", "for memory and step-time benchmarks", build_tiny_model, is_current,
                        presets=PRESETS)


if __name__ == "__main__":
    sys.exit(main())
