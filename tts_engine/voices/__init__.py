"""Voices: prompts from reference audio (+ transcript), and the voices directory with its prompt cache."""
