"""Word timestamps for audio whose text is known: Qwen3-ForcedAligner through qwen-asr, each word mapped back to
its characters in the text."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tts_contract.languages import UnknownLanguage
from tts_contract.limits import MAX_ALIGN_SECONDS, MAX_TEXT_CHARS
from tts_contract.words import Word

from ..errors import InvalidAudio, InvalidText, ModelDirError, UnsupportedLanguage
from ..loading import _load_lock, resolve_device, resolve_dtype
from .spans import alignment_language, has_words, word_spans

log = logging.getLogger(__name__)

# Files the loader opens; a directory lacking any of them is refused before torch is touched.
REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json")
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000
# Whisper's log-mel front end reflects 200 samples at each end of the 16 kHz clip: shorter audio cannot be aligned.
MIN_ALIGN_SECONDS = 0.02


@dataclass(frozen=True)
class AlignItem:
    """One request: mono float32 audio, its sample rate, the text said in it, and its language (None: Auto)."""

    audio: np.ndarray
    sample_rate: int
    text: str
    language: Optional[str] = None


def check_aligner_dir(aligner_dir: str | os.PathLike) -> Path:
    """Return the directory as a Path, or raise ModelDirError naming what is missing."""
    path = Path(aligner_dir).expanduser()
    if not path.is_dir():
        raise ModelDirError(f"aligner directory {path} does not exist. Set QWEN_TTS_ALIGNER_DIR to a local copy of "
                            "Qwen/Qwen3-ForcedAligner-0.6B, or leave it empty to serve no word timestamps.")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        missing.append("tokenizer.json or vocab.json")
    if missing:
        raise ModelDirError(f"aligner directory {path} is incomplete; missing: {', '.join(missing)}")
    return path


def check_item(item: AlignItem) -> AlignItem:
    """The item with mono float32 audio and the language the aligner splits its text as, or an engine error
    saying what is wrong with it."""
    audio = np.asarray(item.audio, dtype=np.float32)
    if audio.ndim != 1:
        raise InvalidAudio(f"audio must be mono samples (one dimension), got shape {audio.shape}")
    if not MIN_SAMPLE_RATE <= int(item.sample_rate) <= MAX_SAMPLE_RATE:
        raise InvalidAudio(f"sample rate {item.sample_rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    seconds = audio.shape[0] / float(item.sample_rate)
    if audio.shape[0] == 0:
        raise InvalidAudio("audio is empty: there is nothing to align")
    if seconds < MIN_ALIGN_SECONDS:
        raise InvalidAudio(f"audio is {seconds * 1000:.1f} ms; at least {MIN_ALIGN_SECONDS * 1000:g} ms is needed")
    if seconds > MAX_ALIGN_SECONDS:
        raise InvalidAudio(f"audio is {seconds:.1f} s; the aligner takes at most {MAX_ALIGN_SECONDS:g} s at once")
    if not np.isfinite(audio).all():
        raise InvalidAudio("audio contains NaN or infinite samples")
    if item.text is None:
        raise InvalidText("text is required: the words said in the audio")
    if len(item.text) > MAX_TEXT_CHARS:
        raise InvalidText(f"text has {len(item.text)} characters; the limit is {MAX_TEXT_CHARS}")
    try:
        language = alignment_language(item.language, item.text)
    except UnknownLanguage as exc:
        raise UnsupportedLanguage(str(exc)) from None
    return AlignItem(audio, int(item.sample_rate), item.text, language)


def _milliseconds(seconds: float) -> int:
    """qwen-asr's times are integer milliseconds divided by 1000 and rounded to 3 places: this undoes it exactly."""
    return int(round(seconds * 1000.0))


class WordAligner:
    """A loaded Qwen3-ForcedAligner (qwen-asr's wrapper); one caller at a time."""

    def __init__(self, aligner, aligner_dir: Path, device: str, dtype):
        self.aligner = aligner  # qwen_asr.Qwen3ForcedAligner
        self.aligner_dir, self.device, self.dtype = aligner_dir, device, dtype
        from .tiny_aligner import MARKER as TINY_MARKER  # (here: `python -m ...tiny_aligner` runs it unimported)

        self.is_tiny = (aligner_dir / TINY_MARKER).is_file()  # built by tiny_aligner (either preset): random weights

    def align_batch(self, items: Sequence[AlignItem]) -> list[list[Word]]:
        """Each item's words, times and characters: exactly what ``Qwen3ForcedAligner.align`` gives for that item
        alone. Raises an engine error for the first bad item."""
        # One item at a time, not align() on the batch: qwen-asr pads a batch, and padding moves the logits (a
        # shorter clip's last log-mel frame sees the padding's zeros instead of its own reflection; text is
        # left-padded). In float32 that moved logits by up to 1e-3 and changed an argmax in 1 of 16 items on the
        # tiny aligner and in 3 of 4 on full-size random weights; bf16 on a GPU moves them more. What it costs:
        # python -m bench.aligner (results/aligner.json).
        return [self._align_one(item) for item in [check_item(item) for item in items]]

    def _align_one(self, item: AlignItem) -> list[Word]:
        if not has_words(item.text):  # align() finds no word either; the model need not run
            return []
        result = self.aligner.align(audio=(item.audio, item.sample_rate), text=item.text,
                                    language=item.language)[0]
        spans = word_spans(item.text, [aligned.text for aligned in result])
        return [Word(aligned.text, _milliseconds(aligned.start_time), _milliseconds(aligned.end_time), start, end)
                for aligned, (start, end) in zip(result, spans)]


def load_aligner(aligner_dir: str | os.PathLike, device: str = "auto", dtype: Optional[str] = None) -> WordAligner:
    """Load the aligner from a local directory; nothing is fetched from a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = check_aligner_dir(aligner_dir)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    with _load_lock:  # transformers' Auto* registries are process-global
        from qwen_asr import Qwen3ForcedAligner

        aligner = Qwen3ForcedAligner.from_pretrained(str(path), dtype=torch_dtype, device_map=device,
                                                     local_files_only=True)
    aligner.model.eval()
    thinker = aligner.model.config.thinker_config
    if "forced_aligner" not in getattr(thinker, "model_type", ""):
        raise ModelDirError(f"{path} is not a forced aligner (thinker_config.model_type is "
                            f"{getattr(thinker, 'model_type', None)!r}); use Qwen/Qwen3-ForcedAligner-0.6B")
    loaded = WordAligner(aligner, path, device, torch_dtype)
    log.info("loaded %s aligner from %s on %s (%s)", "RANDOM-WEIGHT test" if loaded.is_tiny else "Qwen3-ForcedAligner",
             path, device, str(torch_dtype).replace("torch.", ""))
    return loaded
