"""Text to audio through Triton, sentence by sentence: each sentence is its own request, and the next one is
requested while the current one plays, so sentences follow each other with no gap. Shared by the speak
sessions and the OpenAI endpoint."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Optional

import numpy as np

from .text import TextFeed

_ADMITTED = object()  # put in a sentence's audio queue when its request gets a synthesis slot


async def sentence_audio(triton, settings, feed: TextFeed, voice: Optional[str],
                         language: Optional[str]) -> AsyncIterator[np.ndarray]:
    """Float32 24 kHz chunks of every sentence of ``feed``, in order. The sentences may still be arriving
    (incremental text): waiting for them is not a timeout. Closing the iterator cancels the requests in
    flight. Raises ``SynthesisFailed`` (Triton refused or failed) or ``TimeoutError`` (no audio in time)."""
    # Before its slot is granted a sentence waits at most the queue timeout (then RATE_LIMITED, from the
    # pool); from then on, no audio within the synthesis timeout is a TIMEOUT.
    admission_timeout = settings.queue_timeout_s + 5.0
    producers: list[asyncio.Task] = []
    queues: list[asyncio.Queue] = []

    def start(sentence: Optional[str]) -> None:
        if sentence is not None:
            queues.append(asyncio.Queue())
            producers.append(asyncio.create_task(_produce(triton, settings, sentence, voice, language, queues[-1],
                                                          continuing=len(producers) > 0)))

    try:
        index = 0
        while True:
            if index == len(producers):
                start(await feed.next())
                if index == len(producers):
                    return  # the feed is closed and every sentence played
            if index + 1 == len(producers):
                start(feed.take_ready())  # look ahead one sentence: no gap between sentences
            wait = admission_timeout
            while True:
                try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel (a `cancel`
                    async with asyncio.timeout(wait):  # message) when the queue already holds an item
                        item = await queues[index].get()
                except TimeoutError:
                    raise TimeoutError(f"no audio for {wait:g} s") from None
                wait = settings.synthesis_timeout_s
                if item is _ADMITTED:
                    continue
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
                if index + 1 == len(producers):
                    start(feed.take_ready())  # a sentence completed while this one plays
            index += 1
    finally:
        for task in producers:
            task.cancel()
        await asyncio.gather(*producers, return_exceptions=True)


async def _produce(triton, settings, sentence: str, voice: Optional[str], language: Optional[str],
                   out: asyncio.Queue, continuing: bool) -> None:
    """One sentence's audio chunks into ``out``, then None (or the exception it failed with)."""
    parameters = {"max_new_tokens": settings.max_new_tokens(sentence), **settings.synthesis_parameters}
    try:
        async for chunk in triton.synthesize(sentence, voice, language, parameters,
                                             admitted=lambda: out.put_nowait(_ADMITTED), continuing=continuing):
            out.put_nowait(chunk)
        out.put_nowait(None)
    except BaseException as exc:  # handed to the consumer, which re-raises it
        out.put_nowait(exc)
        if isinstance(exc, asyncio.CancelledError):
            raise
