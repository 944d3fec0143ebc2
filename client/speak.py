"""Speak text through the gateway's WebSocket and save the audio (or stream raw PCM to stdout).

    python -m client.speak "Hello there." -o hello.wav
    python -m client.speak --file chapter.txt -o chapter.wav --voice default --sample-rate 16000
    python -m client.speak "Hi" --raw | aplay -f S16_LE -r 24000 -c 1
    my_llm --stream | python -m client.speak --stdin-stream --raw | aplay -f S16_LE -r 24000 -c 1
    python -m client.speak "Hi" --legacy -o hi.wav      # act as a legacy client (no start message)

With --stdin-stream, text is sent as it is written to standard input (``append`` messages, ``end`` at end
of input), so audio starts before the whole text is there: with the first words in continuous mode (the
default for x-vector voices, ``--text-mode continuous``), with the first complete sentence in sentence mode.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import AsyncIterator, Callable, Optional

import numpy as np


class SpeakError(Exception):
    pass


async def speak(url: str, text: str | AsyncIterator[str], *, voice: Optional[str] = None,
                language: Optional[str] = None, sample_rate: int = 24000, encoding: str = "pcm16",
                token: Optional[str] = None, legacy: bool = False, on_audio: Optional[Callable[[bytes], None]] = None,
                timeout: float = 600.0, text_mode: Optional[str] = None, model: Optional[str] = None,
                instruct: Optional[str] = None) -> dict:
    """One utterance over one session, from a whole text (``speak``) or from text as it is written (``append``
    per piece, then ``end``); returns the audio bytes, the end message and timings (from the first text sent)."""
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with connect(url, additional_headers=headers, max_size=None, open_timeout=10) as ws:
        ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if ready.get("type") == "error":
            raise SpeakError(f"{ready['code']}: {ready['message']}")
        overrides = {key: value for key, value in (("voice", voice), ("language", language), ("textMode", text_mode),
                                                   ("model", model), ("instruct", instruct)) if value}
        if not legacy:
            await ws.send(json.dumps({"type": "start", "sampleRate": sample_rate, "encoding": encoding,
                                      **overrides}))
        # A legacy client names voice and language per utterance; a spec client configured them in start.
        per_utterance = overrides if legacy else {}
        timings = {"start": time.monotonic(), "first_audio_s": None, "characters_sent": 0}
        if isinstance(text, str):
            await ws.send(json.dumps({"type": "speak", "text": text, **per_utterance}))
            sender = None
        else:
            sender = asyncio.create_task(_send_stream(ws, text, per_utterance, timings))
        try:
            audio, end, errors = await asyncio.wait_for(_receive_utterance(ws, timings, on_audio), timeout)
        finally:
            if sender is not None:
                sender.cancel()
    return {"audio": audio, "end": end, "first_audio_s": timings["first_audio_s"],
            "total_s": time.monotonic() - timings["start"], "errors": errors,
            "characters_sent": timings["characters_sent"]}


async def _send_stream(ws, pieces: AsyncIterator[str], first_fields: dict, timings: dict) -> None:
    """``append`` each piece as it arrives (timings count from the first), then ``end``."""
    async for piece in pieces:
        if not piece:
            continue
        if not timings["characters_sent"]:
            timings["start"] = time.monotonic()
        await ws.send(json.dumps({"type": "append", "text": piece, **first_fields}))
        first_fields = {}
        timings["characters_sent"] += len(piece)
    await ws.send(json.dumps({"type": "end"}))


async def _receive_utterance(ws, timings: dict, on_audio) -> tuple[bytes, dict, list]:
    """Audio until the utterance's end message; fatal or admission errors raise ``SpeakError``."""
    audio, errors = bytearray(), []
    while True:
        frame = await ws.recv()
        if isinstance(frame, bytes):
            if timings["first_audio_s"] is None:
                timings["first_audio_s"] = time.monotonic() - timings["start"]
            audio.extend(frame)
            if on_audio:
                on_audio(frame)
            continue
        message = json.loads(frame)
        if message["type"] == "error":
            errors.append(message)
            if not message.get("recoverable") or message["code"] in ("MODEL_LOADING", "RATE_LIMITED"):
                raise SpeakError(f"{message['code']}: {message['message']}")
            print(f"warning: {message['code']}: {message['message']}", file=sys.stderr)
        elif message["type"] in ("complete", "audio_end"):
            return bytes(audio), message, errors


