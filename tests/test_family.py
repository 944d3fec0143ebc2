"""The Qwen3-TTS family through the engine: a CustomVoice checkpoint's named speakers and instructions and a
VoiceDesign checkpoint's described voices give exactly qwen-tts's codes (greedy and seeded), for whole and
still-arriving text, and rows of one batch never see each other's speaker, instruction or voice; what a checkpoint
cannot follow is refused, never dropped."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from reference import qwen_kwargs, reference_custom_voice, reference_generation, reference_voice_design
from tts_contract.errors import EngineCode
from tts_contract.models import BASE, CUSTOM_VOICE, VOICE_DESIGN, ServedModel, Speaker, conditioning_error
from tts_engine.errors import Unfollowable
from tts_engine.generation.prompt import SynthesisRequest
from tts_engine.generation.sampling import SamplingParams
from tts_engine.generation.talker import BatchedTalker
from tts_engine.generation.text_feed import TextFeed
from tts_engine.serving.engine import Engine
from tts_engine.voices.conditioning import Conditioning

TEXT = "The quick brown fox jumps over the lazy dog."
GREEDY = dict(greedy=True, max_new_tokens=30)
SEEDED = dict(seed=1234, max_new_tokens=30)


def _engine(loaded, rows: int = 8) -> Engine:
    return Engine(BatchedTalker(loaded.tts, rows=rows, max_tokens=1024), name="family-test")


@pytest.fixture(scope="module")
def custom_engine(custom_voice):
    engine = _engine(custom_voice)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def design_engine(voice_design):
    engine = _engine(voice_design)
    yield engine
    engine.stop()


def _write_word_by_word(feed: TextFeed, text: str) -> None:
    """Append ``text`` a word at a time with pauses (the talker waits for each), then close it."""
    for index, word in enumerate(text.split(" ")):
        feed.append((" " if index else "").encode() + word.encode())
        time.sleep(0.05)
    feed.close()


def _speak(engine, text=TEXT, language="English", prompt=None, **fields) -> torch.Tensor:
    params = {k: fields.pop(k) for k in list(fields) if k not in ("speaker", "instruct", "non_streaming_mode")}
    return engine.generate(SynthesisRequest(text, prompt, language, SamplingParams(**params), **fields)).codes


# -- what each checkpoint is ------------------------------------------------------------------------------

def test_each_tiny_preset_describes_its_kind(loaded, custom_voice, voice_design):
    """The tiny presets load as their kinds: Base clones, CustomVoice names its speakers, VoiceDesign has none."""
    assert (loaded.kind, loaded.size, loaded.speakers()) == (BASE, "0.6B", ())
    assert (custom_voice.kind, custom_voice.size) == (CUSTOM_VOICE, "1.7B")
    assert custom_voice.speakers() == (Speaker("aria"), Speaker("kai"), Speaker("mei", "sichuan_dialect"))
    assert (voice_design.kind, voice_design.speakers()) == (VOICE_DESIGN, ())
    assert custom_voice.describe().name == "qwen3-tts-1.7b-custom-voice"


# -- CustomVoice: named speakers and instructions equal qwen-tts -------------------------------------------

CUSTOM_CASES = {
    "speaker": dict(speaker="kai"),
    "speaker and instruction": dict(speaker="aria", instruct="Speak very happily, a little fast."),
    "dialect speaker in Chinese": dict(speaker="mei", language="Chinese"),
}


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("case", list(CUSTOM_CASES))
def test_custom_voice_codes_equal_generate_custom_voice(custom_voice, custom_engine, case, params):
    """A named speaker, with or without an instruction (and a dialect speaker's Chinese), gives qwen-tts's codes."""
    fields = dict(CUSTOM_CASES[case])
    language = fields.pop("language", "English")
    expected, _ = reference_custom_voice(custom_voice.tts, TEXT, language=language, seed=params.get("seed"),
                                         **fields, **qwen_kwargs(params))
    got = _speak(custom_engine, language=language, **fields, **params)
    assert len(got) == 29 and torch.equal(got, expected)


def test_each_speaker_and_instruction_changes_the_codes(custom_engine):
    """Speakers and instructions matter to the tiny model, or the parity checks above would prove nothing."""
    runs = [_speak(custom_engine, speaker="aria", **GREEDY), _speak(custom_engine, speaker="kai", **GREEDY),
            _speak(custom_engine, speaker="aria", instruct="Whisper.", **GREEDY)]
    assert not torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_fed_text_on_a_named_speaker_equals_the_streaming_text_mode(custom_voice, custom_engine):
    """Text still being written is read as it comes: its codes equal qwen-tts's with non_streaming_mode=False."""
    expected, _ = reference_custom_voice(custom_voice.tts, TEXT, speaker="kai", instruct="Calm.",
                                         non_streaming_mode=False, **qwen_kwargs(GREEDY))
    feed = TextFeed.for_tokenizer(custom_voice.tts.processor.tokenizer)
    request = SynthesisRequest("", None, "English", SamplingParams(**GREEDY), feed=feed, speaker="kai",
                               instruct="Calm.")
    writer = threading.Thread(target=_write_word_by_word, args=(feed, TEXT))
    writer.start()
    got = custom_engine.generate(request, timeout=120)
    writer.join(10)
    assert torch.equal(got.codes, expected)


# -- VoiceDesign: described voices equal qwen-tts ---------------------------------------------------------

@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("instruct", ["A deep, calm male voice with a slight rasp.", ""], ids=["described", "empty"])
def test_voice_design_codes_equal_generate_voice_design(voice_design, design_engine, instruct, params):
    """A voice described in words (or not at all) gives qwen-tts's codes."""
    expected, _ = reference_voice_design(voice_design.tts, TEXT, instruct, seed=params.get("seed"),
                                         **qwen_kwargs(params))
    got = _speak(design_engine, instruct=instruct or None, **params)
    assert len(got) == 29 and torch.equal(got, expected)


# -- rows are isolated ------------------------------------------------------------------------------------

MIXED = [dict(speaker="aria"), dict(speaker="kai", instruct="Very happy."), dict(speaker="mei"),
         dict(speaker="kai", instruct="Sad and slow."), dict(speaker="aria", instruct="Very happy.")]


def test_a_mixed_batch_gives_each_row_its_own_speaker_and_instruction(custom_voice):
    """Five requests with different speakers and instructions stepped in one batch each equal their own
    qwen-tts reference; the references differ pairwise, so a row that saw another's conditioning would fail."""
    expected = [reference_custom_voice(custom_voice.tts, TEXT, seed=100 + i, **fields,
                                       **qwen_kwargs(dict(seed=100 + i, max_new_tokens=24)))[0]
                for i, fields in enumerate(MIXED)]
    assert all(not torch.equal(a, b) for i, a in enumerate(expected) for b in expected[i + 1:])
    engine = _engine(custom_voice, rows=len(MIXED))
    try:
        results = [None] * len(MIXED)
        steps, rows = engine.stats.steps, engine.stats.step_rows

        def run(i):
            results[i] = _speak(engine, seed=100 + i, max_new_tokens=24, **MIXED[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(MIXED))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert engine.stats.step_rows - rows > 2 * (engine.stats.steps - steps), "the rows must have stepped together"
    finally:
        engine.stop()
    for i, (got, want) in enumerate(zip(results, expected)):
        assert got is not None and torch.equal(got, want), f"row {i} ({MIXED[i]})"


def test_a_base_checkpoint_keeps_cloning_beside_its_neighbours(loaded, engine, xvector_prompt, icl_prompt):
    """An x-vector and an ICL voice stepped together still give generate_voice_clone's codes."""
    expected = [reference_generation(loaded.tts, p, TEXT, do_sample=False, subtalker_dosample=False,
                                     max_new_tokens=30)[0] for p in (xvector_prompt, icl_prompt)]
    results = [None, None]
    threads = [threading.Thread(target=lambda i=i, p=p: results.__setitem__(i, _speak(engine, prompt=p, **GREEDY)))
               for i, p in enumerate((xvector_prompt, icl_prompt))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(torch.equal(g, e) for g, e in zip(results, expected))


# -- what a checkpoint cannot follow is refused -----------------------------------------------------------

BASE_06 = ServedModel("base", BASE, "0.6B")
CUSTOM_06 = ServedModel("custom-small", CUSTOM_VOICE, "0.6B", speakers=(Speaker("aria"),))
CUSTOM_17 = ServedModel("custom", CUSTOM_VOICE, "1.7B", speakers=(Speaker("aria"), Speaker("kai")))
DESIGN_17 = ServedModel("design", VOICE_DESIGN, "1.7B")


@pytest.mark.parametrize("model, voice, instruct, code, words", [
    (BASE_06, None, "Very happy.", EngineCode.INVALID_CONFIG, "Base model"),
    (CUSTOM_06, "aria", "Very happy.", EngineCode.INVALID_CONFIG, "does not follow instructions"),
    (CUSTOM_17, "bob", None, EngineCode.VOICE_NOT_FOUND, "its speakers: aria, kai"),
    (DESIGN_17, "aria", "A calm voice.", EngineCode.INVALID_CONFIG, "takes no voice"),
    (CUSTOM_17, "aria", "x" * 1001, EngineCode.INVALID_CONFIG, "the limit is 1000"),
], ids=["instruct on base", "instruct on 0.6B custom voice", "unknown speaker", "voice on voice design",
        "instruct too long"])
def test_what_a_checkpoint_cannot_follow_is_refused(model, voice, instruct, code, words):
    """Each rule refuses with its code and says why."""
    refusal = conditioning_error(model, voice, instruct)
    assert refusal is not None and refusal.code == code and words in refusal.message


@pytest.mark.parametrize("model, voice, instruct", [
    (BASE_06, "default", "  "), (CUSTOM_17, "KAI", "Very happy."), (CUSTOM_06, "aria", None),
    (DESIGN_17, None, ""), (DESIGN_17, "", "A calm voice."),
], ids=["blank instruct on base", "speaker in any case", "0.6B custom voice without instruct",
        "voice design undescribed", "voice design described"])
def test_what_a_checkpoint_can_follow_passes(model, voice, instruct):
    """Blank instructions are none, speaker names are case-insensitive."""
    assert conditioning_error(model, voice, instruct) is None


def test_conditioning_resolves_speakers_and_refuses_before_the_engine(custom_voice):
    """The talker's resolver gives the speaker's own spelling, the default speaker when none is named (the
    deployment's default when it is a speaker, else the first), and raises the contract's refusal."""
    conditioning = Conditioning(custom_voice.describe(default_voice="Kai"))
    assert conditioning.resolve("KAI", "Happy.").speaker == "kai"
    assert conditioning.resolve(None, None).speaker == "kai"
    assert Conditioning(custom_voice.describe(default_voice="default")).resolve(None, None).speaker == "aria"
    with pytest.raises(Unfollowable) as refused:
        conditioning.resolve("bob", None)
    assert refused.value.code == EngineCode.VOICE_NOT_FOUND
