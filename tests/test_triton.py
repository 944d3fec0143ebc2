"""The Triton deployment, for real: tritonserver from the pytriton wheel, gRPC streaming, the tiny model."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from tritonclient.grpc import InferInput, InferRequestedOutput

from conftest import SAMPLE_RATE, synthetic_reference
from reference import FLOAT32_TOLERANCE, qwen_kwargs, reference_generation, rms
from triton_helpers import command_inputs, scalar_input, scrape_metrics, stream, string_input, wait_until
from tts_contract import commands
from tts_engine.tiny_model import EOS_MARKER

LONG_TEXT = "Streaming speech arrives in pieces, and the first piece should come quickly."


@pytest.fixture(scope="module")
def reference_voices(loaded, voices_dir):
    """Each served voice's prompt, computed here by qwen-tts itself from the reference clip (never the server's)."""
    prompts = {}
    for voice in ("default", "plain"):
        folder = voices_dir / voice
        transcript = folder / "transcript.txt"
        ref_text = transcript.read_text().strip() if transcript.is_file() else None
        prompts[voice] = loaded.tts.create_voice_clone_prompt(
            ref_audio=str(folder / "reference.wav"), ref_text=ref_text, x_vector_only_mode=ref_text is None)[0]
    return prompts


async def test_tts_streams_many_responses_first_well_before_last(client):
    """A multi-second utterance arrives as several responses, the first long before the last."""
    result = await stream(client, "tts", LONG_TEXT, language="English", parameters={"max_new_tokens": 150, "greedy": True})
    assert result.error is None
    times = [t for t, _ in result.responses]
    assert len(times) >= 4
    assert times[0] < 0.5 * times[-1]
    assert result.audio().size == 149 * 1920  # max_new_tokens - 1 frames, 1920 samples each


# voice, text, parameters: greedy and seeded, both prompt modes, and a stream that ends at EOS mid-text.
PARITY_CASES = {
    "icl greedy": ("default", LONG_TEXT, {"greedy": True, "max_new_tokens": 40}),
    "icl seeded": ("default", LONG_TEXT, {"seed": 99, "max_new_tokens": 40}),
    "x-vector seeded": ("plain", LONG_TEXT, {"seed": 5, "top_p": 0.8, "max_new_tokens": 40}),
    "x-vector EOS": ("plain", f"Hello there {EOS_MARKER} and then some.", {"seed": 3, "max_new_tokens": 40}),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
async def test_talker_codes_equal_qwen_tts(client, loaded, reference_voices, case):
    """The codes the talker streams equal qwen-tts generate_voice_clone's codes exactly."""
    voice, text, params = PARITY_CASES[case]
    result = await stream(client, "talker", text, voice=voice, language="English", parameters=params,
                          outputs=("codes", "context_codes", "stream_id", "final"))
    assert result.error is None
    expected, _ = reference_generation(loaded.tts, reference_voices[voice], text, seed=params.get("seed"),
                                       **qwen_kwargs(params))
    assert torch.equal(torch.from_numpy(np.concatenate(result.arrays("codes"))).long(), expected)
    reference_codes = reference_voices[voice].ref_code
    context = result.arrays("context_codes")[0]
    if reference_codes is None:
        assert context.shape == (0, 16)
    else:
        assert torch.equal(torch.from_numpy(context).long(), reference_codes.cpu())


@pytest.mark.parametrize("case", ["icl seeded", "x-vector seeded"])
async def test_tts_audio_equals_qwen_tts_one_shot_decode(client, loaded, reference_voices, case):
    """Streamed tts audio equals qwen-tts's one-shot decode of reference + generated codes, cut after the
    reference (generate_voice_clone's own output: one decode for up to 300 frames)."""
    voice, text, params = PARITY_CASES[case]
    result = await stream(client, "tts", text, voice=voice, language="English", parameters=params)
    assert result.error is None
    _, expected = reference_generation(loaded.tts, reference_voices[voice], text, seed=params.get("seed"),
                                       **qwen_kwargs(params))
    streamed = result.audio()
    assert streamed.shape == expected.shape == (39 * 1920,)
    level = rms(expected)
    assert level > 0.05
    assert np.abs(streamed - expected).max() <= FLOAT32_TOLERANCE * level


