"""Render model_repository/*/config.pbtxt.template into a loadable Triton model repository.

Deployment-specific values (device kind, instance counts, model and voices paths, limits) are template
parameters. Each takes, in order: ``--set NAME=VALUE``, the env var ``QWEN_TTS_<NAME>``, the profile default.

One model (``MODEL_DIR``) renders `talker` and `tts`. Several (``MODELS=name=dir,name2=dir2``) render one talker
and one `tts` ensemble per checkpoint, named by ``tts_contract.models.triton_names``: the first (the default)
keeps `talker`/`tts`, the others are `talker_<name>`/`tts_<name>`. All share `codec_decoder` and
`voice_encoder`, which load the speech tokenizer and speaker encoder from the first Base checkpoint (no Base
model: no `voice_encoder`; the codec decoder takes the first model's, all kinds share one speech tokenizer).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tts_contract import limits  # noqa: E402  (the one place these limits are written)
from tts_contract.models import BASE, KINDS, ModelNameError, check_model_name, triton_names  # noqa: E402

TEMPLATE_DIR = ROOT / "model_repository"
SHARED_MODELS = ("codec_decoder", "voice_encoder", "aligner")  # one each; talker and tts: one per served model
OPTIONAL_MODELS = {"aligner": "ALIGNER_DIR"}  # rendered only when this parameter is set

# name -> (cpu default, gpu default, description)
PARAMETERS = {
    "KIND": ("KIND_CPU", "KIND_GPU", "Triton instance kind for the Python models"),
    "VOICE_ENCODER_INSTANCES": ("1", "1", "voice_encoder instances"),
    "MODEL_DIR": ("", "/models/Qwen3-TTS-12Hz-0.6B-Base", "local Qwen3-TTS model directory"),
    "SERVED_NAME": ("", "", "the name clients use for the MODEL_DIR model (empty: from its kind and size, e.g. "
                    "qwen3-tts-0.6b-base)"),
    "MODELS": ("", "", "several models, name=dir,name2=dir2 (replaces MODEL_DIR and SERVED_NAME): one talker and "
               "tts ensemble each; the first is the default (Triton talker/tts), the others talker_<name>/"
               "tts_<name>"),
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
    if values["MODELS"].strip():
        if values["SERVED_NAME"]:
            raise RenderError("SERVED_NAME names the one MODEL_DIR model; with MODELS, name each model there "
                              "(name=dir,...)")
    elif not values["MODEL_DIR"]:
        raise RenderError("MODEL_DIR is empty: set QWEN_TTS_MODEL_DIR or --set MODEL_DIR=/path/to/model "
                          "(or QWEN_TTS_MODELS=name=dir,... for several models)")
    elif values["SERVED_NAME"]:
        try:
            check_model_name(values["SERVED_NAME"])
        except ModelNameError as exc:
            raise RenderError(f"SERVED_NAME: {exc}") from None
    for name, value in values.items():
        if '"' in value or "\n" in value:
            raise RenderError(f"{name} must not contain quotes or newlines")
    served_models(values)  # MODELS well-formed
    return values


@dataclass(frozen=True)
class RenderedModel:
    """One served checkpoint as rendered: its name (empty: the talker derives it from kind and size), directory,
    kind as its config.json says (None: unreadable here, e.g. weights mounted only where Triton runs) and the
    Triton models that serve it."""

    name: str
    model_dir: str
    kind: Optional[str]
    tts_model: str
    talker_model: str


def checkpoint_kind(model_dir: str) -> Optional[str]:
    """The checkpoint's kind (``tts_model_type`` in its config.json), read without loading anything; None when
    it cannot be read."""
    try:
        kind = json.loads((Path(model_dir) / "config.json").read_text()).get("tts_model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in KINDS else None


def parse_models(spec: str) -> list[tuple[str, str]]:
    """``name=dir,name2=dir2`` -> [(name, dir), ...], checked: valid and unique names, a directory each."""
    pairs = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, model_dir = item.partition("=")
        name, model_dir = name.strip(), model_dir.strip()
        if not sep or not model_dir:
            raise RenderError(f"MODELS: {item!r} is not name=dir (MODELS=name=/path/to/model,name2=/path/to/model2)")
        try:
            check_model_name(name)
        except ModelNameError as exc:
            raise RenderError(f"MODELS: {exc}") from None
        if any(name == seen for seen, _ in pairs):
            raise RenderError(f"MODELS: the name {name!r} is given twice")
        pairs.append((name, model_dir))
    if not pairs:
        raise RenderError("MODELS names no model: use name=dir,name2=dir2")
    return pairs


def mounted_models(spec: str) -> tuple[str, list[str]]:
    """A container's MODELS without the optional models whose weights are not mounted: every model after the first
    whose directory holds no config.json (an empty placeholder mount) is left out, with a note saying so; the first
    (the default) is always kept, and its directory is checked when it loads. Returns (MODELS, notes)."""
    kept, notes = [], []
    for index, (name, model_dir) in enumerate(parse_models(spec)):
        if index and not (Path(model_dir) / "config.json").is_file():
            notes.append(f"no weights at {model_dir}: not serving model '{name}' (mount its checkpoint there)")
            continue
        kept.append(f"{name}={model_dir}")
    return ",".join(kept), notes


def served_models(values: dict[str, str]) -> list[RenderedModel]:
    """The served checkpoints, the default first: MODELS when set, else the one MODEL_DIR."""
    if not values.get("MODELS", "").strip():
        return [RenderedModel(values.get("SERVED_NAME", ""), values["MODEL_DIR"],
                              checkpoint_kind(values["MODEL_DIR"]), *triton_names("", True))]
    return [RenderedModel(name, model_dir, checkpoint_kind(model_dir), *triton_names(name, index == 0))
            for index, (name, model_dir) in enumerate(parse_models(values["MODELS"]))]


def encoder_dir(models: list[RenderedModel]) -> Optional[str]:
    """Where voice_encoder loads its speaker encoder: the first Base checkpoint (one whose kind cannot be read
    here counts as Base, as with a single model); None: no Base model, no voice_encoder."""
    return next((m.model_dir for m in models if m.kind in (BASE, None)), None)


def decoder_dir(models: list[RenderedModel]) -> str:
    """Where codec_decoder loads the speech tokenizer: any checkpoint has it (the family shares one); the
    encoder's when there is one, so that its reference codes and the decoder's priming agree."""
    return encoder_dir(models) or models[0].model_dir


def _render_one(staging: Path, template_name: str, triton_name: str, values: dict[str, str]) -> None:
    src = TEMPLATE_DIR / template_name
    dst = staging / triton_name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.template"))
    (dst / "1").mkdir(exist_ok=True)  # the ensemble's version folder is empty, so git does not keep it
    template = string.Template((src / "config.pbtxt.template").read_text())
    try:
        text = template.substitute(values)
    except KeyError as exc:
        raise RenderError(f"{triton_name}: template uses unknown parameter {exc}") from None
    (dst / "config.pbtxt").write_text(text)


def render(out_dir: Path, values: dict[str, str]) -> Path:
    """Write the rendered repository to ``out_dir`` (replacing it) and return it."""
    out_dir = Path(out_dir)
    models = served_models(values)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    for model in models:
        per_model = {**values, "MODEL_DIR": model.model_dir, "SERVED_NAME": model.name,
                     "TTS_MODEL": model.tts_model, "TALKER_MODEL": model.talker_model}
        _render_one(staging, "talker", model.talker_model, per_model)
        _render_one(staging, "tts", model.tts_model, per_model)
    shared = {**values, "TALKERS": ",".join(m.talker_model for m in models)}
    dirs = {"codec_decoder": decoder_dir(models), "voice_encoder": encoder_dir(models)}
    for name in SHARED_MODELS:
        if name in OPTIONAL_MODELS and not values.get(OPTIONAL_MODELS[name]):
            continue
        if name in dirs and dirs[name] is None:  # no Base model: nothing to clone voices with
            continue
        _render_one(staging, name, name, {**shared, "MODEL_DIR": dirs.get(name) or values["MODEL_DIR"]})
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


def summary(values: dict[str, str]) -> list[str]:
    """What the rendered repository serves, a line per model: served name, Triton names, directory."""
    lines = []
    for index, model in enumerate(served_models(values)):
        name = model.name or "(named from its kind and size)"
        lines.append(f"  {name:32} Triton {model.tts_model}/{model.talker_model}  {model.kind or 'kind ?'}  "
                     f"{model.model_dir}" + ("  (default)" if index == 0 else ""))
    encoder = encoder_dir(served_models(values))
    lines.append(f"  voice_encoder from {encoder}" if encoder
                 else "  no voice_encoder (no Base model: no cloned voices)")
    return lines


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
    print(f"rendered {args.profile} model repository at {out} ({aligner}); served models:")
    print("\n".join(summary(values)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
