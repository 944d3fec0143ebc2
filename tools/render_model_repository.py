"""Render model_repository/*/config.pbtxt.template into a loadable Triton model repository.

Deployment-specific values (device kind, instance counts, model and voices paths, limits) are template
parameters. Each takes, in order: ``--set NAME=VALUE``, the env var ``QWEN_TTS_<NAME>``, the profile default.
"""
from __future__ import annotations

import argparse
import os
import shutil
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tts_contract import limits  # noqa: E402  (the one place these limits are written)

TEMPLATE_DIR = ROOT / "model_repository"
MODELS = ("talker", "codec_decoder", "voice_encoder", "tts", "aligner")
OPTIONAL_MODELS = {"aligner": "ALIGNER_DIR"}  # rendered only when this parameter is set

# name -> (cpu default, gpu default, description)
PARAMETERS = {
    "KIND": ("KIND_CPU", "KIND_GPU", "Triton instance kind for the Python models"),
    "VOICE_ENCODER_INSTANCES": ("1", "1", "voice_encoder instances"),
    "MODEL_DIR": ("", "/models/Qwen3-TTS-12Hz-0.6B-Base", "local Qwen3-TTS model directory"),
    "SERVED_NAME": ("", "", "the name clients use for the model (empty: from its kind and size, e.g. "
                    "qwen3-tts-0.6b-base)"),
    "TTS_MODEL": ("tts", "tts", "the Triton name of the model's ensemble"),
    "ALIGNER_DIR": ("", "/models/Qwen3-ForcedAligner-0.6B", "local Qwen3-ForcedAligner directory for word timestamps "
                    "(empty: no `aligner` model, the deployment serves no word timestamps)"),
    "ALIGNER_INSTANCES": ("1", "1", "aligner instances"),
    "VOICES_DIR": (str(ROOT / "voices"), "/voices", "voices directory"),
    "DEFAULT_VOICE": ("", "", "default voice id (empty: the voice marked isDefault)"),
    "DEVICE": ("cpu", "cuda", "torch device: cpu, cuda, cuda:N or auto"),
    "DTYPE": ("fp32", "bf16", "weights dtype: bf16, fp16 or fp32"),
    "FIRST_CHUNK_FRAMES": ("1", "1", "smallest first chunk (frames); pacing may make it larger to cover the next step"),
    "MAX_CHUNK_FRAMES": ("16", "12", "largest chunk (frames): bounds the decode time of one chunk"),
    "PACING_MARGIN_MS": ("250", "80", "audio a listener should still have when its next chunk is sent"),
    "REALTIME_SPEED": ("1.25", "1.5", "each stepped stream must run this many times faster than real time: the "
                       "real-time batch is the largest whose measured step allows it"),
    "FIRST_AUDIO_BUDGET_MS": ("1000", "1000", "refuse a new request at once unless its first audio can come "
                              "within this (requests may set their own)"),
    "MAX_ACTIVE_STREAMS": (str(limits.DEFAULT_ACTIVE_STREAMS), "64", "most streams the talker holds at once (its rows: memory); how many it "
                           "admits comes from measured real time (REALTIME_SPEED)"),
    "KV_CACHE_TOKENS": ("16384", "65536", "the talker's KV pool in tokens, shared by all streams and given out in "
                        "blocks as they grow (full size, bf16: 112 KiB per token)"),
    "SAMPLING_NOISE": ("reference", "counter", "reference: each request's own torch.Generator in qwen-tts's order "
                       "(codes equal qwen-tts's; drawn on the host); counter: a hash of seed and position drawn "
                       "inside the step (what a CUDA graph replays)"),
    "CUDA_GRAPHS": ("off", "on", "capture the talker's decode step per (batch, KV span) and the codec decoder's step per (streams, frames) bucket at start-up, and replay them (CUDA; the talker on counter noise)"),
    "TALKER_THREADS": ("1", "1", "CPU threads (torch intra-op) of the talker's serving loop"),
    "DECODER_THREADS": ("1", "1", "CPU threads (torch intra-op) of codec_decoder's batching worker"),
    "MAX_QUEUED_STREAMS": ("64", "256", "new streams that may wait in line for a row; more are refused (OVERLOADED)"),
    "MAX_QUEUE_WAIT_S": ("30", "30", "a stream waiting longer than this for a row is refused (OVERLOADED)"),
    "MAX_TEXT_CHARS": (str(limits.MAX_TEXT_CHARS), str(limits.MAX_TEXT_CHARS), "longest text a request may carry"),
    "MAX_NEW_TOKENS_LIMIT": (str(limits.MAX_NEW_TOKENS_LIMIT), str(limits.MAX_NEW_TOKENS_LIMIT), "largest max_new_tokens a request may ask for (frames)"),
    "DEFAULT_MAX_NEW_TOKENS": (str(limits.DEFAULT_MAX_NEW_TOKENS), str(limits.DEFAULT_MAX_NEW_TOKENS), "max_new_tokens when a request sets none"),
    "STREAM_IDLE_TIMEOUT_S": ("60", "60", "seconds before codec_decoder frees an abandoned stream's state"),
}
POSITIVE_INTS = ("VOICE_ENCODER_INSTANCES", "ALIGNER_INSTANCES", "KV_CACHE_TOKENS", "FIRST_CHUNK_FRAMES",
                 "MAX_CHUNK_FRAMES", "PACING_MARGIN_MS", "FIRST_AUDIO_BUDGET_MS", "MAX_ACTIVE_STREAMS",
                 "TALKER_THREADS", "DECODER_THREADS", "MAX_QUEUED_STREAMS", "MAX_QUEUE_WAIT_S", "MAX_TEXT_CHARS",
                 "MAX_NEW_TOKENS_LIMIT", "DEFAULT_MAX_NEW_TOKENS", "STREAM_IDLE_TIMEOUT_S")


