"""Incremental text: an LLM's answer appended word by word is spoken sentence by sentence as it is written."""
from __future__ import annotations

import asyncio
import random
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from websockets.exceptions import ConnectionClosed

from conftest import ROOT

from gateway_helpers import collect, open_session, receive_json, send, serve_gateway
from test_gateway import start_session

PARAGRAPH = ("Streaming text to speech starts talking before the answer is finished. The first sentence plays "
             "while the model is still writing the second one. Every sentence follows the previous one without a "
             "gap, and the listener hears the whole answer in order. That is what a voice assistant needs.")


@pytest.fixture(scope="module")
def gateway(triton, voices_dir, tmp_path_factory):
    yield from serve_gateway(triton.grpc_url, voices_dir, tmp_path_factory.mktemp("gw"), GATEWAY_TEXT_IDLE_S="0.5")


async def append_words(ws, text: str, words_per_second: float = 15.0, **first) -> float:
    """Send ``text`` word by word as `append` messages; returns when the last word went out."""
    for index, word in enumerate(text.split(" ")):
        await send(ws, type="append", text=("" if index == 0 else " ") + word, **(first if index == 0 else {}))
        await asyncio.sleep(1 / words_per_second)
    return time.monotonic()


@pytest.mark.parametrize("client", ["spec", "legacy"])
async def test_words_at_fifteen_per_second_are_spoken_before_the_text_ends(gateway, client):
    """First audio arrives before the last word is sent; the utterance ends once, after all its sentences,
    and (spec) charactersProcessed counts every appended character."""
    async with open_session(gateway.ws) as ws:
        if client == "spec":
            await start_session(ws)
        else:
            await receive_json(ws)
        started = time.monotonic()
        collecting = asyncio.create_task(collect(ws, timeout=120))
        last_word = await append_words(ws, PARAGRAPH, requestId="llm")
        await send(ws, type="end")
        result = await collecting
        assert result.first_audio_at is not None and started + result.first_audio_at < last_word
        assert len(result.of_type("complete") + result.of_type("audio_end")) == 1
        assert result.end["cancelled"] is False
        if client == "spec":
            assert result.end["charactersProcessed"] == len(PARAGRAPH) and result.end["requestId"] == "llm"
            assert len(result.audio) // 2 == round(result.end["audioLengthMs"] * 24)
        await send(ws, type="speak", text="And the session goes on.")
        assert (await collect(ws)).end["cancelled"] is False


async def test_flush_speaks_buffered_text_without_a_sentence_end(gateway):
    """`flush` sends what is buffered now; the utterance stays open until `end`."""
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="append", text="No full stop yet")
        await send(ws, type="flush")
        assert isinstance(await asyncio.wait_for(ws.recv(), 30), bytes)
        await send(ws, type="append", text=" and then more.")
        await send(ws, type="end")
        result = await collect(ws)
        assert result.end["charactersProcessed"] == len("No full stop yet and then more.")


async def test_buffered_text_is_spoken_after_the_idle_time(gateway):
    """Buffered text with no append for GATEWAY_TEXT_IDLE_S is spoken as if flushed."""
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="append", text="Waiting for more words")
        assert isinstance(await asyncio.wait_for(ws.recv(), 30), bytes)
        await send(ws, type="end")
        assert (await collect(ws)).end["cancelled"] is False


async def test_cancel_drops_buffered_text_and_the_next_append_opens_a_new_utterance(gateway):
    """`cancel` ends the streamed utterance (buffered text and all); a later append starts a new one."""
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="append", text="This sentence is complete. This one is not", requestId="a")
        await send(ws, type="cancel")
        first = await collect(ws)
        assert first.end["requestId"] == "a" and first.end["cancelled"] is True
        await send(ws, type="append", text="A fresh start.", requestId="b")
        await send(ws, type="end")
        second = await collect(ws)
        assert second.end["requestId"] == "b" and second.end["cancelled"] is False


async def test_a_high_priority_speak_drops_the_streamed_utterance_and_its_buffered_text(gateway):
    """A high-priority `speak` ends the open streamed utterance (cancelled), plays next, and later text opens a
    new utterance instead of joining the dropped one."""
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="append", text="This sentence is complete. This one is not", requestId="streamed")
        await send(ws, type="speak", text="Urgent news.", priority="high", requestId="urgent")
        dropped = await collect(ws)
        assert dropped.end["requestId"] == "streamed" and dropped.end["cancelled"] is True
        urgent = await collect(ws)
        assert urgent.end["requestId"] == "urgent" and urgent.end["cancelled"] is False
        await send(ws, type="append", text=" finished later.", requestId="later")
        await send(ws, type="end")
        later = await collect(ws)
        assert later.end["requestId"] == "later" and later.end["charactersProcessed"] == len(" finished later.")


