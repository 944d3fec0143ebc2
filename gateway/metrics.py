"""Prometheus metrics of the gateway (names prefixed tts_gateway_), and what a listener heard of each chunk."""
from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry()

ACTIVE_SESSIONS = Gauge("tts_gateway_active_sessions", "WebSocket sessions open now", registry=REGISTRY)
UTTERANCES = Counter("tts_gateway_utterances_total", "Utterances ended, by outcome", ["outcome"],
                     registry=REGISTRY)
ERRORS = Counter("tts_gateway_errors_total", "Error messages sent to clients, by code", ["code"],
                 registry=REGISTRY)
TIME_TO_FIRST_AUDIO = Histogram(
    "tts_gateway_time_to_first_audio_seconds", "From text received (speak, first append, speech request) to first audio sent", registry=REGISTRY,
    buckets=(0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0))
REAL_TIME_FACTOR = Histogram(
    "tts_gateway_real_time_factor", "Utterance wall time over its audio duration (< 1 is faster than real time)",
    registry=REGISTRY, buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0))
AUDIO_SECONDS = Counter("tts_gateway_audio_seconds_total", "Seconds of audio sent to clients",
                        registry=REGISTRY)
OPENAI_REQUESTS = Counter("tts_gateway_openai_speech_requests_total",
                          "POST /v1/audio/speech requests, by outcome (refused: answered with an error status)",
                          ["outcome"], registry=REGISTRY)
UNDERRUNS = Counter("tts_gateway_underruns_total", "Times a listener's buffer ran dry within an utterance (audio "
                    "sent later than real-time playback from its first audio needed it)", registry=REGISTRY)
STALL_SECONDS = Counter("tts_gateway_stall_seconds_total", "Seconds listeners waited with an empty buffer within "
                        "utterances", registry=REGISTRY)
LEAD = Histogram("tts_gateway_lead_seconds", "Audio a listener still had buffered when the next chunk was sent",
                 registry=REGISTRY, buckets=(0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0))
CHUNK_SECONDS = Histogram("tts_gateway_chunk_audio_seconds", "Audio per chunk sent to clients", registry=REGISTRY,
                          buckets=(0.08, 0.16, 0.24, 0.32, 0.48, 0.64, 0.96, 1.28, 2.0))
ENDPOINT_HEADROOM = Gauge("tts_gateway_endpoint_headroom_streams", "New streams a Triton endpoint's talker could "
                          "start now, as it last reported", ["endpoint"], registry=REGISTRY)
ENDPOINT_REALTIME = Gauge("tts_gateway_endpoint_realtime_streams", "Streams a Triton endpoint's talker can step "
                          "together and stay ahead of real time, as it last reported", ["endpoint"], registry=REGISTRY)
# Per served model (a deployment serves a few: the label stays small; names come from the talkers, never from clients)
MODEL_ENDPOINTS = Gauge("tts_gateway_model_endpoints", "Usable Triton endpoints serving a model", ["model"],
                        registry=REGISTRY)
MODEL_HEADROOM = Gauge("tts_gateway_model_headroom_streams", "New streams the talkers serving a model could start "
                       "now, all usable endpoints together, as they last reported", ["model"], registry=REGISTRY)
MODEL_STREAMS = Counter("tts_gateway_model_streams_total", "Synthesis streams sent to the engines, by served model",
                        ["model"], registry=REGISTRY)
ENDPOINTS = Gauge("tts_gateway_endpoints", "Triton endpoints this gateway knows, by state (ready, not_ready, "
                  "draining: gone from discovery, finishing its streams)", ["state"], registry=REGISTRY)
DEMAND = Gauge("tts_gateway_demand_streams", "Streams this gateway has open on the engines (running or waiting in "
               "their lines), plus the streams the requests refused in the last 30 s would have kept busy",
               registry=REGISTRY)
UTILIZATION = Gauge("tts_gateway_realtime_utilization", "Demand over the real-time capacity of the ready Triton "
                    "endpoints (streams each talker measured it can step ahead of real time); above 1: add a pod",
                    registry=REGISTRY)
TRITON_READY = Gauge("tts_gateway_triton_ready", "1 when a Triton endpoint and its models are ready, by endpoint",
                     ["endpoint"], registry=REGISTRY)
INTERRUPT_BUS_UP = Gauge("tts_gateway_interrupt_bus_up", "1 when interrupts by contract reach every gateway replica "
                         "(the Redis bus is subscribed, or there is no bus: one replica); 0: this replica only",
                         registry=REGISTRY)
INTERRUPTS = Counter("tts_gateway_interrupts_total", "Interrupts by contract taken by this replica, by how far they "
                     "reached (all_replicas, or this_replica when the bus was down)", ["reach"], registry=REGISTRY)
MARKS_WORDS = Counter("tts_gateway_marked_words_total", "Words whose times were sent to clients in marks messages",
                      registry=REGISTRY)

for _reach in ("all_replicas", "this_replica"):
    INTERRUPTS.labels(_reach)
for _outcome in ("completed", "cancelled", "failed"):
    UTTERANCES.labels(_outcome)
    OPENAI_REQUESTS.labels(_outcome)
OPENAI_REQUESTS.labels("refused")


def record_chunk(listener, seconds: float, now: Optional[float] = None) -> None:
    """Audio sent to a listener (a ``tts_contract.listener.Listener``): the lead it found, the chunk's size and any
    stall it ended, into the metrics."""
    if listener.play_start is not None:
        LEAD.observe(listener.buffered(now))
    CHUNK_SECONDS.observe(seconds)
    stall = listener.add(seconds, now)
    if stall:
        UNDERRUNS.inc()
        STALL_SECONDS.inc(stall)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
