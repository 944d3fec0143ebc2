"""Text to audio through Triton, sentence by sentence: an utterance takes one seat (a slot on a Triton endpoint)
for all its sentences; each sentence is its own request, sent as soon as the one before is generated, with the
audio its listener then has buffered as its deadline (``lead_ms``), so sentences follow each other with no gap
and an utterance holds one talker stream at a time. Shared by the speak sessions and the OpenAI endpoint."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import numpy as np

from tts_contract import delivery
from tts_contract.audio import SAMPLE_RATE

from .delivery import PlaybackClock
from .text import OpenText, TextFeed

_ADMITTED = object()  # put in a sentence's audio queue when its request gets a synthesis slot


@dataclass(frozen=True)
class Timing:
    """When an utterance's listener needs its audio: ``lead_s`` of audio still playing before it (a session's
    previous utterance), ``max_wait_s`` to queue for capacity instead of being refused (0: refuse at once)."""

    lead_s: float = 0.0
    max_wait_s: float = 0.0


async def sentence_audio(triton, settings, feed: TextFeed, voice: Optional[str], language: Optional[str],
                         listener: PlaybackClock, timing: Timing = Timing()) -> AsyncIterator[np.ndarray]:
    """Float32 24 kHz chunks of every sentence of ``feed``, in order; ``listener`` is the utterance's playback
    clock, which the caller advances as it sends audio. The sentences may still be arriving (incremental
    text): waiting for them is not a timeout. Closing the iterator cancels the requests in flight. Raises
    ``SynthesisFailed`` (Triton refused or failed) or ``TimeoutError`` (no audio in time)."""
    sentences: asyncio.Queue = asyncio.Queue()  # each sentence's audio queue in order, then None
    unplayed = [0.0]  # seconds generated but not yet handed to the caller
    planner = asyncio.create_task(_plan(triton, settings, feed, voice, language, listener, timing, sentences,
                                        unplayed))
    try:
        first = True
        while True:
            audio = await sentences.get()
            if audio is None:
                return
            # Before its slot is granted a sentence waits at most as long as it may (then RATE_LIMITED, from
            # the pool); then its first audio may come as late as its listener's buffer allows; from then on,
            # no audio within the synthesis timeout is a TIMEOUT.
            wait = (timing.max_wait_s if first else settings.queue_timeout_s) + 5.0
            first = False
            while True:
                try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel (a `cancel`
                    async with asyncio.timeout(wait):  # message) when the queue already holds an item
                        item = await audio.get()
                except TimeoutError:
                    raise TimeoutError(f"no audio for {wait:g} s") from None
                wait = settings.synthesis_timeout_s
                if isinstance(item, tuple):  # (_ADMITTED, lead): the first chunk may wait for the lead
                    wait += item[1]
                    continue
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                unplayed[0] -= item.size / SAMPLE_RATE
                yield item
    finally:
        planner.cancel()
        await asyncio.gather(planner, return_exceptions=True)


async def _plan(triton, settings, feed: TextFeed, voice, language, listener: PlaybackClock, timing: Timing,
                sentences: asyncio.Queue, unplayed: list) -> None:
    """Request the sentences one after another on one seat, each once the one before is generated."""
    seat = None
    try:
        while True:
            sentence = feed.take_ready()
            if sentence is None:
                if not feed.closed:
                    listener.pause()  # waiting for text: a gap now is the writer's
                sentence = await feed.next()
                listener.resume()
            if sentence is None:
                break
            audio: asyncio.Queue = asyncio.Queue()
            sentences.put_nowait(audio)
            continuing = seat is not None
            lead = listener.lead() + unplayed[0] if continuing else timing.lead_s
            if not continuing:  # the budget counts from when there is text to speak (an LLM may still be writing)
                first_audio_by = time.monotonic() + lead + settings.first_audio_budget_ms / 1000
            try:
                if seat is None:
                    seat = await triton.seat(timing.max_wait_s)
                    seat.listener = listener
                audio.put_nowait((_ADMITTED, lead))
                seat.generating = True
                parameters = {"max_new_tokens": settings.max_new_tokens(sentence), **settings.synthesis_parameters,
                              **_delivery(lead, continuing, timing)}
                async for chunk in seat.synthesize(sentence, voice, language, parameters, continuing, lead,
                                                   None if continuing else first_audio_by + timing.max_wait_s):
                    unplayed[0] += chunk.size / SAMPLE_RATE
                    audio.put_nowait(chunk)
                seat.generating = False
                audio.put_nowait(None)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                audio.put_nowait(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
    finally:
        if seat is not None:
            seat.release()
        sentences.put_nowait(None)


def _delivery(lead_s: float, continuing: bool, timing: Timing) -> dict:
    """A request's delivery parameters: the audio its listener still has, and whether it continues an utterance
    that is playing (never refused for load) or may wait for capacity."""
    parameters = {delivery.LEAD_MS: int(1000 * lead_s)}
    if continuing:
        parameters[delivery.CONTINUATION] = True
    elif timing.max_wait_s:
        parameters[delivery.MAX_WAIT_MS] = int(1000 * timing.max_wait_s)
    return parameters


async def written_audio(triton, settings, text: OpenText, voice: Optional[str], language: Optional[str],
                        listener: PlaybackClock, timing: Timing = Timing()) -> AsyncIterator[np.ndarray]:
    """Float32 24 kHz chunks of ``text`` while it is being written (``textMode`` continuous): one seat, one
    request per segment (most answers are one), whose text grows by appends; the frame cap grows with the text;
    a segment after the first starts when the one before is generated, paced by what its listener still has.
    Closing the iterator cancels the request in flight."""
    # No max_new_tokens: the talker's own default bounds a stream, and its frames_per_char cap grows with the text.
    base = {"frames_per_char": settings.frames_per_char, "frames_base": settings.frames_base,
            **settings.synthesis_parameters}
    seat = await triton.seat(timing.max_wait_s)
    seat.listener = listener
    # While every word written so far has been sent, a gap the listener hears is the writer's.
    text.on_waiting = lambda waiting: listener.pause() if waiting else listener.resume()
    segment, continuing = text.segment(0), False
    try:
        while True:
            lead = listener.lead() if continuing else timing.lead_s
            parameters = {**base, **_delivery(lead, continuing, timing)}
            seat.generating = True
            async for chunk in seat.synthesize("", voice, language, parameters, continuing, lead, written=segment):
                yield chunk
            seat.generating = False
            if segment.end is None or segment.last:
                return
            segment, continuing = text.segment(segment.end), True
    finally:
        seat.generating = False
        seat.release()
