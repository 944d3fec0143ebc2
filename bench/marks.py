"""Word marks as a listener meets them: when each word's mark reached the client, relative to when the listener
played the start of that word.

    python -m bench.marks [--sessions 1,4] [--utterances 6] [--output results/marks.json]

One tritonserver with the tiny model and the tiny aligner (as ``make run`` serves them) and the gateway. Each
session asks for `wordTimestamps` and speaks realistic sentences (the frame cap near real speech: the tiny model's
speech never ends by itself). The client plays at real time from its first audio, restarting after a stall (the
listener arithmetic of tts_contract.listener), and records when each word's start is played and when its mark
came. ``lead_ms`` = played − mark arrival: positive means the mark was there before the word was heard. Also the
aligner's cost per second of audio (align_batch at 1 and 16 streams) when the aligner bench has written
results/aligner.json. Prints numbers and writes them; nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXTS = [
    "Sure, the next train to the airport leaves at ten past four from platform two.",
    "I looked at your calendar and you are free on Thursday afternoon after three.",
    "The weather this weekend looks dry on Saturday, with some rain coming in on Sunday evening.",
    "Your order shipped this morning and should arrive by Wednesday, tracking number ending in four two.",
    "Okay, I have moved the meeting to Friday and told everyone who was invited.",
    "That restaurant opens at six, and they still have a table for two at half past seven.",
]


class Playback:
    """Real-time playback from the first audio, restarting after a stall: when each audio position is played."""

    def __init__(self):
        self.segments: list[tuple[float, float]] = []  # (audio position s, wall time it plays)
        self.audio_s = 0.0
        self.ends_at = None  # when what arrived so far has played

    def add(self, seconds: float, arrived: float) -> None:
        starts = arrived if self.ends_at is None else max(arrived, self.ends_at)
        self.segments.append((self.audio_s, starts))
        self.audio_s += seconds
        self.ends_at = starts + seconds

    def played_at(self, position_s: float) -> float:
        chosen = self.segments[0]
        for segment in self.segments:
            if segment[0] <= position_s:
                chosen = segment
        return chosen[1] + (position_s - chosen[0])


async def _utterance(ws, text: str, request_id: str) -> list[float]:
    """Speak one text; the lead of each of its words' marks over playback (ms)."""
    await ws.send(json.dumps({"type": "speak", "text": text, "requestId": request_id}))
    playback, marks = Playback(), []
    async with asyncio.timeout(120):
        while True:
            frame = await ws.recv()
            now = time.monotonic()
            if isinstance(frame, bytes):
                playback.add(len(frame) / 4 / 24000, now)  # pcm32f @ 24 kHz
                continue
            message = json.loads(frame)
            if message["type"] == "marks":
                marks += [(word["startMs"], now) for word in message["words"]]
            elif message["type"] == "complete":
                break
            elif message["type"] == "error":
                raise RuntimeError(message)
    return [1000 * (playback.played_at(start_ms / 1000) - arrived) for start_ms, arrived in marks
            if start_ms / 1000 <= playback.audio_s]


async def _session(url: str, texts: list, index: int) -> list[float]:
    from websockets.asyncio.client import connect

    leads = []
    async with connect(url, max_size=None, open_timeout=30) as ws:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "start", "encoding": "pcm32f", "wordTimestamps": True}))
        started = json.loads(await ws.recv())
        if not started.get("wordTimestamps"):
            raise RuntimeError("this deployment serves no word marks (no aligner)")
        for number, text in enumerate(texts):
            leads += await _utterance(ws, text, f"s{index}-u{number}")
    return leads


def _percentiles(values: list) -> dict:
    ordered = sorted(values)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)  # noqa: E731
    return {"words": len(values), "p5": pick(0.05), "p50": pick(0.5), "p95": pick(0.95),
            "before_the_word_played": round(sum(1 for v in values if v >= 0) / len(values), 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(ROOT / "build" / "tiny-model"))
    parser.add_argument("--aligner-dir", default=str(ROOT / "build" / "tiny-aligner"))
    parser.add_argument("--sessions", default="1,4")
    parser.add_argument("--utterances", type=int, default=6)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "marks.json")
    args = parser.parse_args(argv)
    from bench.openloop import FRAMES_PER_CHAR, _start_stack

    server, gateway = _start_stack(args.model_dir, prefix="bench-marks-", aligner_dir=args.aligner_dir)
    results: dict = {"frames_per_char": FRAMES_PER_CHAR, "mark_lead_over_playback_ms": {}}
    try:
        for sessions in (int(n) for n in args.sessions.split(",")):
            async def run():
                return await asyncio.gather(*(_session(gateway.ws, TEXTS[:args.utterances], i)
                                              for i in range(sessions)))

            leads = [lead for per_session in asyncio.run(run()) for lead in per_session]
            results["mark_lead_over_playback_ms"][f"{sessions}_sessions"] = _percentiles(leads)
            print(sessions, "sessions:", json.dumps(_percentiles(leads)), flush=True)
    finally:
        gateway.stop()
        server.stop()
    aligner = ROOT / "results" / "aligner.json"
    if aligner.exists():
        results["aligner_cost"] = json.loads(aligner.read_text())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