async def stdin_pieces(chunk_bytes: int = 4096) -> AsyncIterator[str]:
    """Standard input as it is written (whatever each read returns, not whole lines), decoded incrementally
    so a UTF-8 character split across reads stays whole."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    fd = sys.stdin.fileno()
    while True:
        data = await asyncio.to_thread(os.read, fd, chunk_bytes)
        piece = decoder.decode(data, final=not data)
        if piece:
            yield piece
        if not data:
            return


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("text", nargs="?", help="text to speak")
    source.add_argument("--file", help="read the text from this file ('-' for standard input, read to the end)")
    source.add_argument("--stdin-stream", action="store_true",
                        help="send standard input as it is written (append messages), e.g. an LLM's output")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", help="WAV file to write (default out.wav)")
    out.add_argument("--raw", action="store_true", help="write raw PCM to standard output as it arrives")
    parser.add_argument("--url", default="ws://127.0.0.1:8080/api/v1/speak")
    parser.add_argument("--model", help="a served model's name or alias (GET /v1/models; default: the default model)")
    parser.add_argument("--voice", help="a cloned voice's id (Base models) or a speaker's name (CustomVoice)")
    parser.add_argument("--instruct", help="a style instruction (CustomVoice 1.7B) or a voice description "
                        "(VoiceDesign)")
    parser.add_argument("--language")
    parser.add_argument("--sample-rate", type=int, default=24000)
    parser.add_argument("--encoding", choices=("pcm16", "pcm32f"), default="pcm16")
    parser.add_argument("--text-mode", choices=("auto", "continuous", "sentences"),
                        help="how streamed text is spoken (default: the server's, auto)")
    parser.add_argument("--token", help="auth token (sent as Authorization: Bearer)")
    parser.add_argument("--legacy", action="store_true", help="behave like the legacy page: no start, PCM16 24 kHz")
    args = parser.parse_args(argv)
    if args.legacy:
        args.sample_rate, args.encoding = 24000, "pcm16"
    return args


class Progress:
    """Counts received audio; writes it to stdout with --raw; shows seconds received on a terminal."""

    def __init__(self, args: argparse.Namespace, show: bool):
        self.raw, self.show, self.rate = args.raw, show, args.sample_rate
        self.width = 2 if args.encoding == "pcm16" else 4
        self.received, self.started = 0, time.monotonic()

    def __call__(self, frame: bytes) -> None:
        self.received += len(frame)
        if self.raw:
            sys.stdout.buffer.write(frame)
            sys.stdout.buffer.flush()
        if self.show:
            print(f"\r{self.received / self.width / self.rate:7.1f} s of audio received after "
                  f"{time.monotonic() - self.started:5.1f} s", end="", file=sys.stderr, flush=True)


def summary(result: dict, seconds: float) -> str:
    ttfa = result["first_audio_s"]
    rtf = result["total_s"] / seconds if seconds else float("nan")
    return (f"{seconds:.2f} s of audio; time to first audio {ttfa * 1000 if ttfa else float('nan'):.0f} ms; "
            f"total {result['total_s']:.2f} s; real-time factor {rtf:.2f}; "
            f"{'cancelled' if result['end'].get('cancelled') else 'complete'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.stdin_stream:
        text = stdin_pieces()
    elif args.file:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
    else:
        text = args.text
    progress = Progress(args, show=sys.stderr.isatty() or args.stdin_stream or len(text) > 200)
    try:
        result = asyncio.run(speak(args.url, text, voice=args.voice, language=args.language,
                                   sample_rate=args.sample_rate, encoding=args.encoding, token=args.token,
                                   text_mode=args.text_mode, model=args.model, instruct=args.instruct,
                                   legacy=args.legacy, on_audio=progress))
    except (SpeakError, OSError, asyncio.TimeoutError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if progress.show:
        print(file=sys.stderr)
    seconds = len(result["audio"]) / progress.width / args.sample_rate
    if not args.raw:
        import soundfile as sf

        samples = np.frombuffer(result["audio"], dtype="<i2" if args.encoding == "pcm16" else "<f4")
        output = args.output or "out.wav"
        sf.write(output, samples, args.sample_rate, subtype="PCM_16" if args.encoding == "pcm16" else "FLOAT")
        print(f"wrote {output}", file=sys.stderr)
    print(summary(result, seconds), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
