"""Turn-taking through the real gateway and Triton: word marks equal the reference aligner's on the same audio and
text, and an interrupted utterance says what its listener heard (null without an aligner)."""
from __future__ import annotations

import asyncio
import contextlib
import json

import numpy as np
import pytest

from gateway_helpers import collect, hold_a_row, open_session, receive_json, send

TEXT = ("Sure, the next train to the airport leaves at ten past four from platform two, and the one after "
        "that leaves at five.")  # FAST: 4 + 1 frame per character, about 9 s of audio
RATE = 24000


@pytest.fixture(scope="module")
def reference_aligner(tiny_aligner_dir):
    """qwen-asr's own Qwen3ForcedAligner on the tiny aligner the test Triton serves."""
    from qwen_asr import Qwen3ForcedAligner

    return Qwen3ForcedAligner.from_pretrained(str(tiny_aligner_dir))


def reference_words(aligner, audio: np.ndarray, text: str, start_ms: int = 0) -> list[tuple]:
    """(text, startMs, endMs) of ``align`` on that audio and text, shifted by ``start_ms``."""
    items = aligner.align((audio, RATE), text, "English")[0]
    return [(item.text, start_ms + int(round(item.start_time * 1000)), start_ms + int(round(item.end_time * 1000)))
            for item in items]


async def start_with_marks(ws, **fields) -> dict:
    assert (await receive_json(ws))["type"] == "ready"
    await send(ws, type="start", encoding="pcm32f", wordTimestamps=True, **fields)
    started = await receive_json(ws)
    assert started["type"] == "started", started
    return started


async def test_marks_equal_the_reference_aligner_on_the_same_audio_and_text(make_gateway, reference_aligner):
    """Every marks message's words equal Qwen3ForcedAligner.align on the audio and text it names, and together
    they mark each word of the utterance once, in order."""
    gateway = make_gateway()
    gateway.wait_ready()
    async with open_session(gateway.ws) as ws:
        assert (await start_with_marks(ws))["wordTimestamps"] is True
        await send(ws, type="speak", text=TEXT, requestId="r1")
        result = await collect(ws, timeout=120)
    assert result.end["cancelled"] is False
    audio = np.frombuffer(bytes(result.audio), dtype="<f4")
    marks = result.of_type("marks")
    assert len(marks) >= 2, "marks should stream while the utterance plays, not only at its end"
    for message in marks:
        window = message["aligned"]
        expected = reference_words(reference_aligner, audio[window["startMs"] * 24:window["endMs"] * 24],
                                   TEXT[window["charStart"]:window["charEnd"]], window["startMs"])
        served = [(w["text"], w["startMs"], w["endMs"]) for w in message["words"]]
        assert served == expected[:len(served)], message
        for word in message["words"]:
            assert TEXT[word["charStart"]:word["charEnd"]] == word["text"]
    every_word = [w["text"] for m in marks for w in m["words"]]
    assert every_word == [w.strip(",.") for w in TEXT.split()]


