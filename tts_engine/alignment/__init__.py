"""Word timestamps: Qwen3-ForcedAligner (through qwen-asr) on audio whose text is known. No Triton imports."""
from .aligner import AlignItem, WordAligner, check_aligner_dir, check_item, load_aligner

__all__ = ["AlignItem", "WordAligner", "check_aligner_dir", "check_item", "load_aligner"]
