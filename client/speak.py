"""Speak text through the gateway's WebSocket and save the audio (or stream raw PCM to stdout).

    python -m client.speak "Hello there." -o hello.wav
    python -m client.speak --file chapter.txt -o chapter.wav --voice default --sample-rate 16000
    python -m client.speak "Hi" --raw | aplay -f S16_LE -r 24000 -c 1
    python -m client.speak "Hi" --legacy -o hi.wav      # act as a legacy client (no start message)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Optional

import numpy as np


class SpeakError(Exception):
    pass


async def speak(url: str, text: str, *, voice: Optional[str] = None, language: Optional[str] = None,
                sample_rate: int = 24000, encoding: str = "pcm16", token: Optional[str] = None, legacy: bool = False,
                on_audio=None, timeout: float = 600.0) -> dict:
    """One utterance over one session; returns the audio bytes, the end message and timings."""
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    start = time.monotonic()
    audio = bytearray()
    first_audio = None
    errors = []
    async with connect(url, additional_headers=headers, max_size=None, open_timeout=10) as ws:
        ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if ready.get("type") == "error":
            raise SpeakError(f"{ready['code']}: {ready['message']}")
        if not legacy:
            config = {"type": "start", "sampleRate": sample_rate, "encoding": encoding}
            if voice:
                config["voice"] = voice
            if language:
                config["language"] = language
            await ws.send(json.dumps(config))
        message = {"type": "speak", "text": text}
        if legacy and voice:
            message["voice"] = voice
        if legacy and language:
            message["language"] = language
        start = time.monotonic()
        await ws.send(json.dumps(message))

        async def receive():
            nonlocal first_audio
            while True:
                frame = await ws.recv()
                if isinstance(frame, bytes):
                    if first_audio is None:
                        first_audio = time.monotonic() - start
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
                    return message

        end = await asyncio.wait_for(receive(), timeout)
    return {"audio": bytes(audio), "end": end, "first_audio_s": first_audio, "total_s": time.monotonic() - start,
            "errors": errors}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("text", nargs="?", help="text to speak")
    source.add_argument("--file", help="read the text from this file ('-' for standard input)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", help="WAV file to write (default out.wav)")
    out.add_argument("--raw", action="store_true", help="write raw PCM to standard output as it arrives")
    parser.add_argument("--url", default="ws://127.0.0.1:8080/api/v1/speak")
    parser.add_argument("--voice")
    parser.add_argument("--language")
    parser.add_argument("--sample-rate", type=int, default=24000)
    parser.add_argument("--encoding", choices=("pcm16", "pcm32f"), default="pcm16")
    parser.add_argument("--token", help="auth token (sent as Authorization: Bearer)")
    parser.add_argument("--legacy", action="store_true", help="behave like the legacy page: no start, PCM16 24 kHz")
    args = parser.parse_args(argv)

    if args.file:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
    else:
        text = args.text
    rate = 24000 if args.legacy else args.sample_rate
    encoding = "pcm16" if args.legacy else args.encoding
    width = 2 if encoding == "pcm16" else 4
    received = [0]
    started = time.monotonic()
    show_progress = sys.stderr.isatty() or len(text) > 200

    def on_audio(frame: bytes):
        received[0] += len(frame)
        if args.raw:
            sys.stdout.buffer.write(frame)
            sys.stdout.buffer.flush()
        if show_progress:
            seconds = received[0] / width / rate
            print(f"\r{seconds:7.1f} s of audio received after {time.monotonic() - started:5.1f} s",
                  end="", file=sys.stderr, flush=True)

    try:
        result = asyncio.run(speak(args.url, text, voice=args.voice, language=args.language, sample_rate=rate,
                                   encoding=encoding, token=args.token, legacy=args.legacy, on_audio=on_audio))
    except (SpeakError, OSError, asyncio.TimeoutError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if show_progress:
        print(file=sys.stderr)
    audio = result["audio"]
    seconds = len(audio) / width / rate
    if not args.raw:
        import soundfile as sf

        samples = np.frombuffer(audio, dtype="<i2" if encoding == "pcm16" else "<f4")
        output = args.output or "out.wav"
        sf.write(output, samples, rate, subtype="PCM_16" if encoding == "pcm16" else "FLOAT")
        print(f"wrote {output}", file=sys.stderr)
    ttfa = result["first_audio_s"]
    rtf = result["total_s"] / seconds if seconds else float("nan")
    print(f"{seconds:.2f} s of audio; time to first audio {ttfa * 1000 if ttfa else float('nan'):.0f} ms; "
          f"total {result['total_s']:.2f} s; real-time factor {rtf:.2f}; "
          f"{'cancelled' if result['end'].get('cancelled') else 'complete'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