async def test_heard_text_is_the_text_up_to_the_last_word_played(make_gateway, reference_aligner):
    """After `played` at a known position and an interrupt, heardText ends with the last word that ended by
    heardMs, as the reference aligner places the words (the marks sent, and the audio generated since)."""
    from gateway.words import HEARD_CONTEXT_MS, read_ahead_chars

    gateway = make_gateway()
    gateway.wait_ready()
    async with open_session(gateway.ws) as ws:
        # Text still being written: the utterance stays in progress until the interrupt, however fast the machine.
        await start_with_marks(ws, contractId="heard", voice="plain", textMode="continuous")
        await send(ws, type="append", text=TEXT, requestId="r2")
        audio, settled = bytearray(), []
        async with asyncio.timeout(60):
            while len(settled) < 2:
                frame = await ws.recv()
                if isinstance(frame, bytes):
                    audio += frame
                    continue
                message = json.loads(frame)
                assert message["type"] == "marks", message
                settled += message["words"]
        reported = settled[1]["endMs"]
        await send(ws, type="played", requestId="r2", ms=reported)
        await send(ws, type="interrupt")
        rest = await collect(ws, timeout=30)
    audio += rest.audio
    for message in rest.of_type("marks"):
        settled += message["words"]
    end = rest.end
    assert end["interrupted"] is True and end["requestId"] == "r2"
    samples = np.frombuffer(bytes(audio), dtype="<f4")
    assert reported <= end["heardMs"] <= len(samples) / 24
    # At the interruption the gateway aligned what followed the last settled word: that audio up to a second past
    # heardMs, and the text the talker had read by its end. The reference does the same.
    start_ms, start_char = settled[-1]["endMs"], settled[-1]["charEnd"]
    window = samples[start_ms * 24:(end["heardMs"] + HEARD_CONTEXT_MS) * 24]
    unread = TEXT[start_char:]
    window_text = unread[:read_ahead_chars(unread, window.size / RATE)]
    window_words = []
    if end["heardMs"] > start_ms and window.size and window_text.strip():  # (else the marks said it all)
        spans = [(w.text, w.start_time, w.end_time) for w in reference_aligner.align((window, RATE), window_text,
                                                                                     "English")[0]]
        offset = start_char
        for text, _, end_s in spans:  # locate each word in the text, in order (as the aligner's spans do)
            at = TEXT.index(text, offset)
            window_words.append({"endMs": start_ms + int(round(end_s * 1000)), "charEnd": at + len(text)})
            offset = at + len(text)
    ends = [w["charEnd"] for w in settled + window_words if w["endMs"] <= end["heardMs"]]
    assert ends, "the reported position is past the end of two marked words"
    assert end["heardText"] == TEXT[:max(ends)]


async def test_appended_text_is_heard_as_written(make_gateway):
    """For text still being written, heardText is a prefix of the appended text, cut after a word."""
    gateway = make_gateway()
    gateway.wait_ready()
    written = "Well, I think the answer is forty two, but let me check that again before I say it for sure"
    async with open_session(gateway.ws) as ws:
        await start_with_marks(ws, voice="plain", textMode="continuous")
        for piece in (written[:20], written[20:]):
            await send(ws, type="append", text=piece, requestId="r3")
        audio = bytearray()
        # The talker speaks one text token a frame and waits for more once it has read all: 1.5 s of audio
        # (greedy: the same audio every run).
        while len(audio) < 4 * RATE * 1.5:
            frame = await asyncio.wait_for(ws.recv(), 30)
            if isinstance(frame, bytes):
                audio += frame
        # ...and all of it: heardText aligns the audio up to 1 s past heardMs, so the test waits until the talker has
        # spoken all it was given (no audio for 0.5 s) rather than racing it (it once found only 1.5 s there)
        with contextlib.suppress(TimeoutError):
            while True:
                frame = await asyncio.wait_for(ws.recv(), 0.5)
                assert isinstance(frame, bytes) or json.loads(frame)["type"] == "marks", frame
        await send(ws, type="played", requestId="r3", ms=1200)
        await send(ws, type="cancel")
        end = (await collect(ws, timeout=30)).end
    assert end["cancelled"] is True and end["heardMs"] >= 1200
    heard = end["heardText"]
    assert heard and written.startswith(heard)  # (the tiny aligner places this text's words in its first 2 s)
    assert not written[len(heard):len(heard) + 1].isalnum()


async def test_without_an_aligner_heard_text_is_null_and_no_marks_are_promised(one_row_triton, make_gateway):
    """A deployment with no aligner says so in `started` and gives heardMs with heardText null."""
    gateway = make_gateway(triton_url=one_row_triton.grpc_url)
    gateway.wait_ready()
    async with open_session(gateway.ws) as ws:
        await hold_a_row(ws, wordTimestamps=True)
        await send(ws, type="cancel")
        result = await collect(ws, timeout=30)
    assert not result.of_type("marks")
    end = result.end
    assert end["cancelled"] is True and isinstance(end["heardMs"], int)
    assert "heardText" in end and end["heardText"] is None


