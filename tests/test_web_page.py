"""The web page at `/`, in a real headless Chromium (Debian's `chromium`, driven by Playwright): it speaks with
audio streaming into the player, stops, adds voices from a file and from the microphone, asks for a token
when auth is on, and logs no errors."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

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


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("chromium is not installed; `make setup` installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-background-networking", "--autoplay-policy=no-user-gesture-required",
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
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
        self.tab.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.tab.on("pageerror", lambda error: self.errors.append(str(error)))
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
    import httpx

    response = httpx.get(gateway.http + "/", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    for asset in ("app.js", "player.js", "worklets.js", "wav.js", "style.css"):
        assert httpx.get(f"{gateway.http}/static/{asset}", timeout=10).status_code == 200
