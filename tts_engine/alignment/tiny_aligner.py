"""Build a random-weight Qwen3-ForcedAligner offline, in the hub repo's on-disk layout.

The real architecture (qwen-asr's Qwen3ASR classes with the forced-aligner head), special-token ids, 80 ms
timestamp classes and feature extractor are kept; ``tiny`` shrinks widths and depths so that the aligner
loads through ``Qwen3ForcedAligner.from_pretrained`` and runs in milliseconds, ``full`` keeps the real
Qwen3-ForcedAligner-0.6B sizes (for timing). The weights are random: the times mean nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

BUILD_SEED = 4321
FORMAT_VERSION = "2"  # bump when the recipe changes so stale builds are rebuilt
MARKER = "TINY_ALIGNER"
PRESETS = ("tiny", "full")

TIMESTAMP_SEGMENT_MS = 80  # one timestamp class per 80 ms, as in the real checkpoint
CLASSIFY_NUM = 5000  # the real head: 5000 classes of 80 ms = 400 s
# Classes the tiny head favours: times within the first 2 s. The gateway aligns an utterance in windows that
# start where its last settled word ended, most of them a second or two long, and a real aligner spreads a
# window's words over it; favouring the first 2 s lets the random one settle words early too (with 10 s, nearly
# every word fell beyond its window and settled only at the utterance's end). The other classes keep small
# weights (never zero), so every class of the real head still exists and can win.
LIKELY_CLASSES = 25
LOGIT_STD = 2.0
ATTENTION_SHARPNESS = 3.0
TIMESTAMP_EMBEDDING_SCALE = 0.05
TEXT_VOCAB_SIZE = 152064
# id -> content, as in the real tokenizer (Qwen/Qwen3-ForcedAligner-0.6B tokenizer_config.json).
SPECIAL_TOKENS = {
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
    151669: "<|audio_start|>", 151670: "<|audio_end|>", 151676: "<|audio_pad|>", 151705: "<timestamp>",
}
PLAIN_TOKENS = frozenset({"<timestamp>"})  # an added token that the real tokenizer does not mark special
AUDIO_TOKENS = {"audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>",
                "audio_token": "<|audio_pad|>"}
SUPPORT_LANGUAGES = ["Chinese", "Cantonese", "English", "German", "Spanish", "French", "Italian", "Portuguese",
                     "Russian", "Korean", "Japanese"]

# Real Qwen3-ForcedAligner-0.6B sizes (its config.json; transformers_version 4.57.6 there).
FULL_SIZE = {
    "audio": {"d_model": 1024, "encoder_layers": 24, "encoder_attention_heads": 16, "encoder_ffn_dim": 4096,
              "output_dim": 1024, "downsample_hidden_size": 480},
    "text": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128,
             "rope_scaling": {"interleaved": True, "mrope_interleaved": True, "mrope_section": [24, 20, 20],
                              "rope_type": "default", "type": "default"}},
}


def _audio_config() -> dict:
    return {
        "num_mel_bins": 128, "d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2,
        "encoder_ffn_dim": 64, "output_dim": 64, "downsample_hidden_size": 8, "activation_function": "gelu",
        "max_source_positions": 1500, "n_window": 50, "n_window_infer": 800, "conv_chunksize": 500,
        "scale_embedding": False, "dropout": 0, "attention_dropout": 0, "activation_dropout": 0,
    }


def _text_config() -> dict:
    return {
        "vocab_size": TEXT_VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "attention_bias": False,
        "tie_word_embeddings": False,
        "rope_scaling": {"interleaved": True, "mrope_interleaved": True, "mrope_section": [3, 3, 2],
                         "rope_type": "default", "type": "default"},
    }


def _model_config(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}")
    audio, text = _audio_config(), _text_config()
    if preset == "full":
        audio.update(FULL_SIZE["audio"])
        text.update(FULL_SIZE["text"])
    ids = {content: token_id for token_id, content in SPECIAL_TOKENS.items()}
    return {
        "architectures": ["Qwen3ASRForConditionalGeneration"], "model_type": "qwen3_asr",
        "timestamp_token_id": ids["<timestamp>"], "timestamp_segment_time": TIMESTAMP_SEGMENT_MS,
        "support_languages": SUPPORT_LANGUAGES,
        "thinker_config": {
            # "forced_aligner" in this model_type is what gives the thinker its classification head.
            "model_type": "qwen3_forced_aligner", "classify_num": CLASSIFY_NUM,
            "audio_token_id": ids["<|audio_pad|>"], "audio_start_token_id": ids["<|audio_start|>"],
            "audio_end_token_id": ids["<|audio_end|>"], "initializer_range": 0.02,
            "audio_config": audio, "text_config": text,
        },
    }


def _wake(model, generator) -> None:
    """Give the random network a trained one's parameter scales, so that what it predicts at each ``<timestamp>``
    depends on the audio, the words and the position."""
    # HF's std-0.02 init predicts one class everywhere, and then a batching mistake or a swapped pair of times
    # would go unseen. Here: embeddings of unit variance, fan-in-scaled convolutions and linears, norm weights
    # away from 1, peaked attention, and a head with a trained model's logit spread over the likely classes.
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=generator)
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.uniform_(-1.0, 1.0, generator=generator).mul_((3.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1, generator=generator)
            elif type(module).__name__.endswith("RMSNorm") or isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.6, 1.4, generator=generator)
        text = model.thinker.model
        for layer in text.layers:  # peaked attention: each position reads a few tokens, not its prefix's mean
            layer.self_attn.q_norm.weight.mul_(ATTENTION_SHARPNESS)
            layer.self_attn.k_norm.weight.mul_(ATTENTION_SHARPNESS)
        # Every <timestamp> has the same embedding, which would outweigh what it attends to (one class
        # everywhere). Small, it still sets the query (Qwen3 normalises q and k), and the state is what it reads.
        text.embed_tokens.weight[model.config.timestamp_token_id].mul_(TIMESTAMP_EMBEDDING_SCALE)
        head = model.thinker.lm_head
        hidden = head.weight.shape[1]
        head.weight.normal_(0.0, 0.01 / hidden ** 0.5, generator=generator)
        head.weight[:LIKELY_CLASSES].normal_(0.0, LOGIT_STD / hidden ** 0.5, generator=generator)


def _write_feature_extractor(out_dir: Path) -> None:
    """The real checkpoint's Whisper log-mel front end (128 bins, 16 kHz, 10 ms hop)."""
    from transformers import WhisperFeatureExtractor

    WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400,
                            padding_value=0.0, dither=0.0, return_attention_mask=True).save_pretrained(out_dir)
    path = out_dir / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config["processor_class"] = "Qwen3ASRProcessor"
    path.write_text(json.dumps(config, indent=2))


