"""Text as an LLM writes it: how soon speech starts, and whether it flows, in continuous vs sentence mode.

    python -m bench.streaming_text [--rates 10,20,50] [--repeats 3] [--gateway http://127.0.0.1:8080]

A simulated LLM writes a voice-agent answer into a WebSocket session at N tokens per second (pieces of about
four characters, as an LLM's tokens are), then `end`. Per text mode (continuous, sentences), voice (x-vector,
ICL) and rate: time from the first `append` to the first audio, what a listener playing from its first byte
hears (gaps, including the writer's), and the gateway's own count of gaps it caused (`complete.underruns`,
which leaves out waiting for text). Without ``--gateway`` it starts its own stack like ``make run`` (CPU
profile, tiny model, frame cap near real speech) with the shipped ICL voice and an x-vector copy of it. Prints
and writes results/streaming_text.json; nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tts_contract.listener import Listener  # noqa: E402
from tts_contract.audio import SAMPLE_RATE  # noqa: E402

ANSWER = ("Sure, I can help with that. Your flight to Lisbon leaves at nine forty tomorrow morning from gate "
          "twelve, and boarding starts half an hour before. Would you like me to add a reminder?")
VOICES = {"x-vector": "plain", "icl": "default"}


def llm_tokens(text: str) -> list[str]:
    """The answer cut as an LLM's tokens roughly are: words with their leading space, long ones in 4-character
    pieces, punctuation on its own."""
    pieces = []
    for word in re.findall(r"\s*[\w']+|\s*[^\w\s]", text):
        while len(word) > 5:
            pieces.append(word[:4])
            word = word[4:]
        pieces.append(word)
    return pieces


async def one_utterance(base: str, voice: str, mode: str, rate: float, timeout: float = 120.0) -> dict:
    from websockets.asyncio.client import connect

    clock, first_audio, end = Listener(), None, None
    url = base.replace("http", "ws", 1) + "/api/v1/speak"
    async with asyncio.timeout(timeout):
        async with connect(url, max_size=None, open_timeout=10) as ws:
            json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "start", "voice": voice, "textMode": mode, "language": "English"}))
            started = json.loads(await ws.recv())
            assert started["type"] == "started" and started["textMode"] == mode, started
            began = time.monotonic()

            async def write():
                for token in llm_tokens(ANSWER):
                    await ws.send(json.dumps({"type": "append", "text": token}))
                    await asyncio.sleep(1 / rate)
                await ws.send(json.dumps({"type": "end"}))

            writer = asyncio.create_task(write())
            try:
                while True:
                    frame = await ws.recv()
                    now = time.monotonic()
                    if isinstance(frame, bytes):
                        first_audio = first_audio if first_audio is not None else now - began
                        clock.add(len(frame) / 2 / SAMPLE_RATE, now)
                        continue
                    message = json.loads(frame)
                    if message["type"] in ("complete", "error"):
                        end = message
                        if message["type"] == "complete":
                            break
            finally:
                writer.cancel()
    return {"first_audio_ms": None if first_audio is None else round(1000 * first_audio),
            "audio_s": round(clock.audio_s, 2), "heard_gaps": clock.underruns, "heard_gap_s": round(clock.stalled_s, 3),
            "server_underruns": (end or {}).get("underruns"), "server_stall_ms": (end or {}).get("stallMs"),
            "error": (end or {}).get("code") if (end or {}).get("type") == "error" else None}


def summarise(rows: list[dict]) -> dict:
    first = [r["first_audio_ms"] for r in rows if r["first_audio_ms"] is not None]
    return {"utterances": len(rows), "first_audio_ms_median": statistics.median(first) if first else None,
            "first_audio_ms": first, "heard_gaps": sum(r["heard_gaps"] for r in rows),
            "heard_gap_s": round(sum(r["heard_gap_s"] for r in rows), 3),
            "server_underruns": sum(r["server_underruns"] or 0 for r in rows),
            "errors": [r["error"] for r in rows if r["error"]]}


async def sweep(base: str, rates: list[float], repeats: int) -> list[dict]:
    table = []
    for rate in rates:
        for voice_kind, voice in VOICES.items():
            for mode in ("continuous", "sentences"):
                rows = [await one_utterance(base, voice, mode, rate) for _ in range(repeats)]
                row = {"tokens_per_s": rate, "voice": voice_kind, "mode": mode, **summarise(rows)}
                table.append(row)
                print(f"{rate:>4g} tok/s {voice_kind:9s} {mode:10s}: first audio median {row['first_audio_ms_median']} ms "
                      f"({row['first_audio_ms']}); heard gaps {row['heard_gaps']} ({row['heard_gap_s']} s); "
                      f"server underruns {row['server_underruns']}{'; errors ' + str(row['errors']) if row['errors'] else ''}",
                      flush=True)
    return table


def _voices_dir() -> str:
    """The shipped ICL voice and an x-vector copy of it (no transcript)."""
    root = Path(tempfile.mkdtemp(prefix="bench-voices-", dir=ROOT / "build"))
    shutil.copytree(ROOT / "voices" / "default", root / "default")
    (root / "plain").mkdir()
    shutil.copy(ROOT / "voices" / "default" / "reference.wav", root / "plain" / "reference.wav")
    return str(root)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", help="a running gateway (its voices must include 'plain' and 'default')")
    parser.add_argument("--model-dir", default=str(ROOT / "build" / "tiny-model"))
    parser.add_argument("--rates", default="10,20,50", help="LLM tokens per second")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "streaming_text.json")
    args = parser.parse_args(argv)
    from bench.openloop import _start_stack

    stack = None if args.gateway else _start_stack(args.model_dir, _voices_dir(), prefix="bench-text-")
    base = args.gateway or stack[1].http
    try:
        table = asyncio.run(sweep(base, [float(r) for r in args.rates.split(",")], args.repeats))
    finally:
        if stack:
            for process in reversed(stack):
                process.stop()
    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "answer": ANSWER,
              "tokens": len(llm_tokens(ANSWER)), "results": table}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
