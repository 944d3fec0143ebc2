"""Make torchaudio importable next to a CPU-only torch.

qwen_tts imports torchaudio (its 25 Hz tokenizer uses torchaudio.compliance.kaldi, pure Python). PyPI only
has CUDA builds of recent torchaudio, whose compiled extension fails to load against CPU torch
(libc10_cuda.so). torchaudio runs in pure-Python mode when its extension files are absent, so on a CPU-only
torch we remove them. With a CUDA torch nothing is changed.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path


def main() -> int:
    import torch

    spec = importlib.util.find_spec("torchaudio")
    if spec is None or spec.origin is None:
        print("torchaudio not installed; nothing to do")
        return 0
    probe = subprocess.run([sys.executable, "-c", "import torchaudio"], capture_output=True, text=True)
    if probe.returncode == 0:
        print("torchaudio imports cleanly; nothing to do")
        return 0
    if torch.version.cuda is not None:
        print(probe.stderr, file=sys.stderr)
        print("torchaudio fails to import with a CUDA torch: install a torchaudio matching torch", file=sys.stderr)
        return 1
    lib_dir = Path(spec.origin).parent / "lib"
    removed = [path for path in lib_dir.glob("*.so")]
    for path in removed:
        path.unlink()
    probe = subprocess.run([sys.executable, "-c", "import torchaudio"], capture_output=True, text=True)
    if probe.returncode != 0:
        print(probe.stderr, file=sys.stderr)
        return 1
    print(f"torchaudio: removed {len(removed)} CUDA extension file(s); it now runs in pure-Python mode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