def build_tiny_aligner(out_dir: str | os.PathLike, preset: str = "tiny") -> Path:
    """Write the random-weight aligner to ``out_dir`` (atomically) and return its path."""
    import torch
    from qwen_asr.core.transformers_backend import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration

    from tts_engine.tiny_model import train_text_tokenizer

    model_cfg = _model_config(preset)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-aligner-", dir=out_dir.parent))
    try:
        torch.manual_seed(BUILD_SEED)
        generator = torch.Generator().manual_seed(BUILD_SEED)
        train_text_tokenizer(staging, SPECIAL_TOKENS, PLAIN_TOKENS, extra_special_tokens=AUDIO_TOKENS)
        model = Qwen3ASRForConditionalGeneration(Qwen3ASRConfig(**model_cfg)).eval()
        if model.thinker.lm_head.out_features != CLASSIFY_NUM:
            raise RuntimeError("qwen-asr did not build the forced-aligner head: check thinker_config.model_type")
        _wake(model, generator)
        if preset == "full":
            model = model.to(torch.bfloat16)  # half the disk, as the real checkpoint ships
        model.save_pretrained(staging, safe_serialization=True)
        # save_pretrained writes each sub-config's class model_type, which drops "qwen3_forced_aligner" and
        # with it the classification head on load; write the config as the real checkpoint has it.
        cfg_path = staging / "config.json"
        saved = json.loads(cfg_path.read_text())
        saved["thinker_config"]["model_type"] = model_cfg["thinker_config"]["model_type"]
        cfg_path.write_text(json.dumps(saved, indent=2))
        _write_feature_extractor(staging)
        (staging / MARKER).write_text(
            f"format {FORMAT_VERSION}\npreset {preset}\nRandom weights (seed {BUILD_SEED}); "
            "for tests, local runs and timing only: its word times mean nothing.\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def is_current(aligner_dir: str | os.PathLike, preset: str = "tiny") -> bool:
    """True when ``aligner_dir`` holds an aligner built by this recipe version and preset."""
    marker = Path(aligner_dir) / MARKER
    return marker.is_file() and marker.read_text().startswith(f"format {FORMAT_VERSION}\npreset {preset}\n")


def ensure_tiny_aligner(aligner_dir: str | os.PathLike, preset: str = "tiny") -> Path:
    """Build the aligner unless a current build is already there; return its path."""
    if not is_current(aligner_dir, preset):
        build_tiny_aligner(aligner_dir, preset)
    return Path(aligner_dir)


def main(argv: list[str] | None = None) -> int:
    from tts_engine.tiny_model import builder_main

    return builder_main(argv, __doc__, "aligner", "for timing", build_tiny_aligner, is_current)


if __name__ == "__main__":
    sys.exit(main())
