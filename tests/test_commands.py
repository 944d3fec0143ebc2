"""The talker's typed control commands through a real tritonserver: `status`, `cancel` by stream id, an append
to an unknown key, and commands of an unknown kind or version refused."""
from __future__ import annotations

import asyncio
import json

import pytest
from tritonclient.grpc import InferRequestedOutput

from test_triton import LONG_TEXT
from triton_helpers import command_inputs, scrape_metrics, stream, string_input, wait_until
from tts_contract import commands


async def test_the_talker_answers_a_status_command_with_its_real_time_capacity(client):
    """A `status` command gets one response: rows, active and queued streams, the real-time batch (from measured
    step times, at most the rows), headroom and the predicted step time."""
    result = await stream(client, "talker", outputs=("status",), extra_inputs=command_inputs(commands.Status()))
    assert result.error is None and len(result.responses) == 1
    status = json.loads(result.arrays("status")[0][0])
    assert status["rows"] == 16 and 1 <= status["realtime_batch"] <= 16 and status["step_ms"] > 0
    assert {"active", "queued", "headroom", "behind", "margin_ms", "retry_after_ms"} <= set(status)


@pytest.mark.parametrize("message, refusal", [
    (b'{"version": 1, "kind": "pause", "stream_id": 1}', "unknown command kind 'pause'"),
    (b'{"version": 2, "kind": "cancel", "stream_id": 1}', "command version 2 is not supported"),
    (b'{"kind": "status"}', "command version None is not supported"),
    (b'{"version": 1, "kind": "cancel"}', "'cancel' needs one of 'stream_id' and 'stream_key'"),
    (b'{"version": 1, "kind": "append", "text_key": -3}', "'append' needs 'text_key'"),
    (b"not json", "not a JSON object"),
])
async def test_an_unknown_command_kind_or_version_is_refused(client, message, refusal):
    """A control request whose command is not one this talker speaks is refused, saying what is wrong; the talker
    goes on serving."""
    result = await stream(client, "talker", outputs=("status",), extra_inputs=[string_input("command", message)])
    assert result.error is not None and "[INVALID_REQUEST]" in result.error and refusal in result.error
    status = await stream(client, "talker", outputs=("status",), extra_inputs=command_inputs(commands.Status()))
    assert status.error is None


async def test_a_cancel_command_stops_a_talker_stream_by_its_id(client, triton):
    """A `cancel` command naming a running stream's id ends that stream at once, with its empty final response,
    and its talker row stops (as the decoder cancels a tts stream whose client went away)."""
    before = scrape_metrics(triton.metrics_url)['qwen_tts_talker_streams_total{outcome="cancelled"}']
    text = [string_input("text", LONG_TEXT)]

    async def requests(first_response: asyncio.Future):
        yield {"model_name": "talker", "inputs": text, "request_id": "speak",
               "parameters": {"greedy": True, "max_new_tokens": 4000, "min_new_tokens": 4000},
               "outputs": [InferRequestedOutput(n) for n in ("codes", "stream_id", "final")]}
        stream_id = await first_response
        yield {"model_name": "talker", "request_id": "cancel", "inputs": command_inputs(commands.Cancel(stream_id))}

    first: asyncio.Future = asyncio.get_running_loop().create_future()
    codes, finals, acknowledged = [], [], []

    async def consume():
        async for result, error in client.stream_infer(requests(first)):
            assert error is None, error
            reply = result.get_response()
            if reply.id == "cancel":
                acknowledged.append(True)
            elif reply.outputs:
                codes.append(result.as_numpy("codes"))
                finals.append(bool(result.as_numpy("final")[0]))
                if not first.done():
                    first.set_result(int(result.as_numpy("stream_id")[0]))
            if finals and finals[-1] and acknowledged:
                return

    await asyncio.wait_for(consume(), 60)
    assert finals[-1] and codes[-1].shape == (0, 16), "the stream ends with its empty final response"
    assert sum(len(c) for c in codes) < 4000
    assert await wait_until(lambda: scrape_metrics(triton.metrics_url)[
        'qwen_tts_talker_streams_total{outcome="cancelled"}'] > before, timeout=10)


async def test_appending_to_an_unknown_text_key_is_a_clear_error(client):
    """More text for a key nobody opened is refused with a message that says so; the server goes on."""
    async def requests():
        yield {"model_name": "talker", "request_id": "stray", "inputs": command_inputs(commands.Append(777, b"more"))}

    errors = []
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            errors.append(str(error))
            break
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    assert errors and "no open stream with text key 777" in errors[0]