async def test_text_over_the_limit_is_refused_and_the_utterance_keeps_what_it_had(make_gateway):
    """An append that would pass GATEWAY_MAX_TEXT_CHARS gets INVALID_TEXT; the utterance goes on."""
    gateway = make_gateway(GATEWAY_MAX_TEXT_CHARS="40")
    gateway.wait_ready()
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="append", text="Thirty characters of text.", requestId="s")
        await send(ws, type="append", text=" And twenty more here.")
        reply = await collect(ws, until=("error",))
        error = reply.of_type("error")[0]
        assert error["code"] == "INVALID_TEXT" and error["requestId"] == "s"
        await send(ws, type="end")
        result = await collect(ws)
        assert result.end["cancelled"] is False and result.end["charactersProcessed"] == 26


async def test_a_first_append_over_the_limit_opens_nothing(make_gateway):
    """A refused first append leaves no empty utterance behind: a speak right after plays without an `end`."""
    gateway = make_gateway(GATEWAY_MAX_TEXT_CHARS="40")
    gateway.wait_ready()
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="append", text="x" * 41, requestId="too-long")
        error = (await collect(ws, until=("error",))).of_type("error")[0]
        assert error["code"] == "INVALID_TEXT" and error["requestId"] == "too-long"
        await send(ws, type="speak", text="Short.", requestId="next")
        result = await collect(ws, timeout=30)
        assert result.end["requestId"] == "next" and result.end["cancelled"] is False


async def test_a_streamed_utterance_left_open_ends_after_the_idle_timeout(make_gateway):
    """With no message for GATEWAY_IDLE_TIMEOUT_S an open streamed utterance ends as if `end` came (it
    completes), and then the idle session is closed: a forgotten stream never holds its session."""
    gateway = make_gateway(GATEWAY_IDLE_TIMEOUT_S="2", GATEWAY_TEXT_IDLE_S="0.3")
    gateway.wait_ready()
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="append", text="Nobody ends this.", requestId="open")
        result = await collect(ws, timeout=30)
        assert result.end["requestId"] == "open" and result.end["cancelled"] is False
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)


async def test_a_speak_during_a_streamed_utterance_plays_after_it(gateway):
    """A `speak` arriving while a streamed utterance is open is queued after it."""
    async with open_session(gateway.ws) as ws:
        await start_session(ws)
        await send(ws, type="append", text="Streamed first.", requestId="streamed")
        await send(ws, type="speak", text="Spoken second.", requestId="spoken")
        await asyncio.sleep(0.3)
        await send(ws, type="end")
        ends = [(await collect(ws)).end["requestId"] for _ in range(2)]
        assert ends == ["streamed", "spoken"]


async def test_speak_cli_streams_stdin_as_it_is_written(gateway, tmp_path):
    """`client.speak --stdin-stream` sends piped text as it is written: audio starts while the writer is still
    writing, and the WAV holds the whole answer."""
    output = tmp_path / "answer.wav"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client.speak", "--stdin-stream", "--url", gateway.ws, "-o", str(output),
        cwd=ROOT, stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stderr = bytearray()

    async def read_stderr():
        while chunk := await process.stderr.read(256):
            stderr.extend(chunk)

    reader = asyncio.create_task(read_stderr())
    for word in PARAGRAPH.split(" "):
        process.stdin.write(word.encode() + b" ")
        await process.stdin.drain()
        await asyncio.sleep(1 / 15)
    audio_before_end = b"s of audio received" in stderr
    process.stdin.close()
    assert await asyncio.wait_for(process.wait(), 120) == 0, stderr.decode()
    await reader
    assert audio_before_end, stderr.decode()
    assert b"time to first audio" in stderr and b"complete" in stderr
    samples, rate = sf.read(output)
    assert rate == 24000 and len(samples) > rate


# -- continuous text: one stream per utterance, fed as it is written ------------------------------------------

async def _audio_of(ws, timeout: float = 120):
    result = await collect(ws, timeout=timeout)
    assert result.end["cancelled"] is False, result.messages
    return np.frombuffer(result.audio, dtype=np.float32)