class RenderError(ValueError):
    pass


def resolve(profile: str, overrides: dict[str, str], environ=os.environ) -> dict[str, str]:
    if profile not in ("cpu", "gpu"):
        raise RenderError(f"unknown profile '{profile}': use cpu or gpu")
    unknown = set(overrides) - set(PARAMETERS)
    if unknown:
        raise RenderError(f"unknown parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(PARAMETERS)}")
    values = {}
    for name, (cpu, gpu, _) in PARAMETERS.items():
        values[name] = overrides.get(name, environ.get(f"QWEN_TTS_{name}", cpu if profile == "cpu" else gpu))
    if values["KIND"] not in ("KIND_CPU", "KIND_GPU"):
        raise RenderError(f"KIND must be KIND_CPU or KIND_GPU, not {values['KIND']!r}")
    for name in POSITIVE_INTS:
        if not values[name].isdigit() or int(values[name]) < 1:
            raise RenderError(f"{name} must be a positive integer, not {values[name]!r}")
    try:
        speed_ok = 0.5 <= float(values["REALTIME_SPEED"]) <= 10
    except ValueError:
        speed_ok = False
    if not speed_ok:
        raise RenderError(f"REALTIME_SPEED must be a number within 0.5..10, not {values['REALTIME_SPEED']!r}")
    if values["SAMPLING_NOISE"] not in ("reference", "counter"):
        raise RenderError(f"SAMPLING_NOISE must be reference or counter, not {values['SAMPLING_NOISE']!r}")
    if values["CUDA_GRAPHS"] not in ("on", "off"):
        raise RenderError(f"CUDA_GRAPHS must be on or off, not {values['CUDA_GRAPHS']!r}")
    if int(values["FIRST_CHUNK_FRAMES"]) > int(values["MAX_CHUNK_FRAMES"]):
        raise RenderError("FIRST_CHUNK_FRAMES must not exceed MAX_CHUNK_FRAMES")
    if not values["MODEL_DIR"]:
        raise RenderError("MODEL_DIR is empty: set QWEN_TTS_MODEL_DIR or --set MODEL_DIR=/path/to/model")
    for name, value in values.items():
        if '"' in value or "\n" in value:
            raise RenderError(f"{name} must not contain quotes or newlines")
    return values


def render(out_dir: Path, values: dict[str, str]) -> Path:
    """Write the rendered repository to ``out_dir`` (replacing it) and return it."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for model in MODELS:
        if model in OPTIONAL_MODELS and not values.get(OPTIONAL_MODELS[model]):
            continue
        src = TEMPLATE_DIR / model
        dst = staging / model
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.template"))
        (dst / "1").mkdir(exist_ok=True)  # the ensemble's version folder is empty, so git does not keep it
        template = string.Template((src / "config.pbtxt.template").read_text())
        try:
            text = template.substitute(values)
        except KeyError as exc:
            raise RenderError(f"{model}: template uses unknown parameter {exc}") from None
        (dst / "config.pbtxt").write_text(text)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "model_repository")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--list", action="store_true", help="print the parameters and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (cpu, gpu, text) in PARAMETERS.items():
            print(f"{name:24} cpu={cpu!r:12} gpu={gpu!r:12} {text}")
        return 0
    overrides = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects NAME=VALUE, got {item!r}")
        overrides[name.strip()] = value
    try:
        values = resolve(args.profile, overrides)
        out = render(args.out, values)
    except RenderError as exc:
        print(f"render_model_repository: {exc}", file=sys.stderr)
        return 2
    aligner = f"aligner {values['ALIGNER_DIR']}" if values["ALIGNER_DIR"] else "no aligner"
    print(f"rendered {args.profile} model repository at {out} (model dir {values['MODEL_DIR']}; {aligner})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
