"""The engine: plain Python/torch, no Triton imports. The folders follow the data path:

    generation/  text + voice prompt -> codec frames (qwen-tts's prompt, batched talker, serving loop)
    codec/       codec frames -> 24 kHz audio (exact streaming decoder, per-stream states)
    voices/      reference audio (+ transcript) -> voice prompts, and the voices directory
    loading.py   model directories, devices and dtypes;  errors.py  engine errors (contract codes)
"""