async def test_continuous_appends_give_the_audio_of_one_speak_of_the_whole_text(gateway):
    """In continuous mode an utterance appended in random pieces (single characters included, with pauses) is
    one stream whose audio equals a `speak` of the whole text, however the text was cut."""
    text = "Continuous text is spoken as it is written, word by word, without waiting for sentences."
    async with open_session(gateway.ws) as ws:
        started = await start_session(ws, voice="plain", encoding="pcm32f", textMode="continuous")
        assert started["textMode"] == "continuous"
        await send(ws, type="speak", text=text)
        whole = await _audio_of(ws)
        rng, start = random.Random(3), 0
        while start < len(text):
            size = rng.choice((1, 1, 2, 5, 9))
            await send(ws, type="append", text=text[start:start + size])
            start += size
            await asyncio.sleep(rng.uniform(0, 0.04))
        await send(ws, type="end")
        fed = await _audio_of(ws)
    assert whole.size > 0 and fed.shape == whole.shape
    assert np.abs(fed - whole).max() <= 1e-4 * np.sqrt(np.mean(whole ** 2))


async def test_continuous_flush_speaks_the_last_word_before_the_end(make_gateway):
    """`flush` commits the word held back in case it continued: its frames are spoken before `end` (a frame
    reads the next text token, so two words are the least that makes audio), long before the idle time would."""
    gateway = make_gateway(GATEWAY_TEXT_IDLE_S="60")
    async with open_session(gateway.ws) as ws:
        await start_session(ws, voice="plain", textMode="continuous")
        await send(ws, type="append", text="Hello there")  # "Hello" is one token: alone it makes no frame
        await send(ws, type="flush")
        assert isinstance(await asyncio.wait_for(ws.recv(), 20), bytes)
        await send(ws, type="append", text=" and then more.")
        await send(ws, type="end")
        result = await collect(ws)
        assert result.end["cancelled"] is False
        assert result.end["charactersProcessed"] == len("Hello there and then more.")


@pytest.mark.parametrize("voice,mode", [("plain", "continuous"), ("default", "sentences")])
async def test_auto_text_mode_is_continuous_for_x_vector_voices_and_sentences_for_icl(gateway, voice, mode):
    """`auto` picks continuous where it gives first audio no later than sentences (an x-vector voice starts with
    the first word; an ICL voice's stream needs its whole text); `started` says which."""
    async with open_session(gateway.ws) as ws:
        assert (await start_session(ws, voice=voice))["textMode"] == mode


async def test_an_unknown_text_mode_is_invalid_config(gateway):
    """A textMode the gateway does not know is refused with INVALID_CONFIG; the session stays usable."""
    async with open_session(gateway.ws) as ws:
        await receive_json(ws)
        await send(ws, type="start", textMode="telepathic")
        error = await receive_json(ws)
        assert error["type"] == "error" and error["code"] == "INVALID_CONFIG" and "telepathic" in error["message"]
        await send(ws, type="start")
        assert (await receive_json(ws))["type"] == "started"


async def test_a_long_continuous_utterance_is_spoken_as_several_streams_without_losing_a_word(make_gateway):
    """Past GATEWAY_CONTINUOUS_SEGMENT_CHARS a continuous utterance goes on in a new stream from the next sentence
    end: appended in pieces it still gives the audio of one `speak` of the whole text, and ends once."""
    gateway = make_gateway(GATEWAY_CONTINUOUS_SEGMENT_CHARS="50")
    text = ("The first part is long enough to need a stream of its own. The second part follows it. "
            "And a third part ends the answer.")
    async with open_session(gateway.ws) as ws:
        await start_session(ws, voice="plain", encoding="pcm32f", textMode="continuous")
        await send(ws, type="speak", text=text)
        whole = await _audio_of(ws)
        for start in range(0, len(text), 7):
            await send(ws, type="append", text=text[start:start + 7])
            await asyncio.sleep(0.02)
        await send(ws, type="end")
        result = await collect(ws, timeout=120)
    assert len(result.of_type("complete")) == 1 and result.end["charactersProcessed"] == len(text)
    fed = np.frombuffer(result.audio, dtype=np.float32)
    assert fed.shape == whole.shape
    assert np.abs(fed - whole).max() <= 1e-4 * np.sqrt(np.mean(whole ** 2))
