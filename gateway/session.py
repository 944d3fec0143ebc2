"""One session: a queue of utterances played one after another, and its listener's figures (what it still plays,
how often it ran dry). It sends through an ``Outlet`` (the socket's sending side) and knows nothing else of the
connection that owns it."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Protocol

from tts_contract.audio import SAMPLE_RATE
from tts_contract.errors import PROTOCOL_CODE
from tts_contract.listener import Listener

from . import metrics
from .audio import AudioConverter
from .engine_stream import SynthesisFailed
from .protocol import AudioChunk, AudioEnd, Complete, Error, ErrorCode, Interrupted, Marks
from .speech import Timing, sentence_audio, written_audio
from .text import SentenceFeed, WrittenText
from .words import UtteranceWords, closing, utterance_words

log = logging.getLogger("gateway.session")


class SessionClosed(Exception):
    """The session is over (stop, auth failure, or the client went away)."""


class Outlet(Protocol):
    """The sending side of a session's socket: one frame at a time, awaiting each (the backpressure)."""

    closed: bool

    async def send_message(self, message) -> None: ...

    async def send_audio(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class AudioFormat:
    sample_rate: int = SAMPLE_RATE
    encoding: str = "pcm16"
    transport: str = "binary"


@dataclass
class Utterance:
    feed: "SentenceFeed | WrittenText"  # its sentences, all known (speak) or arriving (append); or one continuous text
    characters: int
    voice: Optional[str]
    language: str
    audio: AudioFormat
    legacy: bool
    request_id: Optional[str]
    received_at: float = field(default_factory=time.monotonic)
    ended: bool = False  # its end message is sent (exactly once)
    streamed: bool = False  # its text arrives with `append` (an LLM's pace, not ours)
    max_wait_s: float = 0.0  # may queue this long for capacity instead of being refused
    text: str = ""  # its text as written so far (what a listener heard is a prefix of it)
    marks: bool = False  # the client asked for word marks (and the deployment has an aligner)
    interrupted: bool = False  # an interrupt (by contract) ended it
    model: Optional[str] = None  # the served model it goes to (None: the deployment's default, Triton's `tts`)
    instruct: Optional[str] = None  # a style instruction or a described voice, for the models that take one


@dataclass
class _Playback:
    """What one utterance has sent so far, and what its listener heard of it (playing at real time, unless the
    client reported what it really played)."""

    samples: int = 0
    sequence: int = 0
    first_audio: Optional[float] = None
    listener: Listener = field(default_factory=Listener)
    words: Optional[UtteranceWords] = None  # its words on its audio clock (with an aligner)
    played: Optional[tuple[int, float]] = None  # the client's last `played` report: (ms, when it came)
    plays_from: float = 0.0  # when its listener finishes the utterance before it (its own audio plays after)

    def heard_ms(self, now: float) -> int:
        """Audio the listener has played: the client's last report, played on at real time since, or else the
        listener clock's estimate; never more than was sent."""
        sent_ms = 1000 * self.listener.audio_s
        if self.played is not None:
            ms, at = self.played
            heard = ms + 1000 * (now - at)
        else:
            waited = max(0.0, self.plays_from - self.listener.play_start) if self.listener.play_start else 0.0
            heard = sent_ms - 1000 * (self.listener.buffered(now) + waited)
        return int(max(0.0, min(sent_ms, heard)))


class Session:
    """Plays a session's utterances one after another (see the module)."""

    def __init__(self, out: Outlet, endpoints, settings, session_id: str):
        self.out, self.endpoints, self.settings, self.session_id = out, endpoints, settings, session_id
        self.queue: "asyncio.Queue[Utterance]" = asyncio.Queue()
        self.playing: Optional[asyncio.Task] = None
        self.current: Optional[Utterance] = None  # the utterance of ``playing``
        self.listening_until = 0.0  # when the listener finishes playing what this session has sent
        self._worker: Optional[asyncio.Task] = None
        self._playback: Optional[_Playback] = None  # the playing utterance's
        self._ending = asyncio.Lock()  # held while utterances are being ended (cancel, interrupt, drain)
        # The last utterance whose audio was all sent: its listener may play it for seconds more (generation runs
        # ahead of real time), and an interrupt then still says what was heard of it.
        self._sent: Optional[tuple[Utterance, _Playback]] = None

    @property
    def busy(self) -> bool:
        return self.playing is not None or not self.queue.empty()

    @property
    def accepted(self) -> int:
        """Utterances accepted and not yet ended: the queued ones and the one playing (whether or not the
        worker has picked the next one up yet)."""
        return self.queue.qsize() + (1 if self.playing is not None and not self.playing.done() else 0)

    def start(self) -> None:
        self._worker = asyncio.create_task(self._work())

    def enqueue(self, utterance: Utterance) -> None:
        self.queue.put_nowait(utterance)

    def drop_queue(self) -> list[Utterance]:
        dropped = []
        while not self.queue.empty():
            dropped.append(self.queue.get_nowait())
        return dropped

    async def cancel_all(self) -> None:
        """Cancel the utterance playing and drop the queued ones; each ends with its end message
        (``cancelled: true``), in order, before this returns."""
        await self._end_all(grace_s=0)

    async def interrupt(self) -> int:
        """Like ``cancel_all``, each end message saying ``interrupted: true``; returns how many utterances ended
        (the last one sent counts too, if its listener still played it)."""
        sent, self._sent = self._sent, None
        ended = await self._end_all(grace_s=0, interrupted=True)
        if sent is not None and await self._interrupt_sent(*sent):
            ended += 1
        return ended

    async def _interrupt_sent(self, utterance: Utterance, playback: _Playback) -> bool:
        """An utterance whose audio is all sent, if its listener still plays it: say what was heard of it."""
        now = time.monotonic()
        heard_ms = playback.heard_ms(now)
        length_ms = int(round(1000 * playback.listener.audio_s))
        if heard_ms >= length_ms:
            return False
        heard_ms, heard_text = await self._heard(playback, now)
        log.info("session %s: utterance %s interrupted while its listener played it, after %d ms heard: %r",
                 self.session_id, utterance.request_id, heard_ms, heard_text)
        await self.out.send_message(Interrupted(requestId=utterance.request_id, heardMs=heard_ms,
                                                heardText=heard_text, audioLengthMs=length_ms))
        return True

    def report_played(self, request_id: Optional[str], ms: int) -> None:
        """The client says it has played ``ms`` of the utterance ``request_id`` (None: the one playing, or else
        the last one sent, which its listener may still be playing)."""
        now = time.monotonic()
        playback, current = self._playback, self.current
        if playback is not None and current is not None and not current.ended and \
                (request_id is None or request_id == current.request_id):
            playback.played = (ms, now)
        elif self._sent is not None and request_id in (None, self._sent[0].request_id):
            self._sent[1].played = (ms, now)

    async def drain(self, grace_s: float) -> None:
        """For a shutdown: like ``cancel_all``, but the utterance playing gets ``grace_s`` to finish first."""
        await self._end_all(grace_s)

    async def _end_all(self, grace_s: float, interrupted: bool = False) -> int:
        """End the utterance playing and the queued ones (each with its end message); returns how many it ended."""
        # One at a time: an interrupt (from another task) and the client's own cancel may come together.
        async with self._ending:
            dropped = self.drop_queue()
            playing, current = self.playing, self.current
            ending = [u for u in ([current] if playing is not None and not playing.done() else []) + dropped
                      if u is not None and not u.ended]
            for utterance in ending:
                utterance.interrupted = interrupted
            if playing is not None and not playing.done():
                if grace_s > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(playing), grace_s)
                if current is None or not current.ended:  # (ended: it is sending its end message; let it)
                    playing.cancel()
                await asyncio.gather(playing, return_exceptions=True)
            for utterance in ([current] if current is not None else []) + dropped:
                if not utterance.ended:  # e.g. cancelled before its task ever ran
                    await self._finish(utterance, _Playback(), cancelled=True, completed=False)
            return len(ending)

    async def close(self) -> None:
        """The socket is gone: stop everything, send nothing."""
        self.drop_queue()
        if self.playing is not None:
            self.playing.cancel()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            utterance = await self.queue.get()
            self.current, self.playing = utterance, asyncio.create_task(self._play(utterance))
            try:
                await asyncio.shield(self.playing)
            except asyncio.CancelledError:
                if self.out.closed:
                    raise
            except SessionClosed:
                return
            except Exception:  # a bug must cost one utterance, never the session
                log.exception("session %s: utterance failed unexpectedly", self.session_id)
                with contextlib.suppress(SessionClosed):
                    await self.out.send_message(Error.of(ErrorCode.SYNTHESIS_ERROR, "internal error",
                                                         utterance.request_id))
            finally:
                if self.playing is not None and self.playing.done():
                    self.playing = None
            if self.out.closed:
                return

    def _words(self, utterance: Utterance) -> Optional[UtteranceWords]:
        """A tracker of the utterance's words when the deployment has an aligner (legacy clients get none)."""
        if utterance.legacy:
            return None

        async def send_marks(words, aligned):
            metrics.MARKS_WORDS.inc(len(words))
            await self.out.send_message(Marks(words=[w.to_wire() for w in words], requestId=utterance.request_id,
                                              aligned=aligned))

        return utterance_words(self.endpoints, self.settings, utterance.language, lambda: utterance.text,
                               send_marks if utterance.marks else None)

    async def _play(self, utterance: Utterance) -> None:
        converter = AudioConverter(utterance.audio.sample_rate, utterance.audio.encoding)
        playback = self._playback = _Playback(words=self._words(utterance), plays_from=self.listening_until)
        cancelled, outcome = False, "completed"
        # The listener still plays the session's previous utterance: this one's first audio is due after it.
        timing = Timing(max(0.0, self.listening_until - time.monotonic()), utterance.max_wait_s)
        try:
            # aclosing: however playback ends, the sentence requests still in flight are cancelled now.
            speech = written_audio if isinstance(utterance.feed, WrittenText) else sentence_audio
            async with contextlib.aclosing(speech(self.endpoints, self.settings, utterance.feed, utterance.voice,
                                                  utterance.language, playback.listener, timing, utterance.model,
                                                  utterance.instruct)) as stream:
                async for chunk in stream:
                    if playback.words is not None:
                        playback.words.add_audio(chunk)
                    await self._send_audio(utterance, converter, playback, converter.convert(chunk))
            await self._send_audio(utterance, converter, playback, converter.flush(), final=True)
            if playback.words is not None:
                await playback.words.finish()  # the last marks, before `complete`
        except asyncio.CancelledError:
            cancelled, outcome = True, "cancelled"
            if self.out.closed:
                raise
        except SynthesisFailed as exc:
            cancelled, outcome = True, "failed"
            log.warning("session %s: synthesis failed (%s): %s", self.session_id, exc.code.value, exc.message)
            await self.out.send_message(Error.of(PROTOCOL_CODE[exc.code], exc.message, utterance.request_id,
                                                 exc.retry_after_ms))
        except TimeoutError as exc:
            cancelled, outcome = True, "failed"
            await self.out.send_message(Error.of(ErrorCode.TIMEOUT, str(exc), utterance.request_id))
        except SessionClosed:
            outcome = "cancelled"
            raise
        except Exception:  # a bug must cost this utterance only; it still ends with its end message
            cancelled, outcome = True, "failed"
            log.exception("session %s: utterance failed unexpectedly", self.session_id)
            await self.out.send_message(Error.of(ErrorCode.SYNTHESIS_ERROR, "internal error", utterance.request_id))
        finally:
            metrics.UTTERANCES.labels(outcome).inc()
            self.listening_until = playback.listener.playing_until or self.listening_until
        with closing(playback.words):
            await self._finish(utterance, playback, cancelled, completed=outcome == "completed")
        if outcome == "completed" and not utterance.legacy:
            self._keep_while_playing(utterance, playback)

    def _keep_while_playing(self, utterance: Utterance, playback: _Playback) -> None:
        """Keep an utterance whose audio is all sent (and its words) while its listener plays it, and no longer:
        an interrupt may still ask what was heard of it."""
        self._sent = (utterance, playback)
        remaining = (playback.listener.playing_until or 0.0) - time.monotonic()

        def forget() -> None:
            if self._sent is not None and self._sent[0] is utterance:
                self._sent = None

        asyncio.get_running_loop().call_later(max(0.0, remaining) + 1.0, forget)

    async def _send_audio(self, utterance: Utterance, converter: AudioConverter, playback: _Playback, data: bytes,
                          final: bool = False) -> None:
        base64_transport = utterance.audio.transport == "base64" and not utterance.legacy
        if not data and not (final and base64_transport):
            return
        if base64_transport:
            await self.out.send_message(AudioChunk(
                data=base64.b64encode(data).decode("ascii"), sequenceNumber=playback.sequence, isFinal=final,
                timestampMs=int(playback.samples * 1000 / utterance.audio.sample_rate)))
        else:
            await self.out.send_audio(data)
        playback.sequence += 1
        now = time.monotonic()
        if data and playback.first_audio is None:
            playback.first_audio = now
        samples = len(data) // converter.bytes_per_sample
        playback.samples += samples
        if samples:
            metrics.record_chunk(playback.listener, samples / utterance.audio.sample_rate, now)

    async def _finish(self, utterance: Utterance, playback: _Playback, cancelled: bool, completed: bool) -> None:
        """Metrics, then the utterance's end message (complete, or audio_end for legacy clients)."""
        if utterance.ended:
            return
        utterance.ended = True
        finished = time.monotonic()
        seconds = playback.samples / utterance.audio.sample_rate
        metrics.AUDIO_SECONDS.inc(seconds)
        if playback.first_audio is not None:
            metrics.TIME_TO_FIRST_AUDIO.observe(playback.first_audio - utterance.received_at)
        if seconds > 0 and completed and not utterance.streamed:
            metrics.REAL_TIME_FACTOR.observe((finished - utterance.received_at) / seconds)
        if utterance.legacy:
            await self.out.send_message(AudioEnd(cancelled=cancelled))
            return
        first = playback.first_audio
        heard_ms = heard_text = None
        if cancelled:
            heard_ms, heard_text = await self._heard(playback, finished)
            log.info("session %s: utterance %s %s after %d ms heard: %r", self.session_id, utterance.request_id,
                     "interrupted" if utterance.interrupted else "cancelled", heard_ms, heard_text)
        await self.out.send_message(Complete(
            durationMs=int((finished - utterance.received_at) * 1000), charactersProcessed=utterance.characters,
            audioLengthMs=int(round(seconds * 1000)),
            firstAudioMs=None if first is None else int((first - utterance.received_at) * 1000),
            cancelled=cancelled, requestId=utterance.request_id, underruns=playback.listener.underruns,
            stallMs=int(round(1000 * playback.listener.stalled_s)), interrupted=utterance.interrupted or None,
            heardMs=heard_ms, heardText=heard_text))

    async def _heard(self, playback: _Playback, now: float) -> tuple[int, Optional[str]]:
        """What the listener of a cancelled utterance had played (ms) and the text up to the last word it heard
        (None without an aligner)."""
        heard_ms = playback.heard_ms(now)
        if playback.words is not None:
            return heard_ms, await playback.words.heard_text(heard_ms, self.settings.heard_timeout_s)
        return heard_ms, "" if heard_ms == 0 and self.endpoints.aligner else None