async def test_an_openai_client_that_goes_away_has_what_it_heard_logged(make_gateway):
    """The OpenAI endpoint's cancel-by-disconnect logs heardMs and heardText (this API has no message for them)."""
    import httpx

    from triton_helpers import wait_until

    gateway = make_gateway(GATEWAY_LOG_LEVEL="INFO", GATEWAY_HEARD_TIMEOUT_MS="10000")  # (a loaded CI machine)
    gateway.wait_ready()
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", f"{gateway.http}/v1/audio/speech", json={
                "model": "tts-1", "input": TEXT, "voice": "plain", "response_format": "pcm"}) as response:
            assert response.status_code == 200
            received = 0
            async for data in response.aiter_bytes():
                received += len(data)
                if received >= 24000:  # half a second of PCM16: then the client hangs up
                    break
    logged = lambda: "the client went away after" in gateway.log_path.read_text()  # noqa: E731
    assert await wait_until(logged, timeout=10), "the gateway should log what the listener heard"
    line = next(line for line in gateway.log_path.read_text().splitlines() if "the client went away after" in line)
    heard = line.split("heard: ", 1)[1]
    assert heard != "None", "with an aligner, the heard text is known"
    assert TEXT.startswith(eval(heard))  # a prefix of the input (the log has its repr)


async def test_an_interrupt_after_the_audio_was_sent_says_what_was_heard_of_it(make_gateway):
    """Generation runs ahead of playback: an interrupt after `complete`, while the listener still plays the
    utterance, gets an `interrupted` message with what was heard of it."""
    gateway = make_gateway()
    gateway.wait_ready()
    async with open_session(gateway.ws) as ws:
        await start_with_marks(ws, contractId="after")
        await send(ws, type="speak", text=TEXT, requestId="r5")
        done = await collect(ws, timeout=120)
        assert done.end["cancelled"] is False
        await send(ws, type="played", requestId="r5", ms=1000)  # the listener is 1 s into its 9.6 s
        await send(ws, type="interrupt")
        message = await receive_json(ws, timeout=10)
    assert message["type"] == "interrupted" and message["requestId"] == "r5", message
    assert 1000 <= message["heardMs"] < message["audioLengthMs"]
    words = [w for m in done.of_type("marks") for w in m["words"] if w["endMs"] <= message["heardMs"]]
    assert message["heardText"] == (TEXT[:words[-1]["charEnd"]] if words else "")


async def test_an_interrupt_and_a_cancel_together_end_the_utterance_once(make_gateway):
    """An interrupt racing the client's own cancel still ends the utterance with exactly one `complete`."""
    gateway = make_gateway()
    gateway.wait_ready()
    async with open_session(gateway.ws) as ws:
        await hold_a_row(ws, contractId="race")
        await send(ws, type="interrupt")
        await send(ws, type="cancel")
        first = await collect(ws, timeout=30)
        assert first.end["requestId"] == "holding" and first.end["cancelled"] is True
        with pytest.raises(TimeoutError):  # no second end message for it
            await collect(ws, timeout=1.5)


async def test_text_appended_after_an_interrupt_is_not_spoken(make_gateway):
    """The rest of an answer an LLM still writes after an interrupt from elsewhere is dropped until its `end`."""
    import httpx

    gateway = make_gateway()
    gateway.wait_ready()
    async with open_session(gateway.ws) as ws:
        await hold_a_row(ws, contractId="llm")
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.post(f"{gateway.http}/api/v1/contracts/llm/interrupt")).status_code == 200
        assert (await collect(ws, timeout=30)).end["interrupted"] is True
        await send(ws, type="append", text=" and more of the answer", requestId="holding")
        await send(ws, type="end")
        with pytest.raises(TimeoutError):  # nothing is spoken for it
            await collect(ws, timeout=1.5)
        await send(ws, type="speak", text="A new turn.", requestId="next")
        assert (await collect(ws, timeout=30)).end["requestId"] == "next"