async def test_concurrent_streams_are_batched_and_each_equals_its_one_shot_decode(client, triton, loaded,
                                                                                   reference_voices):
    """Eight tts streams at once (both voices, greedy and seeded): the talker and the codec decoder batch
    them, and each stream's audio still equals qwen-tts's one-shot decode of its own codes."""
    before = scrape_metrics(triton.metrics_url)
    cases = [("default" if i % 2 else "plain", {"seed": 40 + i, "max_new_tokens": 20 + 3 * i} if i % 3 else
              {"greedy": True, "max_new_tokens": 20 + 3 * i}) for i in range(8)]
    results = await asyncio.gather(*(stream(client, "tts", LONG_TEXT, voice=voice, language="English",
                                            parameters=params) for voice, params in cases))
    for (voice, params), result in zip(cases, results):
        assert result.error is None
        _, expected = reference_generation(loaded.tts, reference_voices[voice], LONG_TEXT, seed=params.get("seed"),
                                           **qwen_kwargs(params))
        streamed = result.audio()
        assert streamed.shape == expected.shape
        assert np.abs(streamed - expected).max() <= FLOAT32_TOLERANCE * rms(expected), (voice, params)
    await asyncio.sleep(1.2)  # both models have published their counters since
    after = scrape_metrics(triton.metrics_url)
    steps = after["qwen_tts_talker_steps_total"] - before["qwen_tts_talker_steps_total"]
    rows = after["qwen_tts_talker_step_streams_total"] - before["qwen_tts_talker_step_streams_total"]
    assert rows / steps > 2, "the talker should have stepped several streams at once"
    batches = after["qwen_tts_decoder_batches_total"] - before["qwen_tts_decoder_batches_total"]
    chunks = after["qwen_tts_decoder_chunks_total"] - before["qwen_tts_decoder_chunks_total"]
    assert chunks / batches > 1.2, "the codec decoder should have decoded several streams at once"


async def test_the_default_voice_is_primed_at_load(client, triton):
    """The codec decoder primed the default voice's state when it loaded: its streams decode no reference."""
    primings = "qwen_tts_decoder_primings_total"
    before = scrape_metrics(triton.metrics_url)[primings]
    assert before >= 1
    result = await stream(client, "tts", "Primed already.", voice="default", parameters={"max_new_tokens": 6})
    assert result.error is None and result.audio().size == 5 * 1920
    await asyncio.sleep(1.2)  # the decoder publishes its counters about once a second
    assert scrape_metrics(triton.metrics_url)[primings] == before


async def test_eos_before_any_frame_gives_an_empty_final_response(client, triton):
    """A stream whose first token is EOS (an x-vector voice, text starting with the marker, min_new_tokens 0)
    ends with one empty final response, and its decoder state is freed."""
    before = scrape_metrics(triton.metrics_url)
    params = {"min_new_tokens": 0, "greedy": True, "max_new_tokens": 40}
    text = f"{EOS_MARKER} Hello there."
    talker = await stream(client, "talker", text, voice="plain", parameters=params,
                          outputs=("codes", "context_codes", "stream_id", "final"))
    assert talker.error is None and len(talker.responses) == 1
    assert talker.arrays("codes")[0].shape == (0, 16) and bool(talker.arrays("final")[0][0])
    tts = await stream(client, "tts", text, voice="plain", parameters=params)
    assert tts.error is None and tts.audio().size == 0
    eos, freed = 'qwen_tts_talker_streams_total{outcome="eos"}', 'qwen_tts_decoder_streams_freed_total{reason="final"}'
    # (metrics are published a few times a second)
    assert await wait_until(lambda: scrape_metrics(triton.metrics_url)[eos] == before[eos] + 2 and
                            scrape_metrics(triton.metrics_url)[freed] == before[freed] + 1, timeout=5)
    assert scrape_metrics(triton.metrics_url)["qwen_tts_decoder_active_streams"] == 0


async def test_talker_streams_codes_with_stream_control(client, reference_voices):
    """talker alone streams [n,16] codes; reference codes come once, first; the last response is final."""
    result = await stream(client, "talker", "Hello there.", voice="default",
                          parameters={"max_new_tokens": 20, "greedy": True},
                          outputs=("codes", "context_codes", "stream_id", "final"))
    assert result.error is None
    codes = result.arrays("codes")
    sizes = [c.shape[0] for c in codes]
    assert sum(sizes) == 19 and len(sizes) >= 2 and all(1 <= n <= 16 for n in sizes), sizes  # paced chunks
    assert all(c.shape[1] == 16 and c.dtype == np.int32 for c in codes)
    context = result.arrays("context_codes")
    assert context[0].shape == tuple(reference_voices["default"].ref_code.shape)
    assert all(c.shape == (0, 16) for c in context[1:])
    assert len({int(s[0]) for s in result.arrays("stream_id")}) == 1
    assert [bool(f[0]) for f in result.arrays("final")] == [False] * (len(sizes) - 1) + [True]


