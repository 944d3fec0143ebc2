"""Gateway settings, read once from the environment (every variable is listed in README: Configuration)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from tts_contract import keepalive
from tts_contract.deadlines import DEFAULT_FIRST_AUDIO_BUDGET_MS
from tts_contract.models import ModelNameError, check_model_name
from tts_contract.speech_length import CAP_FRAMES_BASE, CAP_FRAMES_PER_CHAR
from tts_contract.voices import VOICE_ID, VoiceDirectory

from .auth import JWKS_ALGORITHMS, AuthSettings
from .discovery import parse_dns_entry

log = logging.getLogger("gateway.config")


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw.strip() else default
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def _json_object(name: str) -> dict:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def _list(name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in os.environ.get(name, "").split(",") if item.strip())


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {raw!r}")


def _pairs(name: str, form: str, check) -> dict[str, str]:
    """``key=value,key=value`` from the environment variable ``name``; ``check(key, value)`` raises ValueError
    saying what is wrong with an entry (``form``: what an entry looks like, for the messages)."""
    pairs: dict[str, str] = {}
    for entry in _list(name):
        key, equals, value = (part.strip() for part in entry.partition("="))
        if not equals or not key or not value:
            raise ValueError(f"{name}: {entry!r} is not {form}")
        try:
            check(key, value)
        except ValueError as exc:
            raise ValueError(f"{name}: {entry!r}: {exc}") from None
        if key in pairs:
            raise ValueError(f"{name} names {key!r} twice")
        pairs[key] = value
    return pairs


def _check_voice_names(*voice_ids: str) -> None:
    for voice_id in voice_ids:
        if not VOICE_ID.fullmatch(voice_id):
            raise ValueError(f"{voice_id!r} is not a voice name (1-64 characters of a-z, 0-9, '_' and '-')")


def _voice_map(name: str) -> dict[str, str]:
    """``requested=stored,requested=stored``: voice names clients send (OpenAI's, say), each to a stored voice id."""
    return _pairs(name, "name=voice_id (e.g. alloy=my_voice,nova=other_voice)", _check_voice_names)


def _model_aliases(name: str) -> dict[str, str]:
    """``alias=model,alias=model``: names clients may send for a served model (``tts-1=qwen3-tts-1.7b-base``)."""
    return _pairs(name, "alias=model (e.g. tts-1=qwen3-tts-0.6b-base)",
                  lambda alias, model: (check_model_name(alias), check_model_name(model)))


def _model_name(name: str) -> str:
    raw = os.environ.get(name, "").strip()
    try:
        return check_model_name(raw) if raw else ""
    except ModelNameError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _triton_urls() -> tuple[str, ...]:
    """TRITON_URLS (comma-separated) or TRITON_URL; several endpoints spread the load, and a ``dns://name:port``
    entry stands for every address the name resolves to (a headless Service's ready pods)."""
    raw = os.environ.get("TRITON_URLS") or os.environ.get("TRITON_URL") or "127.0.0.1:8001"
    urls = tuple(u.strip() for u in raw.split(",") if u.strip())
    if not urls:
        raise ValueError("TRITON_URLS is empty")
    for url in urls:
        parse_dns_entry(url)  # a malformed dns:// entry stops the start with its reason
    return urls


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8080
    triton_urls: tuple[str, ...] = ("127.0.0.1:8001",)
    voices_dir: str = "voices"
    default_voice: str = ""
    max_sessions: int = 64
    max_queued_utterances: int = 16
    max_text_chars: int = 5000
    max_message_bytes: int = 65536
    max_upload_bytes: int = 10 * 1024 * 1024
    synthesis_timeout_s: float = 20.0
    queue_timeout_s: float = 10.0  # the longest any request may wait in an engine's line (maxWaitMs is capped)
    first_audio_budget_ms: int = DEFAULT_FIRST_AUDIO_BUDGET_MS  # refuse at once unless first audio can come by then
    idle_timeout_s: float = 300.0
    # Faults across hosts: gRPC keepalive pings on every Triton channel (0: off) and the progress deadline, how long
    # past its listener's lead a stream may go without audio before its endpoint counts as failed (0: off)
    grpc_keepalive_ms: int = keepalive.CLIENT_PING_MS
    grpc_keepalive_timeout_ms: int = keepalive.CLIENT_PING_TIMEOUT_MS
    progress_deadline_ms: int = 2000
    drain_s: float = 5.0  # on shutdown, how long the utterance playing may take to finish
    # Served models: which one a request naming none gets (empty: the deployment's default, the one Triton serves as
    # `tts`), and other names clients may use for served models (alias -> served name)
    default_model: str = ""
    model_aliases: dict = field(default_factory=dict)
    openai_model: str = "qwen3-tts"  # a name that means the default model (as OpenAI's names do unless aliased)
    # voice names OpenAI clients send (alloy, nova...) → stored voice ids; OpenAI names not in it: the default voice
    openai_voice_map: dict = field(default_factory=dict)
    openai_ignore_instructions: bool = False  # `instructions` the model cannot follow: ignored (drop-in), not refused
    text_idle_s: float = 5.0  # buffered incremental text with no append for this long is spoken
    ready_poll_s: float = 2.0
    discovery_interval_s: float = 5.0  # how often dns:// entries of TRITON_URLS are resolved again
    auth: AuthSettings = field(default_factory=AuthSettings)  # opaque tokens and JWT verification
    max_sessions_per_subject: int = 16  # sessions open at once per token subject (with auth); 0: no limit
    allowed_origins: tuple[str, ...] = field(default_factory=tuple)  # besides the gateway's own; "*": any
    max_sentence_chars: int = 400
    # textMode continuous: a stream is cut at the first sentence end past this many characters (≈ 25 s of speech:
    # one stream's speaking rate is reported to drift upward after that), and never holds more than
    # max_request_chars (the talker's MAX_TEXT_CHARS)
    continuous_segment_chars: int = 400
    max_request_chars: int = 2000
    # Cap on generated frames per stream: frames_base + frames_per_char * characters (12.5 frames = 1 s; the talker
    # applies it, tts_contract.speech_length). Speech runs at about 0.8 frames per character, so this only stops a
    # model that never ends its speech.
    frames_base: int = CAP_FRAMES_BASE
    frames_per_char: float = CAP_FRAMES_PER_CHAR
    synthesis_parameters: dict = field(default_factory=dict)  # sent with every Triton request
    # Word marks (start.wordTimestamps) and what a listener heard (see gateway/words.py)
    marks_interval_s: float = 0.64  # align an utterance's new audio this often while marks are asked for
    marks_settle_s: float = 0.4  # a word settles once it ended this long before the aligned audio's end
    heard_timeout_s: float = 1.0  # the longest an interrupted utterance's `complete` waits for its heard text
    # Interrupts by contract across replicas: a Redis pub/sub bus (empty: this replica only)
    redis_url: str = ""
    interrupt_channel: str = "tts:interrupts"
    max_contract_id_chars: int = 128

    def keepalive_args(self) -> list:
        """The gRPC channel arguments of the configured keepalive (tts_contract.keepalive)."""
        return _keepalive_args(self)

    @property
    def progress_grace_s(self) -> float:
        return self.progress_deadline_ms / 1000

    @classmethod
    def from_env(cls) -> "Settings":
        auth = AuthSettings(
            tokens=_list("GATEWAY_AUTH_TOKENS"),
            jwt_secret=os.environ.get("GATEWAY_JWT_SECRET", "").strip(),  # a Secret from a file ends in a newline
            jwks_file=os.environ.get("GATEWAY_JWT_JWKS_FILE", "").strip(),
            audience=os.environ.get("GATEWAY_JWT_AUDIENCE", "").strip(),
            issuer=os.environ.get("GATEWAY_JWT_ISSUER", "").strip(),
            leeway_s=_float("GATEWAY_JWT_LEEWAY_S", AuthSettings.leeway_s),
            algorithms=_list("GATEWAY_JWT_ALGORITHMS") or JWKS_ALGORITHMS)
        settings = cls(
            host=os.environ.get("GATEWAY_HOST", cls.host),
            port=_int("GATEWAY_PORT", cls.port),
            triton_urls=_triton_urls(),
            voices_dir=os.environ.get("QWEN_TTS_VOICES_DIR", cls.voices_dir),
            default_voice=os.environ.get("QWEN_TTS_DEFAULT_VOICE", ""),
            max_sessions=_int("GATEWAY_MAX_SESSIONS", cls.max_sessions),
            max_queued_utterances=_int("GATEWAY_MAX_QUEUED_UTTERANCES", cls.max_queued_utterances),
            max_text_chars=_int("GATEWAY_MAX_TEXT_CHARS", cls.max_text_chars),
            max_message_bytes=_int("GATEWAY_MAX_MESSAGE_BYTES", cls.max_message_bytes),
            max_upload_bytes=_int("GATEWAY_MAX_UPLOAD_BYTES", cls.max_upload_bytes),
            synthesis_timeout_s=_float("GATEWAY_SYNTHESIS_TIMEOUT_S", cls.synthesis_timeout_s),
            queue_timeout_s=_float("GATEWAY_QUEUE_TIMEOUT_S", cls.queue_timeout_s),
            first_audio_budget_ms=_int("GATEWAY_FIRST_AUDIO_BUDGET_MS", cls.first_audio_budget_ms),
            idle_timeout_s=_float("GATEWAY_IDLE_TIMEOUT_S", cls.idle_timeout_s),
            grpc_keepalive_ms=_int("GATEWAY_GRPC_KEEPALIVE_MS", cls.grpc_keepalive_ms),
            grpc_keepalive_timeout_ms=_int("GATEWAY_GRPC_KEEPALIVE_TIMEOUT_MS", cls.grpc_keepalive_timeout_ms),
            progress_deadline_ms=_int("GATEWAY_PROGRESS_DEADLINE_MS", cls.progress_deadline_ms),
            drain_s=_float("GATEWAY_DRAIN_S", cls.drain_s),
            text_idle_s=_float("GATEWAY_TEXT_IDLE_S", cls.text_idle_s),
            default_model=_model_name("GATEWAY_DEFAULT_MODEL"),
            model_aliases=_model_aliases("GATEWAY_MODEL_ALIASES"),
            openai_model=os.environ.get("GATEWAY_OPENAI_MODEL", "").strip() or cls.openai_model,
            openai_voice_map=_voice_map("GATEWAY_OPENAI_VOICE_MAP"),
            openai_ignore_instructions=_flag("GATEWAY_OPENAI_IGNORE_INSTRUCTIONS"),
            ready_poll_s=_float("GATEWAY_READY_POLL_S", cls.ready_poll_s),
            auth=auth,
            max_sessions_per_subject=_int("GATEWAY_MAX_SESSIONS_PER_SUBJECT", cls.max_sessions_per_subject),
            discovery_interval_s=_float("TRITON_DISCOVERY_INTERVAL_S", cls.discovery_interval_s),
            allowed_origins=tuple(o.strip().rstrip("/") for o in os.environ.get("GATEWAY_ALLOWED_ORIGINS", "").split(",")
                                  if o.strip()),
            max_sentence_chars=_int("GATEWAY_MAX_SENTENCE_CHARS", cls.max_sentence_chars),
            continuous_segment_chars=_int("GATEWAY_CONTINUOUS_SEGMENT_CHARS", cls.continuous_segment_chars),
            max_request_chars=_int("GATEWAY_MAX_REQUEST_CHARS", cls.max_request_chars),
            frames_base=_int("GATEWAY_FRAMES_BASE", cls.frames_base),
            frames_per_char=_float("GATEWAY_FRAMES_PER_CHAR", cls.frames_per_char),
            synthesis_parameters=_json_object("GATEWAY_SYNTHESIS_PARAMETERS"),
            marks_interval_s=_int("GATEWAY_MARKS_INTERVAL_MS", int(cls.marks_interval_s * 1000)) / 1000,
            marks_settle_s=_int("GATEWAY_MARKS_SETTLE_MS", int(cls.marks_settle_s * 1000)) / 1000,
            heard_timeout_s=_int("GATEWAY_HEARD_TIMEOUT_MS", int(cls.heard_timeout_s * 1000)) / 1000,
            redis_url=os.environ.get("GATEWAY_REDIS_URL", "").strip(),
            interrupt_channel=os.environ.get("GATEWAY_INTERRUPT_CHANNEL", "").strip() or cls.interrupt_channel,
        )
        if not 0.08 <= settings.marks_interval_s <= 10 or not 0 <= settings.marks_settle_s <= 5 or \
                not 0.05 <= settings.heard_timeout_s <= 30:
            raise ValueError("GATEWAY_MARKS_INTERVAL_MS must be within 80..10000, GATEWAY_MARKS_SETTLE_MS within "
                             "0..5000 and GATEWAY_HEARD_TIMEOUT_MS within 50..30000")
        if settings.redis_url and not settings.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"GATEWAY_REDIS_URL must be a redis://, rediss:// or unix:// URL, got "
                             f"{settings.redis_url[:40]!r}")
        for name in ("max_sessions", "max_queued_utterances", "max_text_chars", "max_message_bytes",
                     "max_upload_bytes", "max_sentence_chars", "first_audio_budget_ms", "continuous_segment_chars",
                     "max_request_chars"):
            if getattr(settings, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if settings.max_sessions_per_subject < 0 or not 0 <= settings.auth.leeway_s <= 600:
            raise ValueError("GATEWAY_MAX_SESSIONS_PER_SUBJECT must be >= 0 and GATEWAY_JWT_LEEWAY_S in 0..600")
        if len(settings.auth.jwt_secret) in range(1, 32):  # RFC 7518: an HS256 key at least as long as the hash
            raise ValueError("GATEWAY_JWT_SECRET must be at least 32 characters")
        if settings.discovery_interval_s <= 0:
            raise ValueError("TRITON_DISCOVERY_INTERVAL_S must be > 0")
        if settings.queue_timeout_s <= 0:
            raise ValueError("GATEWAY_QUEUE_TIMEOUT_S must be > 0")
        if settings.progress_deadline_ms < 0 or settings.grpc_keepalive_timeout_ms < 1:
            raise ValueError("GATEWAY_PROGRESS_DEADLINE_MS must be >= 0 (0: off) and GATEWAY_GRPC_KEEPALIVE_TIMEOUT_MS "
                             ">= 1")
        settings.keepalive_args()  # a ping more often than Triton accepts stops the start
        _warn_of_unmapped_voices(settings)
        return settings


def _keepalive_args(settings: Settings) -> list:
    """The gRPC channel arguments of the configured keepalive (ValueError: pings more often than Triton accepts)."""
    try:
        return keepalive.channel_args(settings.grpc_keepalive_ms, settings.grpc_keepalive_timeout_ms)
    except ValueError as exc:
        raise ValueError(f"GATEWAY_GRPC_KEEPALIVE_MS: {exc}") from None


def _warn_of_unmapped_voices(settings: Settings) -> None:
    """A map entry whose voice is not stored (yet) is logged, not fatal: voices are added and deleted while the
    gateway runs, and one missing voice should not keep every other route down; its requests get a 404 naming
    the entry."""
    voices = VoiceDirectory(settings.voices_dir)
    missing = [f"{name}={voice_id}" for name, voice_id in settings.openai_voice_map.items()
               if not voices.exists(voice_id)]
    if missing:
        log.warning("GATEWAY_OPENAI_VOICE_MAP names voices that are not in %s: %s (requests for them get 404 "
                    "until the voices are added)", settings.voices_dir, ", ".join(missing))
