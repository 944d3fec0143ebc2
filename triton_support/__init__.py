"""Triton-aware helpers the model adapters (model_repository/*/1/model.py) share; the engine never imports
them. The Triton utils module (triton_python_backend_utils) is passed in, never imported here.

    commands      a talker request decoded once: synthesis, or one typed control command
    cancellation  Triton's client cancellation, watched off the stepping thread, turned into the engine's cancel
    streaming     the talker's `codes` responses (CodesSink), clients' keys for their streams, the decoder's chunks
    params        a model instance's rendered parameters, device, dtype and logging
    tensors       request tensors in, responses (and ``[CODE] message`` errors) out
    metrics       counters and gauges published from their own thread
    queueing      a decoupled model's request queue, drained in batches by one worker thread
"""
