"""Stream `tts` from Triton over gRPC into a WAV file and report time to first audio.

    python -m client.triton_tts "Hello there." -o hello.wav [--voice default] [--language English]
    python -m client.triton_tts "Hello." --model tts_custom --voice kai --instruct "Very happy."
    my_llm --stream | python -m client.triton_tts --stdin-stream -o answer.wav

``--model`` picks the served model's ensemble (`tts`: the default model; `tts_<name>`: the others).

With ``--stdin-stream`` the text is spoken while it is read: one utterance, opened with ``text_key`` and
continued by `append` commands (tts_contract.commands) on the same gRPC stream as standard input delivers it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np

from tts_contract import commands, tensors as names
from tts_contract.audio import SAMPLE_RATE


def _parse_param(text: str):
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


class TritonError(RuntimeError):
    """Triton refused or failed the request; the message starts with the engine's [CODE]."""


def _tensor(name: str, value, wire_dtype: str = "BYTES"):
    from tritonclient.grpc import InferInput

    tensor = InferInput(name, [1], wire_dtype)
    if wire_dtype == "BYTES":
        data = np.array([value if isinstance(value, bytes) else value.encode("utf-8")], dtype=np.object_)
    else:
        data = np.array([value], dtype={"UINT64": np.uint64, "BOOL": bool}[wire_dtype])
    tensor.set_data_from_numpy(data)
    return tensor


async def synthesize(url: str, text: str, voice=None, language=None, parameters=None, timeout: float = 300.0,
                     on_chunk=None, more_text=None, model: str = names.TTS, instruct=None) -> dict:
    """Run one streaming ``tts`` request over gRPC; returns audio, time to first audio and totals.
    ``more_text``: an async iterator of further pieces (str or UTF-8 bytes split anywhere); the text is then
    spoken as it arrives and closed when the iterator ends. ``model``: the ensemble (`tts` or `tts_<name>`);
    ``instruct``: a style instruction or a VoiceDesign model's voice description."""
    import secrets

    import tritonclient.grpc.aio as grpcclient
    from tritonclient.grpc import InferRequestedOutput

    inputs = [_tensor(name, value) for name, value in ((names.VOICE, voice), (names.LANGUAGE, language),
                                                       (names.INSTRUCT, instruct)) if value]
    talker = names.TALKER + model[len(names.TTS):]  # tts -> talker, tts_<name> -> talker_<name>
    key = secrets.randbits(63) if more_text is not None else None
    if key is None:
        inputs.append(_tensor(names.TEXT, text))
    else:
        inputs += [_tensor(names.TEXT, text or ""), _tensor(names.TEXT_KEY, key, "UINT64")]

    async def requests():
        yield {"model_name": model, "inputs": inputs, "parameters": parameters or {}, "request_id": "speak",
               "outputs": [InferRequestedOutput(names.AUDIO)]}
        if more_text is None:
            return
        index = 0
        async for piece in more_text:
            index += 1
            yield {"model_name": talker, "request_id": f"append-{index}",
                   "inputs": [_tensor(names.COMMAND, commands.encode(commands.Append(key))),
                              _tensor(names.TEXT, piece)]}
        yield {"model_name": talker, "request_id": "end",
               "inputs": [_tensor(names.COMMAND, commands.encode(commands.End(key)))]}

    client = grpcclient.InferenceServerClient(url)
    chunks, first_audio = [], None
    start = time.monotonic()

    async def consume():
        nonlocal first_audio
        async for result, error in client.stream_infer(requests()):
            if error is not None:
                raise TritonError(str(error))
            if result.get_response().id != "speak":  # a command's acknowledgement
                continue
            audio = result.as_numpy(names.AUDIO)
            if audio is not None and audio.size:
                first_audio = time.monotonic() - start if first_audio is None else first_audio
                chunks.append(audio)
                if on_chunk:
                    on_chunk(audio)
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return

    try:
        await asyncio.wait_for(consume(), timeout)
    finally:
        await client.close()
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return {"audio": audio, "first_audio_s": first_audio, "total_s": time.monotonic() - start,
            "responses": len(chunks)}


async def _stdin_pieces():
    """Standard input's bytes as they arrive (read in a thread; a piece may end inside a character)."""
    loop = asyncio.get_running_loop()
    while True:
        piece = await loop.run_in_executor(None, lambda: sys.stdin.buffer.read1(4096))
        if not piece:
            return
        yield piece


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="?", default="", help="text to speak ('-' reads standard input)")
    parser.add_argument("--stdin-stream", action="store_true",
                        help="speak standard input while it is being written (one continuous utterance)")
    parser.add_argument("-o", "--output", default="out.wav", help="WAV file to write (24 kHz, 16-bit)")
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    parser.add_argument("--model", default=names.TTS,
                        help="the served model's Triton ensemble: tts (the default model) or tts_<name>")
    parser.add_argument("--voice", help="voice id, or a CustomVoice model's speaker (default: the model's default)")
    parser.add_argument("--instruct", help="a style instruction (CustomVoice 1.7B) or the voice's description "
                        "(VoiceDesign)")
    parser.add_argument("--language", help="English, Chinese, ... or Auto")
    parser.add_argument("--seed", type=int, help="sampling seed, for reproducible output")
    parser.add_argument("--max-new-tokens", type=int, help="cap on generated frames (12.5 per second)")
    parser.add_argument("--param", action="append", type=_parse_param, default=[], metavar="NAME=VALUE",
                        help="any sampling parameter, e.g. --param temperature=0.7 --param greedy=true")
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.text == "-" and not args.stdin_stream else args.text
    parameters = dict(args.param)
    if args.seed is not None:
        parameters["seed"] = args.seed
    if args.max_new_tokens is not None:
        parameters["max_new_tokens"] = args.max_new_tokens
    more_text = _stdin_pieces() if args.stdin_stream else None
    try:
        result = asyncio.run(synthesize(args.url, text, args.voice, args.language, parameters, more_text=more_text,
                                        model=args.model, instruct=args.instruct))
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import soundfile as sf

    audio = result["audio"]
    sf.write(args.output, audio, SAMPLE_RATE, subtype="PCM_16")
    seconds = audio.size / SAMPLE_RATE
    ttfa = result["first_audio_s"]
    print(f"wrote {args.output}: {seconds:.2f} s of audio in {result['responses']} chunks; "
          f"time to first audio {ttfa * 1000:.0f} ms; total {result['total_s']:.2f} s; "
          f"real-time factor {result['total_s'] / seconds:.2f}" if seconds else
          f"no audio received (total {result['total_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
