"""Text to audio through Triton, sentence by sentence: each sentence is its own request, requested as soon as
the one before is generated, with the audio its listener then has buffered as its deadline (``lead_ms``), so
sentences follow each other with no gap and an utterance holds one talker stream at a time. Shared by the
speak sessions and the OpenAI endpoint."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import numpy as np

from tts_contract import delivery
from tts_contract.audio import SAMPLE_RATE

from .delivery import PlaybackClock
from .text import TextFeed

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
    """Request the sentences one after another, each once the one before is generated."""
    continuing = False
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
            lead = listener.lead() + unplayed[0] if continuing else timing.lead_s
            if not await _produce(triton, settings, sentence, voice, language, audio, unplayed, continuing, lead,
                                  timing.max_wait_s):
                return
            continuing = True
    finally:
        sentences.put_nowait(None)


async def _produce(triton, settings, sentence: str, voice: Optional[str], language: Optional[str],
                   out: asyncio.Queue, unplayed: list, continuing: bool, lead_s: float, max_wait_s: float) -> bool:
    """One sentence's audio chunks into ``out``, then None (or the exception it failed with); True when it
    was generated to its end."""
    parameters = {"max_new_tokens": settings.max_new_tokens(sentence), **settings.synthesis_parameters,
                  delivery.LEAD_MS: int(1000 * lead_s)}
    if continuing:
        parameters[delivery.CONTINUATION] = True
    else:
        parameters[delivery.FIRST_AUDIO_BUDGET_MS] = int(settings.first_audio_budget_ms + 1000 * lead_s)
        if max_wait_s:
            parameters[delivery.MAX_WAIT_MS] = int(1000 * max_wait_s)
    try:
        async for chunk in triton.synthesize(sentence, voice, language, parameters,
                                             admitted=lambda: out.put_nowait((_ADMITTED, lead_s)),
                                             continuing=continuing, lead_s=lead_s, max_wait_s=max_wait_s):
            unplayed[0] += chunk.size / SAMPLE_RATE
            out.put_nowait(chunk)
        out.put_nowait(None)
        return True
    except BaseException as exc:  # handed to the consumer, which re-raises it
        out.put_nowait(exc)
        if isinstance(exc, asyncio.CancelledError):
            raise
        return False
