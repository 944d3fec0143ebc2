"""What crosses a process boundary, defined once: tensor names and types, the talker's commands, error codes,
deadlines, the listener's arithmetic, speech length, languages, audio constants, limits and the voices directory
layout. Torch-free, so the gateway and clients import it too.

    audio          sample rate, frame size, codebooks
    tensors        every Triton model's inputs and outputs (the config templates are checked against them)
    commands       the talker's typed, versioned control commands (cancel, append, flush, end, status)
    errors         engine error codes, their wire format, and the speak protocol's codes they become
    deadlines      when a stream's listener needs its audio (request parameters), and the retry hint of a refusal
    listener       what a listener hears: lead, underruns, stalls (engine pacing and gateway figures alike)
    speech_length  how long speech is expected to be, and the frame cap that stops runaway speech
    languages      the ten languages and their one normaliser
    limits         request limits and defaults
    voices         the voices directory: ids, file names, the prompt cache's metadata
"""
