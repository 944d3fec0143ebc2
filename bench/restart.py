"""Where the time goes when tritonserver dies under `make run`: kill it, then time its way back to audio.

    python -m bench.restart --label before|after [--kills 2]

Each kill runs on a fresh `python -m tools.run_stack` (as `make run` starts it; the tiny model unless
QWEN_TTS_MODEL_DIR is set), so every kill is a first crash (the supervisor's backoff grows only for repeated
ones). Once the stack serves, one utterance is spoken (steady-state first audio), then tritonserver gets
SIGKILL and a connected client speaks again every 50 ms until audio comes back. The breakdown (seconds after
the kill) comes from the supervisor's messages, tritonserver's and the models' log lines, the gateway's log
and the client. Written to results/restart.json under ``--label`` (other labels in the file are kept).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.gateway_local import gateway_ready  # noqa: E402
from tools.triton_local import free_port, process_dirs  # noqa: E402

MODELS = ("talker", "codec_decoder", "voice_encoder", "tts")
GLOG = re.compile(r"^[IWEF](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d{6}) +\d+ (\S+\] .*)$")
PYLOG = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}),(\d{3}) (.*)$")
# (event, pattern) for lines of tritonserver's log (its own and its models'), first match after the kill wins.
TRITON_EVENTS = [(f"{model}: loading", re.compile(rf'"loading: {model}:\d+"')) for model in MODELS] + \
    [(f"{model}: loaded", re.compile(rf"successfully loaded '{model}'")) for model in MODELS] + [
    ("talker: weights loaded", re.compile(r"^talker INFO tts_engine\.loading: loaded")),
    ("talker: step calibrated", re.compile(r"^talker INFO talker: step ms by batch")),
    ("codec_decoder: weights loaded", re.compile(r"^codec_decoder INFO tts_engine\.loading: loaded")),
    ("codec_decoder: default voice primed", re.compile(r"^codec_decoder INFO codec_decoder: primed")),
    ("voice_encoder: weights loaded", re.compile(r"^voice_encoder INFO tts_engine\.loading: loaded")),
    ("server: serving (gRPC up)", re.compile(r"Started GRPCInferenceService")),
]
SPEECH = "Back again after the crash."


def _stamp(line: str, year: int) -> tuple[float, str] | None:
    """Wall-clock time and message of a glog (tritonserver) or Python logging (models, gateway) line."""
    if match := GLOG.match(line):
        month, day, hour, minute, second, micro, message = match.groups()
        when = datetime(year, int(month), int(day), int(hour), int(minute), int(second), int(micro))
        return when.timestamp(), message
    if match := PYLOG.match(line):
        when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
        return when.timestamp() + int(match.group(2)) / 1000, match.group(3)
    return None


def _new_lines(path: Path, offset: int) -> list[str]:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace").splitlines()


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _server_pid(grpc_port: int) -> int | None:
    for entry in process_dirs():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"tritonserver") and f"--grpc-port={grpc_port}".encode() in cmdline:
            return int(entry.name)
    return None


class Stderr:
    """The supervisor's messages, each stamped when it arrives."""

    def __init__(self, stream):
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for raw in stream:
            self.lines.append((time.time(), raw.decode(errors="replace").rstrip()))

    def first(self, needle: str, after: float) -> float | None:
        return next((at for at, line in list(self.lines) if at >= after and needle in line), None)


async def _speak_until_audio(url: str, deadline: float, before=None) -> dict:
    """On one session: call ``before`` (the kill) once started, then speak every 50 ms until audio arrives;
    the attempts refused meanwhile, when the first audio came and how long that request took to it."""
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None, open_timeout=10) as ws:
        json.loads(await asyncio.wait_for(ws.recv(), 10))
        await ws.send(json.dumps({"type": "start"}))
        json.loads(await asyncio.wait_for(ws.recv(), 10))
        if before is not None:
            before()
        attempts, refusals = 0, {}
        while time.time() < deadline:
            attempts += 1
            rid, sent = f"r{attempts}", time.time()
            await ws.send(json.dumps({"type": "speak", "text": SPEECH, "requestId": rid}))
            while True:
                frame = await asyncio.wait_for(ws.recv(), max(1.0, deadline - time.time()))
                if isinstance(frame, bytes):
                    heard = time.time()
                    while not (isinstance(frame, str) and json.loads(frame).get("type") == "complete"):
                        frame = await asyncio.wait_for(ws.recv(), 60)  # let it finish before the next kill
                    return {"first_audio_at": heard, "request_to_audio_s": heard - sent, "attempts": attempts,
                            "refusals": refusals}
                message = json.loads(frame)
                if message.get("requestId") in (rid, None) and message["type"] in ("error", "complete"):
                    if message["type"] == "error":
                        refusals[message["code"]] = refusals.get(message["code"], 0) + 1
                    break
            await asyncio.sleep(0.05)
    raise TimeoutError("no audio before the deadline")


