"""The word aligner: align_batch and the Triton model `aligner` give exactly qwen-asr's Qwen3ForcedAligner.align
on the tiny aligner; words map back to their characters; bad requests fail alone."""
from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from conftest import SAMPLE_RATE, synthetic_reference
from triton_helpers import scrape_metrics
from tts_contract.limits import MAX_ALIGN_SECONDS, MAX_TEXT_CHARS
from tts_contract.words import decode_words

# (text, language named in the request, the language it is aligned as, seconds of audio)
SAMPLES = [
    ("Hello there! Don't worry, the train leaves at 4:15 from platform two.", "English", "English", 4.5),
    ("你好，世界。今天天气很好，我们去公园散步吧。", "Chinese", "Chinese", 5.0),
    ("こんにちは、世界。今日はいい天気ですね。", "Japanese", "Japanese", 3.5),
    ("안녕하세요, 세계. 오늘은 날씨가 좋네요.", "Korean", "Korean", 4.0),
    ("It's now or never, now or never.", None, "English", 3.0),
    ("ありがとう、また明日。", "Auto", "Japanese", 3.2),
]
ALIGN_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def word_aligner(tiny_aligner_dir):
    from tts_engine.alignment import load_aligner

    return load_aligner(tiny_aligner_dir, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def reference(tiny_aligner_dir):
    """qwen-asr's own aligner, loaded separately: what every path must equal."""
    import torch
    from qwen_asr import Qwen3ForcedAligner

    return Qwen3ForcedAligner.from_pretrained(str(tiny_aligner_dir), dtype=torch.float32, device_map="cpu")


def audio_for(index: int) -> np.ndarray:
    return synthetic_reference(seconds=SAMPLES[index][3], seed=10 + index)


def expected(reference, audio: np.ndarray, text: str, language: str, sample_rate: int = SAMPLE_RATE) -> list:
    """(word, start s, end s) as Qwen3ForcedAligner.align gives them for this item alone."""
    return [(item.text, item.start_time, item.end_time)
            for item in reference.align((audio, sample_rate), text, language)[0]]


def as_aligned(words) -> list:
    """Words in align()'s terms: their times in seconds (integer ms / 1000 is exactly align()'s rounded float)."""
    return [(word.text, word.start_ms / 1000, word.end_ms / 1000) for word in words]


def inputs(audio: np.ndarray, text: str, language=None, sample_rate: int = SAMPLE_RATE) -> list[InferInput]:
    """One request of the batched model: each tensor with a leading batch dimension of 1."""
    tensors = [("audio", np.asarray(audio, np.float32).reshape(1, -1), "FP32"),
               ("sample_rate", np.array([[sample_rate]], np.int32), "INT32"),
               ("text", np.array([[text.encode()]], np.object_), "BYTES")]
    if language is not None:
        tensors.append(("language", np.array([[language.encode()]], np.object_), "BYTES"))
    made = []
    for name, value, dtype in tensors:
        tensor = InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        made.append(tensor)
    return made


async def served_words(client, audio, text, language=None, sample_rate: int = SAMPLE_RATE):
    result = await asyncio.wait_for(client.infer("aligner", inputs(audio, text, language, sample_rate)),
                                    ALIGN_TIMEOUT_S)
    return decode_words(result.as_numpy("words").reshape(-1)[0])


def test_align_batch_equals_align_item_by_item(word_aligner, reference):
    """align_batch gives, for each item of a mixed batch, exactly what align() gives for that item alone."""
    from tts_engine.alignment import AlignItem

    items = [AlignItem(audio_for(i), SAMPLE_RATE, text, named) for i, (text, named, _, _) in enumerate(SAMPLES)]
    batch = word_aligner.align_batch(items)
    want = [expected(reference, audio_for(i), text, aligned_as) for i, (text, _, aligned_as, _) in enumerate(SAMPLES)]
    assert [as_aligned(words) for words in batch] == want
    times = {word.start_ms for words in batch for word in words}
    assert len(times) > 5, "the tiny aligner must tell words apart for this check to mean anything"


async def test_served_words_equal_align(client, reference):
    """The Triton model's words, times and character spans are align()'s for the same audio and text."""
    text, named, aligned_as, _ = SAMPLES[0]
    words = await served_words(client, audio_for(0), text, named)
    assert as_aligned(words) == expected(reference, audio_for(0), text, aligned_as)
    assert [text[w.char_start:w.char_end] for w in words][:4] == ["Hello", "there", "Don't", "worry"]
    assert len({(w.start_ms, w.end_ms) for w in words}) > 5, "words with equal times would hide a mix-up"


async def test_concurrent_requests_are_batched_and_each_equals_its_own_align(client, triton, reference):
    """Concurrent requests of different lengths and languages are batched, and each gets exactly its own align()."""
    def counts():
        metrics = scrape_metrics(triton.metrics_url)
        return (metrics['nv_inference_count{model="aligner",version="1"}'],
                metrics['nv_inference_exec_count{model="aligner",version="1"}'])

    requests_before, executions_before = counts()
    order = [0, 1, 2, 3, 4, 5, 1, 0]
    results = await asyncio.gather(*[served_words(client, audio_for(i), SAMPLES[i][0], SAMPLES[i][1])
                                     for i in order])
    for i, words in zip(order, results):
        assert as_aligned(words) == expected(reference, audio_for(i), SAMPLES[i][0], SAMPLES[i][2])
    requests, executions = counts()
    assert requests - requests_before == len(order) and executions - executions_before < len(order)


BAD_REQUESTS = {
    "empty audio": (np.zeros(0, np.float32), "Hello.", None, SAMPLE_RATE, r"\[INVALID_AUDIO\] audio is empty"),
    "too long text": (synthetic_reference(1.0), "word " * (MAX_TEXT_CHARS // 5 + 1), None, SAMPLE_RATE,
                      rf"\[INVALID_TEXT\] text has \d+ characters; the limit is {MAX_TEXT_CHARS}"),
    "too long audio": (np.full(int((MAX_ALIGN_SECONDS + 1) * 8000), 0.1, np.float32), "Hello.", None, 8000,
                       rf"\[INVALID_AUDIO\] audio is 181.0 s; the aligner takes at most {MAX_ALIGN_SECONDS:g} s"),
    "unknown language": (synthetic_reference(1.0), "Hello.", "Klingon", SAMPLE_RATE,
                         r"\[INVALID_CONFIG\] unsupported language 'Klingon'"),
}


@pytest.mark.parametrize("bad", list(BAD_REQUESTS))
async def test_a_bad_request_fails_alone_with_a_clear_error(client, reference, bad):
    """A bad request gets its own clear error; a good one beside it, and the next one, get their words."""
    audio, text, language, rate, message = BAD_REQUESTS[bad]
    good_text, named, aligned_as, _ = SAMPLES[4]
    outcomes = await asyncio.gather(served_words(client, audio, text, language, rate),
                                    served_words(client, audio_for(4), good_text, named), return_exceptions=True)
    assert isinstance(outcomes[0], InferenceServerException) and re.search(message, str(outcomes[0])), outcomes[0]
    want = expected(reference, audio_for(4), good_text, aligned_as)
    assert as_aligned(outcomes[1]) == want
    assert as_aligned(await served_words(client, audio_for(4), good_text, named)) == want


SPAN_TEXTS = [
    ("Don't stop — now, now! It's 4:15, isn't it?", "English"),
    ("“Quoted” words... and (brackets); e-mail/URLs: a.b@c.d", "English"),
    ("你好，世界。你好！Hello世界", "Chinese"),
    ("こんにちは、世界。今日は　いい天気ですね！", "Japanese"),
    ("안녕하세요, 세계. 오늘은 날씨가 좋네요!", "Korean"),
    ("l'homme qu'il a vu, c'est l'homme.", "French"),
]


@pytest.mark.parametrize("text, language", SPAN_TEXTS)
def test_word_spans_cut_the_text_at_word_boundaries(text, language):
    """Each aligner word maps to its characters in the original text, in order, with only dropped characters
    (spaces, punctuation) between words: cutting the text at a word's end never splits a word."""
    from qwen_asr.inference.qwen3_forced_aligner import Qwen3ForceAlignProcessor

    from tts_engine.alignment.spans import is_kept, word_spans

    words, _ = Qwen3ForceAlignProcessor().encode_timestamp(text, language)
    spans = word_spans(text, words)
    assert len(spans) == len(words) > 0
    ends = [0] + [end for _, end in spans]
    for (start, end), previous_end, word in zip(spans, ends, words):
        assert "".join(c for c in text[start:end] if is_kept(c)) == word
        assert is_kept(text[start]) and is_kept(text[end - 1])
        assert not any(is_kept(c) for c in text[previous_end:start]), (word, text[previous_end:start])
    assert not any(is_kept(c) for c in text[ends[-1]:])


def test_word_spans_of_repeated_and_joined_words():
    """Repeated words get their own places, and a word the aligner joins across punctuation spans all of it."""
    from tts_engine.alignment.spans import word_spans

    text = "now, now — rock'n'roll; stop—go 你好你"
    assert word_spans(text, ["now", "now", "rock'n'roll", "stopgo", "你", "好", "你"]) == [
        (0, 3), (5, 8), (11, 22), (24, 31), (32, 33), (33, 34), (34, 35)]


def test_auto_language_picks_the_splitter_from_the_script():
    """Auto aligns kana text as Japanese, Hangul as Korean and anything else (Chinese too) as English."""
    from tts_engine.alignment.spans import alignment_language

    texts = ("今日はいい天気", "오늘 날씨", "今天天气", "Hello")
    assert [alignment_language(None, t) for t in texts] == ["Japanese", "Korean", "English", "English"]
    assert alignment_language("chinese", "今日は") == "Chinese"


def test_aligner_is_rendered_only_with_an_aligner_directory(tmp_path):
    """ALIGNER_DIR empty (the CPU default) renders no aligner; set (the GPU default), it is rendered with its
    instance count and directory."""
    from tools.render_model_repository import render, resolve

    repo = render(tmp_path / "cpu", resolve("cpu", {"MODEL_DIR": "/m"}, environ={}))
    assert not (repo / "aligner").exists() and (repo / "voice_encoder").is_dir()
    values = resolve("gpu", {"MODEL_DIR": "/m", "ALIGNER_INSTANCES": "2"}, environ={})
    config = (render(tmp_path / "gpu", values) / "aligner" / "config.pbtxt").read_text()
    assert "count: 2 kind: KIND_GPU" in config and '"/models/Qwen3-ForcedAligner-0.6B"' in config


def test_make_run_serves_the_tiny_aligner_only_with_the_tiny_model(tiny_model_dir, tiny_aligner_dir, monkeypatch):
    """`make run` without weights serves the tiny aligner; with real weights, an aligner only when one is named."""
    from tools import run_stack

    for name in ("QWEN_TTS_MODEL_DIR", "QWEN_TTS_MODELS", "QWEN_TTS_ALIGNER_DIR", "QWEN_TTS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    assert run_stack._values()["ALIGNER_DIR"] == str(tiny_aligner_dir)
    monkeypatch.setenv("QWEN_TTS_MODEL_DIR", str(tiny_model_dir))  # stands for real weights
    monkeypatch.setenv("QWEN_TTS_PROFILE", "gpu")  # whose default aligner path is not here
    assert run_stack._values()["ALIGNER_DIR"] == ""
    monkeypatch.setenv("QWEN_TTS_ALIGNER_DIR", str(tiny_aligner_dir))
    assert run_stack._values()["ALIGNER_DIR"] == str(tiny_aligner_dir)
