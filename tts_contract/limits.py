"""Limits and defaults that more than one process relies on."""

# Text of one Triton request (the gateway splits longer text into sentences first).
MAX_TEXT_CHARS = 2000
# Frames a request may ask for (max_new_tokens), and the default when it asks for none.
MAX_NEW_TOKENS_LIMIT = 4096
DEFAULT_MAX_NEW_TOKENS = 2048
# A prompt (role and codec tags, plus the reference codes of an ICL voice) fits in this many talker
# positions; a stream's KV blocks may grow to it plus MAX_NEW_TOKENS_LIMIT generated tokens.
PROMPT_TOKENS = 1024
# Reference clips of cloned voices.
MIN_REFERENCE_SECONDS = 3.0
MAX_REFERENCE_SECONDS = 30.0
# Streams the talker holds at once (the CPU profile's default; see tools/render_model_repository.py).
DEFAULT_ACTIVE_STREAMS = 16
# A voice's transcript (tokenised with its prompt), and its display metadata.
MAX_TRANSCRIPT_CHARS = 1000
MAX_VOICE_NAME_CHARS = 100
MAX_VOICE_DESCRIPTION_CHARS = 500
# Audio the word aligner takes in one request: qwen-asr never aligns more than 180 s at once
# (MAX_FORCE_ALIGN_INPUT_SECONDS; its own ASR cuts longer audio into pieces first).
MAX_ALIGN_SECONDS = 180.0