async def test_cancelling_tts_stops_generation_and_frees_decoder_state(client, triton):
    """Cancelling the tts stream stops the talker within a chunk or two and frees the decoder state. (Triton 2.51
    never reports this cancellation to the talker's own request: the decoder sends the talker a `cancel` command;
    without it the talker generates all 4000 frames.)"""
    before = scrape_metrics(triton.metrics_url)
    result = await stream(client, "tts", LONG_TEXT, parameters={"max_new_tokens": 4000, "greedy": True},
                          stop_after=2)
    assert len(result.responses) == 2

    talker, decoder = 'qwen_tts_talker_streams_total{outcome="cancelled"}', \
        'qwen_tts_decoder_streams_freed_total{reason="cancelled"}'

    def cancelled():  # both models saw it (each publishes its metrics a few times a second)
        now = scrape_metrics(triton.metrics_url)
        return now[talker] > before[talker] and now[decoder] > before[decoder] and \
            now["qwen_tts_talker_active_streams"] == 0 and now["qwen_tts_decoder_active_streams"] == 0

    assert await wait_until(cancelled, timeout=20)
    after = scrape_metrics(triton.metrics_url)
    generated = after["qwen_tts_talker_frames_total"] - before["qwen_tts_talker_frames_total"]
    assert generated < 120, f"generation went on for {generated} frames after the cancel"
    await asyncio.sleep(1.0)
    assert scrape_metrics(triton.metrics_url)["qwen_tts_talker_frames_total"] == after["qwen_tts_talker_frames_total"]


@pytest.mark.parametrize("kwargs, code", [
    ({"text": "   "}, "INVALID_TEXT"),
    ({"text": "x" * 2001}, "INVALID_TEXT"),
    ({"text": "Hello", "voice": "nobody"}, "VOICE_NOT_FOUND"),
    ({"text": "Hello", "voice": "../etc"}, "INVALID_REQUEST"),
    ({"text": "Hello", "language": "Klingon"}, "INVALID_CONFIG"),
    ({"text": "Hello", "parameters": {"temperature": -1}}, "INVALID_REQUEST"),
    ({"text": "Hello", "parameters": {"max_new_tokens": 10**7}}, "INVALID_REQUEST"),
    ({"text": "Hello", "parameters": {"no_such_option": 1}}, "INVALID_REQUEST"),
])
async def test_bad_inputs_get_clear_errors_and_the_server_keeps_serving(client, kwargs, code):
    """Each bad input comes back as an error naming its code; a good request right after still works."""
    bad = await stream(client, "tts", **kwargs)
    assert bad.error is not None and f"[{code}]" in bad.error
    good = await stream(client, "tts", "Still here.", parameters={"max_new_tokens": 6, "greedy": True})
    assert good.error is None and good.audio().size == 5 * 1920


async def test_short_request_is_not_blocked_by_a_long_one(client):
    """A short request started during a long one finishes first: streams progress concurrently."""
    long_task = asyncio.create_task(stream(client, "tts", LONG_TEXT, timeout=120,
                                           parameters={"max_new_tokens": 300, "greedy": True}))
    await asyncio.sleep(1.0)
    short = await stream(client, "tts", "Quick one.", parameters={"max_new_tokens": 8, "greedy": True})
    assert short.error is None and not long_task.done()
    long_result = await long_task
    assert long_result.error is None and long_result.audio().size == 299 * 1920


async def test_voice_encoder_builds_a_prompt(client):
    """voice_encoder turns reference audio and transcript into prompt tensors and a loadable blob."""
    from tts_engine.voices.prompts import VoicePrompt

    audio = InferInput("audio", [SAMPLE_RATE * 4], "FP32")
    audio.set_data_from_numpy(synthetic_reference(seconds=4.0))
    rate = InferInput("sample_rate", [1], "INT32")
    rate.set_data_from_numpy(np.array([SAMPLE_RATE], dtype=np.int32))
    result = await asyncio.wait_for(client.infer("voice_encoder", [audio, rate, string_input("ref_text", "Hi.")]),
                                    30)
    assert result.as_numpy("ref_code").shape == (50, 16)
    prompt, meta = VoicePrompt.from_bytes(result.as_numpy("prompt")[0])
    assert prompt.ref_text == "Hi." and prompt.spk_embedding.shape == result.as_numpy("spk_embedding").shape


