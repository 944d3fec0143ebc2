"""Cancel storm: sessions that speak and cancel as fast as they can, as an impatient app does.

    python -m bench.cancel_storm [--seconds 60] [--sessions 4] [--seed 1] [--output results/cancel_storm.json]

Against a stack started as ``make run`` starts it (tiny model, 16 rows), each session loops: `speak` a sentence,
wait a random moment (nothing, up to its first audio, or a little past it), `cancel`, read the end message. At the
end it reports the utterances, how many `speak`s were refused (RATE_LIMITED) and by whom (the talker's own
refusals are its `rejected` outcome; any others were the gateway's), and what the servers still hold once the
storm is over: talker streams, and codec decoder states one and five seconds later (freed on the stream's end,
not by the 60 s idle timeout). Prints numbers and writes them; nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEXTS = ["Please hold on while I check that for you.", "The next train leaves at ten past four from platform two.",
         "Sure, here is what I found about the weather this weekend, starting with Saturday morning.",
         "Okay.", "I can help with that, but first tell me which account you mean."]


async def session(url: str, until: float, rng: random.Random, tally: Counter) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None, open_timeout=30) as ws:
        json.loads(await ws.recv())  # ready
        while time.monotonic() < until:
            await ws.send(json.dumps({"type": "speak", "text": rng.choice(TEXTS)}))
            wait = rng.choice((0.0, 0.02, 0.1, 0.3))
            deadline = time.monotonic() + wait
            cancelled = False
            while True:
                left = deadline - time.monotonic()
                if not cancelled and left <= 0:
                    await ws.send(json.dumps({"type": "cancel"}))
                    cancelled = True
                try:
                    frame = await asyncio.wait_for(ws.recv(), max(0.001, left) if not cancelled else 30)
                except TimeoutError:
                    continue
                if isinstance(frame, bytes):
                    continue
                message = json.loads(frame)
                if message["type"] == "error":
                    tally[message["code"]] += 1
                elif message["type"] == "audio_end":  # (an utterance that ended before its cancel: a no-op)
                    tally["utterances"] += 1
                    tally["cancelled" if message["cancelled"] else "completed"] += 1
                    break


def _talker(metrics_url: str) -> dict:
    from tools.triton_local import scrape_metrics

    values = scrape_metrics(metrics_url)
    return {"rejected": values.get('qwen_tts_talker_streams_total{outcome="rejected"}', 0.0),
            "cancelled": values.get('qwen_tts_talker_streams_total{outcome="cancelled"}', 0.0),
            "active": values.get("qwen_tts_talker_active_streams", 0.0),
            "decoder_states": values.get("qwen_tts_decoder_active_streams", 0.0),
            "decoder_freed_idle": values.get('qwen_tts_decoder_streams_freed_total{reason="idle"}', 0.0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(ROOT / "build" / "tiny-model"))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "cancel_storm.json")
    args = parser.parse_args(argv)
    from bench.openloop import _start_stack

    server, gateway = _start_stack(args.model_dir, prefix="bench-cancel-storm-")
    try:
        before = _talker(server.metrics_url)
        tally: Counter = Counter()

        async def storm():
            until = time.monotonic() + args.seconds
            await asyncio.gather(*(session(gateway.ws, until, random.Random(args.seed + i), tally)
                                   for i in range(args.sessions)))

        asyncio.run(storm())
        time.sleep(1.0)
        after_1s = _talker(server.metrics_url)
        time.sleep(4.0)
        after_5s = _talker(server.metrics_url)
    finally:
        gateway.stop()
        server.stop()
    refused = tally["RATE_LIMITED"]
    talker_refused = int(after_5s["rejected"] - before["rejected"])
    results = {"seconds": args.seconds, "sessions": args.sessions, "utterances": tally["utterances"],
               "completed": tally["completed"], "cancelled": tally["cancelled"], "errors": {
                   k: v for k, v in tally.items() if k not in ("utterances", "completed", "cancelled")},
               "rate_limited": refused, "refused_by_the_talker": talker_refused,
               "refused_by_the_gateway_itself": max(0, refused - talker_refused),
               "talker_cancelled": int(after_5s["cancelled"] - before["cancelled"]),
               "talker_active_after_1s": after_1s["active"], "decoder_states_after_1s": after_1s["decoder_states"],
               "decoder_states_after_5s": after_5s["decoder_states"],
               "decoder_freed_by_idle_timeout": after_5s["decoder_freed_idle"] - before["decoder_freed_idle"]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
