"""Text to audio for one utterance, through its route to the engines. Shared by the speak sessions and the OpenAI
endpoint.

Sentences (``sentence_audio``): each sentence is its own stream, requested as soon as the one before is generated
(not played), with the audio its listener then still has as its deadline (``lead_ms``, ``continuation``), so
sentences follow each other with no gap and an utterance holds one engine row at a time. A task generates them
in order into one buffer; the caller takes the audio from it as fast as its listener's socket allows.

Text still being written (``written_audio``, ``textMode`` continuous): one stream per segment (most answers are
one), whose text grows by appends; a segment after the first starts when the one before is generated.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import numpy as np

from tts_contract import deadlines
from tts_contract.audio import SAMPLE_RATE
from tts_contract.listener import Listener

from .endpoints import Endpoints
from .routing import Route
from .text import SentenceFeed, WrittenText


@dataclass(frozen=True)
class Timing:
    """When an utterance's listener needs its audio: ``lead_s`` of audio still playing before it (a session's
    previous utterance), ``max_wait_s`` to queue for capacity instead of being refused (0: refuse at once)."""

    lead_s: float = 0.0
    max_wait_s: float = 0.0


def deadline_parameters(lead_s: float, continuation: bool, max_wait_s: float) -> dict:
    """A stream's deadline parameters: the audio its listener still has, and whether it continues an utterance
    that is playing (never refused for load) or may wait for capacity."""
    parameters = {deadlines.LEAD_MS: int(1000 * lead_s)}
    if continuation:
        parameters[deadlines.CONTINUATION] = True
    elif max_wait_s:
        parameters[deadlines.MAX_WAIT_MS] = int(1000 * max_wait_s)
    return parameters


class _Generated:
    """Audio generated for an utterance and not yet taken: chunks in order (then None, or the error that ended
    it), the seconds they hold, and whether generation waits for the writer (text not written yet: not a
    timeout). Bounded by what one utterance produces."""

    def __init__(self):
        self._items: deque = deque()
        self.seconds = 0.0
        self.waiting_for_text = False
        self._changed = asyncio.Event()

    def put(self, item) -> None:
        if isinstance(item, np.ndarray):
            self.seconds += item.size / SAMPLE_RATE
        self._items.append(item)
        self._changed.set()

    def writer(self, waiting: bool) -> None:
        self.waiting_for_text = waiting
        self._changed.set()

    async def take(self, timeout_s: float):
        """The next item; TimeoutError when none came within ``timeout_s`` (writer's gaps not counted)."""
        while not self._items:
            self._changed.clear()
            if self.waiting_for_text:
                await self._changed.wait()
                continue
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel (a `cancel` message)
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait()
            except TimeoutError:
                raise TimeoutError(f"no audio for {timeout_s:g} s") from None
        item = self._items.popleft()
        if isinstance(item, np.ndarray):
            self.seconds -= item.size / SAMPLE_RATE
        return item


def _stream_parameters(settings, lead_s: float, continuation: bool, timing: Timing) -> dict:
    """Every stream's parameters: the frame cap per character (tts_contract.speech_length), the configured
    synthesis parameters, and its deadline."""
    return {"frames_per_char": settings.frames_per_char, "frames_base": settings.frames_base,
            **settings.synthesis_parameters, **deadline_parameters(lead_s, continuation, timing.max_wait_s)}


async def sentence_audio(endpoints: Endpoints, settings, feed: SentenceFeed, voice: Optional[str],
                         language: Optional[str], listener: Listener, timing: Timing = Timing(),
                         model: Optional[str] = None, instruct: Optional[str] = None) -> AsyncIterator[np.ndarray]:
    """Float32 24 kHz chunks of every sentence of ``feed``, in order, from the served model ``model`` (None: the
    deployment's default) with ``instruct`` (for the models that take one); ``listener`` is the utterance's
    listener, which the caller advances as it sends audio. The sentences may still be arriving: waiting for them is
    not a timeout. Closing the iterator cancels the streams in flight. Raises ``SynthesisFailed`` (an engine refused
    or failed) or ``TimeoutError`` (no audio in time)."""
    generated = _Generated()
    route = Route(endpoints, model, settings.progress_grace_s)
    generating = asyncio.create_task(_generate_sentences(route, settings, feed, voice, language,
                                                         listener, timing, generated, instruct))
    try:
        # Audio may come as late as its listener's buffer allows (the engine holds frames its listener does not
        # need yet) plus the synthesis timeout; the first audio, also the wait in an engine's line the client
        # allowed (the engine itself refuses a stream it cannot start within its first-audio budget).
        patience = timing.max_wait_s
        while True:
            item = await generated.take(settings.synthesis_timeout_s + patience + listener.buffered())
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            patience = 0.0
            yield item
    finally:
        generating.cancel()
        await asyncio.gather(generating, return_exceptions=True)


async def _generate_sentences(route: Route, settings, feed: SentenceFeed, voice, language, listener: Listener,
                              timing: Timing, generated: _Generated, instruct: Optional[str] = None) -> None:
    """Generate the sentences one after another, each once the one before is generated."""
    continuation = False
    try:
        while True:
            sentence = feed.take_ready()
            if sentence is None:
                if not feed.closed:
                    listener.pause()  # waiting for text: a gap now is the writer's
                    generated.writer(waiting=True)
                sentence = await feed.next()
                listener.resume()
                generated.writer(waiting=False)
            if sentence is None:
                break
            # A new utterance's budget counts from when there is text to speak (an LLM may still be writing).
            lead = listener.buffered() + generated.seconds if continuation else timing.lead_s
            first_audio_by = None if continuation else \
                time.monotonic() + lead + settings.first_audio_budget_ms / 1000 + timing.max_wait_s
            parameters = _stream_parameters(settings, lead, continuation, timing)
            async with contextlib.aclosing(route.stream(
                    sentence, voice, language, parameters, continuation, first_audio_by, instruct=instruct,
                    lead=lambda: listener.buffered() + generated.seconds)) as audio:
                async for chunk in audio:  # (closed however this ends: a cancel reaches its engine at once)
                    generated.put(chunk)
            continuation = True
        generated.put(None)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # handed to the consumer, which raises it
        generated.put(exc)


async def written_audio(endpoints: Endpoints, settings, text: WrittenText, voice: Optional[str],
                        language: Optional[str], listener: Listener, timing: Timing = Timing(),
                        model: Optional[str] = None, instruct: Optional[str] = None) -> AsyncIterator[np.ndarray]:
    """Float32 24 kHz chunks of ``text`` while it is being written, from the served model ``model`` (None: the
    default) with ``instruct``: one stream per segment, whose text grows by appends; the frame cap grows with the
    text; a segment after the first starts when the one before is generated, paced by what its listener still has.
    Closing the iterator cancels the stream in flight."""
    route = Route(endpoints, model, settings.progress_grace_s)
    # While every word written so far has been sent, a gap the listener hears is the writer's: no audio is due,
    # except for text sent since the last audio (due within the lead the listener had when it was sent).
    writer = {"waiting": False, "owed": None}  # owed: (when text came after the last audio, the lead then)

    def on_waiting(waiting: bool) -> None:
        writer["waiting"] = waiting
        if not waiting and writer["owed"] is None:
            writer["owed"] = (time.monotonic(), listener.buffered())
        listener.pause() if waiting else listener.resume()

    def audio_due_in() -> Optional[float]:
        if not writer["waiting"]:
            return listener.buffered()
        if writer["owed"] is None:
            return None
        since, lead_then = writer["owed"]
        return max(0.0, since + lead_then - time.monotonic())

    text.on_waiting = on_waiting
    segment, continuation = text.segment(0), False
    while True:
        lead = listener.buffered() if continuation else timing.lead_s
        parameters = _stream_parameters(settings, lead, continuation, timing)
        async with contextlib.aclosing(route.stream(
                "", voice, language, parameters, continuation, written=segment, instruct=instruct,
                lead=audio_due_in)) as audio:
            async for chunk in audio:
                writer["owed"] = None
                yield chunk
        if segment.end is None or segment.last:
            return
        segment, continuation = text.segment(segment.end), True
