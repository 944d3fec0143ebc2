"""Serving: what runs when. The engine loop (``engine``) runs schedule -> execute -> update: the pure
``scheduler`` decides over plain ``tickets`` (admission, refusal, which rows step, which frames go out), with the
``costs`` it measures (``calibration``) and each stream's ``pacing``; events leave through the ``outbox``'s
sender thread; ``stats`` are the figures it reports. The model step itself is ``tts_engine.generation``."""
