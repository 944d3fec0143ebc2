"""Text -> codec frames: the prompt (built by qwen-tts), sampling, the batched talker and its KV arena, and
the serving loop that admits, steps and chunks every stream."""
