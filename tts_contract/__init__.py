"""What crosses a process boundary, defined once: tensor names and types, error codes, languages, audio
constants, limits and the voices directory layout. Torch-free, so the gateway and clients import it too.

    audio      sample rate, frame size, codebooks
    tensors    every Triton model's inputs and outputs (the config templates are checked against them)
    errors     engine error codes, their wire format, and the speak protocol's codes they become
    languages  the ten languages and their one normaliser
    limits     request limits and defaults
    voices     the voices directory: ids, file names, the prompt cache's metadata
"""