def one_kill(timeout: float) -> dict:
    """A fresh stack, one SIGKILL of tritonserver once it serves, and the timeline back to audio."""
    ports = {name: free_port() for name in ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT",
                                             "GATEWAY_PORT")}
    logs = Path(tempfile.mkdtemp(prefix="bench-restart-", dir=ROOT / "build"))  # its own: make run's are shared
    env = {**os.environ, **{name: str(port) for name, port in ports.items()}, "QWEN_TTS_LOG_DIR": str(logs)}
    stack = subprocess.Popen([sys.executable, "-m", "tools.run_stack"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = Stderr(stack.stderr)
    http, ws = f"http://127.0.0.1:{ports['GATEWAY_PORT']}", f"ws://127.0.0.1:{ports['GATEWAY_PORT']}/api/v1/speak"
    try:
        deadline = time.monotonic() + timeout
        while not gateway_ready(http):
            if stack.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("make run never became ready: " + "\n".join(l for _, l in stderr.lines[-20:]))
            time.sleep(0.2)
        warm = asyncio.run(_speak_until_audio(ws, time.time() + 60))
        pid = _server_pid(ports["TRITON_GRPC_PORT"])
        if pid is None:
            raise RuntimeError("the stack serves, but no tritonserver with its gRPC port was found")
        offsets = {name: _size(logs / name) for name in ("tritonserver.log", "gateway.log")}
        killed: list[float] = []

        def kill() -> None:
            killed.append(time.time())
            os.kill(pid, signal.SIGKILL)

        back = asyncio.run(_speak_until_audio(ws, time.time() + timeout, before=kill))
        time.sleep(1.0)  # the last log lines of the models are written a moment after they are ready
        return _timeline(killed[0], back, warm, stderr, logs, offsets)
    finally:
        stack.send_signal(signal.SIGTERM)
        try:
            stack.wait(60)
        except subprocess.TimeoutExpired:
            stack.kill()
            stack.wait(10)


def _timeline(killed: float, back: dict, warm: dict, stderr: Stderr, logs: Path, offsets: dict) -> dict:
    """Seconds after the kill of each event, in order."""
    year = time.localtime(killed).tm_year
    events = {"supervisor: noticed the exit": stderr.first("tritonserver exited", killed),
              "supervisor: started tritonserver": stderr.first("tritonserver restarted", killed)}
    server_lines = [s for s in (_stamp(line, year) for line in _new_lines(logs / "tritonserver.log",
                                                                         offsets["tritonserver.log"])) if s]
    server_lines = [(at, message) for at, message in server_lines if at >= killed]
    # The old model processes log their server's death ("Non-graceful termination"): not the new server's lines.
    events["server: first log line"] = next((at for at, m in server_lines if not m.startswith("pb_stub")), None)
    for name, pattern in TRITON_EVENTS:
        events[name] = next((at for at, message in server_lines if pattern.search(message)), None)
    gateway_lines = [s for s in (_stamp(line, year) for line in _new_lines(logs / "gateway.log", offsets["gateway.log"]))
                     if s and s[0] >= killed]
    events["gateway: saw Triton down"] = next((at for at, m in gateway_lines if "is NOT ready" in m), None)
    events["gateway: saw Triton ready"] = next((at for at, m in gateway_lines if re.search(r"Triton at \S+ is ready", m)),
                                               None)
    events["client: first audio"] = back["first_audio_at"]
    ordered = sorted(((name, at - killed) for name, at in events.items() if at is not None), key=lambda e: e[1])
    return {"events_s": {name: round(seconds, 3) for name, seconds in ordered},
            "missing": [name for name, at in events.items() if at is None],
            "kill_to_first_audio_s": round(back["first_audio_at"] - killed, 3),
            "refused_attempts": back["refusals"], "first_request_to_audio_s": round(back["request_to_audio_s"], 3),
            "steady_first_audio_s": round(warm["request_to_audio_s"], 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="latest", help="key under which the run is kept in the output")
    parser.add_argument("--kills", type=int, default=2, help="kills, each on a fresh stack")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed for each start and recovery")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "restart.json")
    args = parser.parse_args(argv)
    runs = []
    for index in range(args.kills):
        run = one_kill(args.timeout)
        runs.append(run)
        print(f"kill {index + 1}: first audio {run['kill_to_first_audio_s']:.2f} s after the kill "
              f"(refused: {run['refused_attempts']}; steady-state first audio {run['steady_first_audio_s']:.3f} s)")
        for name, seconds in run["events_s"].items():
            print(f"  {seconds:7.2f} s  {name}")
        if run["missing"]:
            print(f"  not seen: {', '.join(run['missing'])}")
    totals = [run["kill_to_first_audio_s"] for run in runs]
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "command": f"python -m bench.restart --label {args.label} --kills {args.kills}",
              "load_average_1m": round(os.getloadavg()[0], 2),
              "kill_to_first_audio_s": {"median": round(statistics.median(totals), 3), "each": totals}, "runs": runs}
    everything = json.loads(args.output.read_text()) if args.output.exists() else {}
    everything[args.label] = result
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(everything, indent=2) + "\n")
    print(f"kill -> first audio: median {result['kill_to_first_audio_s']['median']:.2f} s over {len(totals)}; "
          f"written to {args.output} ({args.label})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
