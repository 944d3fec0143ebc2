"""The web page at `/`, in a real headless Chromium (Debian's `chromium`, driven by Playwright): it speaks with
audio streaming into the player, stops, adds voices from a file and from the microphone, asks for a token
when auth is on, takes turns (a user talking over a reply interrupts it; word marks highlight the word playing),
and logs no errors."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from conftest import ROOT, synthetic_reference
from gateway_helpers import serve_gateway
from test_gateway import LONG

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The README's image (results/web_page.png) is refreshed on request only: WEB_PAGE_SCREENSHOT=results/web_page.png.
SCREENSHOT_ENV = "WEB_PAGE_SCREENSHOT"
TOKEN = "page-test-token"
WAIT_MS = 60_000  # for Playwright's own waits
# The fake microphone of the turn-taking tests: QUIET_S of silence (the page measures the room in its first 300 ms,
# and the reply starts), then TALK_S of someone talking; Chromium loops the file.
QUIET_S, TALK_S, MIC_RATE = 3.0, 4.0, 48000
# A reply still being generated when the microphone turns loud: FAST settings give 4 + 1 frame (80 ms) per character
# and sentence, so 160 s of audio, generated in about 25 s on a 2-core CPU (the tiny model never stops by itself),
# still going QUIET_S in on a machine several times faster. Under the page gateway's 2,000-character limit.
LONG_REPLY = " ".join([LONG] * 19)


@pytest.fixture(scope="module")
def playwright():
    if CHROMIUM is None:
        pytest.fail("chromium is not installed; `make setup` installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


def launch(playwright, *args: str):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--autoplay-policy=no-user-gesture-required",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", *args])


@pytest.fixture(scope="module")
def browser(playwright):
    """Chromium whose fake microphone is its own (a beep every second)."""
    browser = launch(playwright)
    yield browser
    browser.close()


def talking_clip(path: Path) -> Path:
    """QUIET_S of digital silence, then TALK_S of a voiced, syllable-like sound (harmonics of 140 Hz, loudness
    rising and falling four times a second, never below a third of its peak): far over the page's threshold."""
    t = np.arange(int(TALK_S * MIC_RATE)) / MIC_RATE
    phase = 2 * np.pi * np.cumsum(140 + 20 * np.sin(2 * np.pi * 2 * t)) / MIC_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.67 + 0.33 * np.sin(2 * np.pi * 4 * t))
    clip = np.concatenate([np.zeros(int(QUIET_S * MIC_RATE)), 0.3 * voiced / np.abs(voiced).max()])
    sf.write(path, clip.astype(np.float32), MIC_RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def talking_browser(playwright, tmp_path_factory):
    """Chromium whose fake microphone plays ``talking_clip`` (from its start each time it is opened, looped)."""
    clip = talking_clip(tmp_path_factory.mktemp("microphone") / "talking.wav")
    browser = launch(playwright, f"--use-file-for-fake-audio-capture={clip}")
    yield browser
    browser.close()


def copy_voices(voices_dir: Path, work: Path) -> Path:
    """A copy of the voices for one gateway (the page adds voices)."""
    return Path(shutil.copytree(voices_dir, work / "voices", ignore=shutil.ignore_patterns("*.tmp")))


@pytest.fixture(scope="module")
def gateway(triton, voices_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("page")
    yield from serve_gateway(triton.grpc_url, copy_voices(voices_dir, work), work, GATEWAY_MAX_TEXT_CHARS="2000")


class Page:
    """A browser tab on the page, collecting console errors and uncaught exceptions."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1100, "height": 900})
        self.tab = self.context.new_page()
        self.errors: list[str] = []
        self.sent: list[dict] = []  # the JSON messages the page sent on its WebSockets
        self.tab.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.tab.on("pageerror", lambda error: self.errors.append(str(error)))
        self.tab.on("websocket", lambda ws: ws.on("framesent", lambda payload: isinstance(payload, str) and
                                                  self.sent.append(json.loads(payload))))
        self.tab.goto(url)

    def stats(self) -> dict:
        return self.tab.evaluate("""() => ({...window.ttsPage, player: window.ttsPage.player &&
                                             window.ttsPage.player.stats})""")

    def wait_for(self, condition: str, timeout_s: float = 60.0) -> None:
        """Poll a JavaScript condition from outside the page (the page's CSP forbids evaluating strings in it)."""
        deadline = time.monotonic() + timeout_s
        while not self.tab.evaluate(f"() => Boolean({condition})"):
            assert time.monotonic() < deadline, f"still false after {timeout_s:g} s: {condition}"
            self.tab.wait_for_timeout(50)

    def connected(self) -> "Page":
        self.wait_for("document.getElementById('connection').dataset.state === 'connected' && "
                      "!document.getElementById('speak').disabled")
        return self

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, gateway):
    opened = Page(browser, gateway.http + "/").connected()
    yield opened
    opened.close()


@pytest.fixture
def talking_page(talking_browser, gateway):
    """The page in the browser whose microphone is quiet for QUIET_S, then loud."""
    opened = Page(talking_browser, gateway.http + "/").connected()
    yield opened
    opened.close()


def listen(page: Page) -> float:
    """Switch "Talk over it" on and wait until the page has measured the room; returns when the microphone opened."""
    page.tab.check("#talk-over")
    page.wait_for("window.ttsPage.turn.mic && window.ttsPage.turn.mic.listening", timeout_s=10)
    opened = time.monotonic()
    page.wait_for("window.ttsPage.turn.mic.calibrated", timeout_s=5)
    return opened


def screenshot_path(tmp_path: Path) -> Path:
    """Where the page's screenshot goes: the test's own directory, so that a test run changes no tracked file,
    unless WEB_PAGE_SCREENSHOT names a path (relative to the repository root)."""
    requested = os.environ.get(SCREENSHOT_ENV)
    return ROOT / requested if requested else tmp_path / "web_page.png"


def test_speak_streams_audio_into_the_player(page, tmp_path):
    """Typing text and clicking Speak: audio frames arrive, every sample is scheduled gaplessly in the worklet
    and played, time to first audio, real-time factor and the player's stalls are shown, the WAV download is
    ready, and the console stays clean."""
    page.tab.fill("#text", "Hello from the browser. This is the page speaking.")
    page.tab.click("#speak")
    page.wait_for("window.ttsPage.utterances === 1")
    # the text is all spoken, much of it not yet heard: Stop is still offered
    buffered, stop_enabled = page.tab.evaluate(
        "() => [window.ttsPage.player.stats.buffered, !document.getElementById('stop').disabled]")
    assert stop_enabled or buffered < 12000, buffered
    page.wait_for("window.ttsPage.player.stats.samplesPlayed >= window.ttsPage.samplesReceived")
    page.wait_for("document.getElementById('stop').disabled")
    stats = page.stats()
    assert stats["mode"] == "worklet" and stats["framesReceived"] > 1
    assert stats["player"]["samplesScheduled"] == stats["samplesReceived"] > 24000
    assert stats["completes"][0]["cancelled"] is False and not stats["errors"]
    assert page.tab.inner_text("#ttfa").endswith(" ms") and float(page.tab.inner_text("#rtf")) > 0
    stalls = page.tab.inner_text("#stalls")  # what the page's own player heard: "none", or "2 (130 ms)"
    assert stalls == ("none" if not stats["player"]["stalls"] else f"{stats['player']['stalls']} ("
                      f"{round(stats['player']['stalledSamples'] / 24000 * 1000)} ms)"), stalls
    assert page.tab.get_attribute("#download", "href").startswith("blob:")
    screenshot = screenshot_path(tmp_path)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.tab.screenshot(path=str(screenshot), full_page=True)
    assert not page.errors, page.errors


def test_speak_as_i_type_sends_words_as_they_are_typed_as_one_utterance(page):
    """With "Speak as I type" ticked, typed text goes out as appends of one continuous utterance (audio starts
    while typing goes on), and Ctrl+Enter ends it: one complete, every typed character counted."""
    typed = "Typing live, word after word, and the voice follows along."
    page.tab.select_option("#voice", "plain")
    page.tab.check("#live")
    page.tab.fill("#text", "")
    page.tab.type("#text", typed[:30], delay=40)
    page.wait_for("window.ttsPage.framesReceived > 0", timeout_s=30)  # speaking before the text is finished
    page.tab.type("#text", typed[30:], delay=20)
    page.tab.press("#text", "Control+Enter")
    page.wait_for("window.ttsPage.utterances === 1")
    stats = page.stats()
    assert stats["liveAppends"] > 10 and not stats["errors"], stats["errors"]
    assert stats["completes"][0]["charactersProcessed"] == len(typed)
    assert stats["completes"][0]["cancelled"] is False
    assert not page.errors, page.errors


def test_stop_ends_the_utterance_and_silences_the_player(page):
    """Stop during a long utterance: it ends cancelled, the player's queue is dropped, Speak is available
    again, and nothing is logged as an error."""
    page.tab.fill("#text", " ".join([LONG] * 4))
    page.tab.click("#speak")
    page.wait_for("window.ttsPage.framesReceived > 0")
    page.tab.click("#stop")
    page.wait_for("window.ttsPage.completes.length === 1")
    page.wait_for("window.ttsPage.player.stats.buffered === 0 && document.getElementById('stop').disabled")
    stats = page.stats()
    assert stats["completes"][0]["cancelled"] is True
    assert stats["player"]["samplesScheduled"] <= stats["samplesReceived"]
    assert page.tab.is_enabled("#speak")
    assert not page.errors, page.errors


def test_a_refused_speak_leaves_the_page_ready_to_speak_again(page):
    """Text over the server's limit is refused (INVALID_TEXT, no `complete`): the page shows why and Speak
    works again at once."""
    page.tab.fill("#text", "x" * 2100)
    page.tab.click("#speak")
    page.wait_for("window.ttsPage.errors.length === 1 && !document.getElementById('speak').disabled")
    assert page.stats()["errors"][0]["code"] == "INVALID_TEXT"
    assert "INVALID_TEXT" in page.tab.inner_text("#message")
    page.tab.fill("#text", "Short and fine.")
    page.tab.click("#speak")
    page.wait_for("window.ttsPage.utterances === 1")
    assert not page.errors, page.errors


def test_a_voice_uploaded_from_a_file_is_added_and_selected(page, tmp_path):
    """Choosing a clip, a name and a transcript adds the voice; the picker then selects it."""
    clip = tmp_path / "me.wav"
    sf.write(clip, synthetic_reference(4.0, seed=3), 24000)
    page.tab.fill("#voice-name", "Page voice")
    page.tab.fill("#voice-transcript", "A clip uploaded from the page.")
    page.tab.set_input_files("#voice-file", str(clip))
    page.tab.click("#upload")
    page.wait_for("document.getElementById('voice-message').dataset.kind === 'success'")
    selected = page.tab.eval_on_selector("#voice", "select => select.selectedOptions[0].textContent")
    assert selected == "Page voice" and not page.errors, page.errors


def test_a_voice_recorded_from_the_microphone_is_added(page):
    """Record (Chromium's fake microphone), stop after a few seconds, add: the voice is added."""
    page.tab.click("#record")
    page.wait_for("/recording… [4-9]/.test(document.getElementById('recorded').textContent)")
    page.tab.click("#record")
    assert page.tab.inner_text("#recorded").startswith("recorded ")
    page.tab.fill("#voice-name", "Microphone voice")
    page.tab.click("#upload")
    page.wait_for("['success', 'error'].includes(document.getElementById('voice-message').dataset.kind)")
    assert page.tab.get_attribute("#voice-message", "data-kind") == "success", page.tab.inner_text("#voice-message")
    assert not page.errors, page.errors


def test_with_auth_on_the_page_asks_for_a_token_then_speaks(browser, make_gateway, voices_dir, tmp_path):
    """With GATEWAY_AUTH_TOKENS set the page shows the token field; once a token is entered it connects and
    speaks."""
    gateway = make_gateway(voices=copy_voices(voices_dir, tmp_path), GATEWAY_AUTH_TOKENS=TOKEN)
    gateway.wait_ready()
    page = Page(browser, gateway.http + "/")
    try:
        page.tab.wait_for_selector("#auth:not([hidden])", timeout=WAIT_MS)
        page.tab.fill("#token", TOKEN)
        page.tab.click("#auth-form button")
        page.connected()
        page.tab.click("#speak")
        page.wait_for("window.ttsPage.utterances === 1")
        # what was logged before the token: the refused voices request (401) and nothing else
        assert all("401" in error for error in page.errors), page.errors
    finally:
        page.close()


def test_the_page_is_served_with_a_content_security_policy(gateway):
    """`/` is HTML with a CSP that keeps the page to its own origin; its scripts and styles are served."""
    response = httpx.get(gateway.http + "/", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    for asset in ("app.js", "player.js", "reply.js", "worklets.js", "wav.js", "style.css"):
        assert httpx.get(f"{gateway.http}/static/{asset}", timeout=10).status_code == 200


def test_word_marks_highlight_the_word_playing(page, gateway):
    """With an aligner, the words of the `marks` are highlighted one after another as playback passes their start,
    never before, each over its own span of the reply's text."""
    if not httpx.get(gateway.http + "/readyz", timeout=10).json()["wordTimestamps"]:
        pytest.skip("the test Triton serves no aligner yet: started.wordTimestamps is false and no marks come")
    text = "Hello there. This is the page speaking, one word after another, while it plays."
    page.tab.fill("#text", text)
    page.tab.click("#speak")
    seen = []  # while it plays: (the text in <mark>, the word the page last highlighted, the playback position)
    deadline = time.monotonic() + 60
    while True:
        mark, latest, position, playing = page.tab.evaluate("""() => [
            document.querySelector('#reply mark')?.textContent ?? null, window.ttsPage.turn.highlighted.at(-1) ?? null,
            window.ttsPage.player && window.ttsPage.player.positionMs(),
            window.ttsPage.utterances === 0 || window.ttsPage.player.stats.buffered > 0]""")
        if not playing:
            break
        seen.append((mark, latest, position))
        assert time.monotonic() < deadline, seen[-5:]
        page.tab.wait_for_timeout(30)
    stats = page.stats()
    assert stats["wordTimestamps"] is True and stats["marks"] > 0 and not stats["completes"][0]["cancelled"]
    highlighted = stats["turn"]["highlighted"]
    assert highlighted, "no word was highlighted"
    arrived = [(message["atMs"], word) for message in stats["turn"]["marks"] for word in message["words"]]
    key = lambda word: (word["text"], word["startMs"], word["charStart"])  # noqa: E731
    assert {key(word) for word in highlighted} <= {key(word) for _, word in arrived}, (highlighted, arrived)
    for mark, latest, position in seen:  # the word the marks put there, over its own span, once its start is played
        if mark is not None:
            assert mark == latest["text"] and text[latest["charStart"]:].startswith(mark), (mark, latest)
            assert latest["startMs"] <= position, (latest, position)
    starts = [word["startMs"] for word in highlighted]
    assert starts == sorted(starts), highlighted
    # Every word that came well before playback reached it and was the latest started for a while was highlighted
    # (the tiny model's random-weight aligner may place words anywhere, some even past the audio's end).
    played = max(position or 0 for _, _, position in seen)
    ordered = sorted(arrived, key=lambda pair: pair[1]["startMs"])  # stable, as the page sorts them
    for i, (at_ms, word) in enumerate(ordered):
        next_start = ordered[i + 1][1]["startMs"] if i + 1 < len(ordered) else float("inf")
        if word["startMs"] >= at_ms + 200 and next_start >= word["startMs"] + 200 and word["startMs"] + 200 <= played:
            assert key(word) in {key(w) for w in highlighted}, (word, highlighted, arrived)
    assert not page.errors, page.errors


def test_talking_over_a_reply_interrupts_it(talking_page, gateway):
    """With "Talk over it" on, the microphone turning loud while a long reply plays makes the page report what it
    played, interrupt its contract and silence its player, and the reply shows the heard words with the rest struck
    through (without an aligner: the milliseconds heard)."""
    page = talking_page
    page.tab.fill("#text", LONG_REPLY)
    listen(page)
    page.tab.click("#speak")
    page.wait_for("window.ttsPage.turn.interrupts === 1", timeout_s=QUIET_S + TALK_S + 10)
    page.wait_for("window.ttsPage.completes.length === 1", timeout_s=10)
    stats = page.stats()
    complete = stats["completes"][0]
    assert complete.get("interrupted") is True and complete["cancelled"] is True, complete
    assert stats["turn"]["interrupts"] == 1 and stats["turn"]["mic"]["speaking"] is True
    # the page said what it had played, then interrupted its own conversation; the server heard exactly that
    turns = [m for m in page.sent if m["type"] in ("played", "interrupt", "cancel")]
    interrupt = next(i for i, m in enumerate(turns) if m["type"] == "interrupt")
    assert turns[interrupt] == {"type": "interrupt", "contractId": stats["turn"]["contractId"]}, turns
    played = turns[interrupt - 1]
    assert played["type"] == "played" and played["requestId"] == complete["requestId"], turns
    assert played["ms"] <= complete["heardMs"] <= played["ms"] + 500, (played, complete)
    assert complete["heardMs"] < complete["audioLengthMs"]  # cut before the end of what was sent
    assert stats["turn"]["cut"] == {"requestId": complete["requestId"], "heardMs": complete["heardMs"],
                                    "heardText": complete["heardText"], "by": "server"}
    page.wait_for("window.ttsPage.player.stats.buffered === 0", timeout_s=2)  # silenced at once
    shown = page.tab.text_content("#reply")
    if complete["heardText"] is None:  # no aligner: what was heard is known in milliseconds only
        assert shown == f"{LONG_REPLY} heard {complete['heardMs']} ms", shown
        assert page.tab.locator("#reply s").count() == 0
    else:
        assert page.tab.text_content("#reply .heard") == complete["heardText"]
        assert complete["heardText"] + page.tab.text_content("#reply s.unheard") == LONG_REPLY
    assert not page.errors, page.errors


def test_with_talk_over_it_off_the_microphone_does_not_interrupt(talking_page):
    """Switched on then off before speaking, the page stops listening: the same microphone turning loud leaves the
    reply playing, with no interrupt sent and nothing struck through."""
    page = talking_page
    page.tab.fill("#text", LONG_REPLY)
    opened = listen(page)
    page.tab.uncheck("#talk-over")
    page.wait_for("window.ttsPage.turn.mic === null", timeout_s=5)
    page.tab.click("#speak")
    page.wait_for("window.ttsPage.player && window.ttsPage.player.stats.samplesPlayed > 0", timeout_s=30)
    # well into the loud part of the microphone had it stayed open (it interrupts within 100 ms of it)
    page.tab.wait_for_timeout(max(0.0, opened + QUIET_S + 1.5 - time.monotonic()) * 1000)
    stats = page.stats()
    assert stats["player"]["buffered"] > 0, stats["player"]  # still playing
    assert stats["turn"]["interrupts"] == 0 and not [m for m in page.sent if m["type"] == "interrupt"]
    assert not [c for c in stats["completes"] if c["cancelled"]], stats["completes"]
    assert page.tab.locator("#reply s").count() == 0 and "heard" not in page.tab.text_content("#reply")
    assert page.tab.text_content("#talk-state") == "off"
    assert not page.errors, page.errors


def test_talking_over_a_reply_generated_already_cuts_it_in_the_page(talking_page):
    """A reply the server has finished generating but that still plays is cut by the page itself when the user
    talks over it: interrupt sent, player silenced, and what it had played by its own clock and marks shown as
    heard."""
    page = talking_page
    text = " ".join([LONG] * 2)  # 17 s of audio, generated in a few seconds
    page.tab.fill("#text", text)
    page.tab.click("#speak")
    page.wait_for("window.ttsPage.utterances === 1", timeout_s=30)
    listen(page)  # the microphone turns loud QUIET_S from now: the reply still plays
    page.wait_for("window.ttsPage.turn.interrupts === 1", timeout_s=QUIET_S + 10)
    page.wait_for("window.ttsPage.player.stats.buffered === 0", timeout_s=2)
    stats = page.stats()
    complete, cut = stats["completes"][0], stats["turn"]["cut"]
    assert complete["cancelled"] is False and len(stats["completes"]) == 1  # the server had nothing left to stop
    assert {"type": "interrupt", "contractId": stats["turn"]["contractId"]} in page.sent
    assert cut["by"] == "page" and cut["requestId"] == complete["requestId"], cut
    assert 0 < cut["heardMs"] < complete["audioLengthMs"], (cut, complete)
    shown = page.tab.text_content("#reply")
    if not stats["wordTimestamps"]:
        assert cut["heardText"] is None and shown == f"{text} heard {cut['heardMs']} ms", shown
    else:  # the text up to the last word that had ended by then, as the server would say it
        ends = [w["charEnd"] for m in stats["turn"]["marks"] for w in m["words"] if w["endMs"] <= cut["heardMs"]]
        assert cut["heardText"] == text[:max(ends, default=0)], (cut, stats["turn"]["marks"])
        assert page.tab.text_content("#reply .heard") == cut["heardText"]
        assert cut["heardText"] + (page.tab.text_content("#reply s.unheard") or "") == text
    assert not page.errors, page.errors


# -- the family: a model, a speaker, an instruction, a designed voice ------------------------------------------

@pytest.fixture(scope="module")
def family_gateway(family_triton, voices_dir, tmp_path_factory):
    """A gateway in front of the three tiny models; the voices directory is the one their Base talker reads (a
    designed voice must speak there)."""
    yield from serve_gateway(family_triton.grpc_url, voices_dir, tmp_path_factory.mktemp("family-page"))


@pytest.fixture
def family_page(browser, family_gateway):
    opened = Page(browser, family_gateway.http + "/").connected()
    opened.wait_for("document.getElementById('model').options.length === 3")
    yield opened
    opened.close()


def _options(page: Page, select: str) -> list[str]:
    return page.tab.eval_on_selector(select, "s => [...s.options].map(o => o.value)")


def test_the_page_offers_each_model_with_its_voices_and_instruction(family_page):
    """Picking a model shows what it takes: cloned voices for Base, its speakers and an instruction for
    CustomVoice, a voice description (and no voice) for VoiceDesign."""
    page = family_page
    assert _options(page, "#model") == ["base", "custom", "design"]
    assert "default" in _options(page, "#voice") and page.tab.is_hidden("#instruct-row")
    page.tab.select_option("#model", "custom")
    assert _options(page, "#voice") == ["aria", "kai", "mei"] and page.tab.is_visible("#instruct-row")
    page.tab.select_option("#model", "design")
    assert page.tab.is_hidden("#voice") and page.tab.inner_text("#instruct-label") == "Voice description"
    assert page.tab.is_visible("#design") and not page.errors, page.errors


def test_the_page_speaks_with_a_named_speaker_and_an_instruction(family_page):
    """The session starts on the chosen model with its speaker and instruction, and the utterance plays."""
    page = family_page
    page.tab.select_option("#model", "custom")
    page.tab.select_option("#voice", "kai")
    page.tab.fill("#instruct", "Speak very happily.")
    page.tab.fill("#text", "A named speaker, happily.")
    page.tab.click("#speak")
    page.wait_for("window.ttsPage.completes.length === 1")
    start = [m for m in page.sent if m["type"] == "start"][-1]
    assert (start["model"], start["voice"], start["instruct"]) == ("custom", "kai", "Speak very happily.")
    assert page.stats()["samplesReceived"] > 0 and not page.errors, page.errors


def test_a_voice_designed_on_the_page_is_kept_and_speaks_on_the_base_model(family_page, family_gateway):
    """Designing from a description selects the new voice on the Base model, and it speaks there."""
    page = family_page
    page.tab.fill("#design-description", "A warm, low voice, calm and unhurried.")
    page.tab.fill("#design-name", "Page design")
    page.tab.click("#design-button")
    try:
        page.wait_for("document.getElementById('design-message').dataset.kind === 'success'", timeout_s=120)
        designed = page.stats()["designed"]
        assert page.tab.input_value("#model") == "base" and page.tab.input_value("#voice") == designed["id"]
        page.tab.fill("#text", "Kept, and spoken again.")
        page.tab.click("#speak")
        page.wait_for("window.ttsPage.completes.length === 1")
        start = [m for m in page.sent if m["type"] == "start"][-1]
        assert (start["model"], start["voice"]) == ("base", designed["id"])
        assert page.stats()["samplesReceived"] > 0 and not page.errors, page.errors
    finally:
        for voice in httpx.get(f"{family_gateway.http}/api/v1/voices", timeout=10).json()["voices"]:
            if voice["name"] == "Page design":
                httpx.delete(f"{family_gateway.http}/api/v1/voices/{voice['id']}", timeout=10)
