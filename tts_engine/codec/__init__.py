"""Codec frames -> 24 kHz audio: the exact streaming decoder (batched over streams) and the table of
per-stream decoder states."""
