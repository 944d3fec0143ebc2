"""When a request's listener needs its audio: request parameters the gateway sends with each `tts`/`talker`
request (beside the sampling parameters), and the talker's answer when it cannot serve one in time."""

# Request parameters (Triton request parameters, like the sampling ones).
LEAD_MS = "lead_ms"  # audio the listener already has buffered ahead of this request's first audio (ms, >= 0)
CONTINUATION = "continuation"  # bool: a later sentence of an utterance that is playing; never refused for load
FIRST_AUDIO_BUDGET_MS = "first_audio_budget_ms"  # refuse at once (OVERLOADED) unless first audio comes by then
MAX_WAIT_MS = "max_wait_ms"  # a client that can wait: queue up to this long for capacity instead of a refusal
NAMES = (LEAD_MS, CONTINUATION, FIRST_AUDIO_BUDGET_MS, MAX_WAIT_MS)

DEFAULT_FIRST_AUDIO_BUDGET_MS = 1000
MAX_WAIT_LIMIT_MS = 600_000  # the longest any request may ask to wait
MAX_LEAD_MS = 3_600_000

# An OVERLOADED refusal says when to try again in its message: "... (retry_after_ms=1200)".
RETRY_AFTER_FIELD = "retry_after_ms"


def with_retry_after(message: str, retry_after_ms: int) -> str:
    return f"{message} ({RETRY_AFTER_FIELD}={int(retry_after_ms)})"


def retry_after_ms(message: str) -> "int | None":
    """The retry hint of a refusal's message, if it has one."""
    marker = f"({RETRY_AFTER_FIELD}="
    start = (message or "").rfind(marker)
    if start < 0:
        return None
    digits = message[start + len(marker):].split(")", 1)[0]
    return int(digits) if digits.isdigit() else None