async def test_voice_encoder_refuses_too_short_audio(client):
    """Half a second of audio is refused with INVALID_AUDIO."""
    from tritonclient.utils import InferenceServerException

    audio = InferInput("audio", [SAMPLE_RATE // 2], "FP32")
    audio.set_data_from_numpy(synthetic_reference(seconds=0.5))
    rate = InferInput("sample_rate", [1], "INT32")
    rate.set_data_from_numpy(np.array([SAMPLE_RATE], dtype=np.int32))
    with pytest.raises(InferenceServerException, match=r"\[INVALID_AUDIO\]"):
        await asyncio.wait_for(client.infer("voice_encoder", [audio, rate]), 30)


# -- text still being written --------------------------------------------------------------------------------

async def _speak_while_writing(client, model: str, key: int, pieces: list, outputs, **inputs) -> tuple:
    """Open a stream with the first piece of its text (``text_key``), then send the others as `append` commands
    on the same gRPC stream, then `end`. Returns (the stream's responses, {command request id: error or None})."""
    first = [string_input("text", pieces[0]), scalar_input("text_key", key, "UINT64")] + \
        [string_input(name, value) for name, value in inputs.items()]

    async def requests():
        yield {"model_name": model, "inputs": first, "request_id": "speak",
               "parameters": {"greedy": True, "max_new_tokens": 120},
               "outputs": [InferRequestedOutput(name) for name in outputs]}
        for index, piece in enumerate(pieces[1:], 1):
            await asyncio.sleep(0.05)
            yield {"model_name": "talker", "request_id": f"append-{index}",
                   "inputs": command_inputs(commands.Append(key, piece))}
        yield {"model_name": "talker", "request_id": "end", "inputs": command_inputs(commands.End(key))}

    responses, appends, ended = [], {}, []

    async def consume():
        async for result, error in client.stream_infer(requests()):
            request_id = error.request_id() if error is not None and hasattr(error, "request_id") else None
            if result is not None:
                reply = result.get_response()
                request_id = reply.id
                final = reply.parameters["triton_final_response"].bool_param
                if request_id == "speak":
                    if reply.outputs:
                        responses.append(result)
                    ended.append(final)
                elif final:
                    appends[request_id] = None
                if any(ended) and len(appends) == len(pieces):
                    return
            else:
                appends[request_id or f"error-{len(appends)}"] = str(error)
                if request_id == "speak":
                    raise AssertionError(f"the stream failed: {error}")

    await asyncio.wait_for(consume(), 120)
    return responses, appends


SPOKEN_WHILE_WRITTEN = "Text arrives while it is spoken — naïvely split, even inside characters, and on it goes."


async def test_talker_speaks_text_appended_while_it_runs(client, loaded, reference_voices):
    """A talker stream opened with the start of its text and continued by `append` commands (5-byte pieces, split
    inside characters, 50 ms apart: it starves) gives exactly qwen-tts's codes for the whole text."""
    data = SPOKEN_WHILE_WRITTEN.encode()
    pieces = [data[:12]] + [data[i:i + 5] for i in range(12, len(data), 5)]
    responses, appends = await _speak_while_writing(client, "talker", 1001, pieces, ("codes", "final"),
                                                    voice="plain", language="English")
    assert all(error is None for error in appends.values()) and len(appends) == len(pieces)
    expected, _ = reference_generation(loaded.tts, reference_voices["plain"], SPOKEN_WHILE_WRITTEN,
                                       **qwen_kwargs({"greedy": True, "max_new_tokens": 120}))
    got = torch.from_numpy(np.concatenate([r.as_numpy("codes") for r in responses])).long()
    assert torch.equal(got, expected)


async def test_tts_speaks_text_appended_while_it_runs(triton, loaded, reference_voices):
    """Through the ``tts`` ensemble with ``client.triton_tts`` (what ``--stdin-stream`` runs): the audio of text
    appended while it is spoken equals qwen-tts's one-shot decode of the whole text's codes."""
    from client.triton_tts import synthesize

    data = SPOKEN_WHILE_WRITTEN.encode()

    async def more_text():
        for start in range(20, len(data), 9):
            await asyncio.sleep(0.05)
            yield data[start:start + 9]

    result = await synthesize(triton.grpc_url, data[:20].decode(), voice="plain", language="English",
                              parameters={"greedy": True, "max_new_tokens": 120}, timeout=120, more_text=more_text())
    _, expected = reference_generation(loaded.tts, reference_voices["plain"], SPOKEN_WHILE_WRITTEN,
                                       **qwen_kwargs({"greedy": True, "max_new_tokens": 120}))
    assert result["audio"].shape == expected.shape
    assert np.abs(result["audio"] - expected).max() <= FLOAT32_TOLERANCE * rms(expected)
