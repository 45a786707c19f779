"""The web client (csm_jax/serving/static/) in headless Chromium against the real server: connect, say, cancel, record a
user turn with the fake microphone, history, errors, resume.

Needs the `playwright` Python package and the system Chromium at /usr/bin/chromium (no `playwright install`).
`live_server` comes from tests/serve_fixtures.py (a plugin loaded by conftest.py).
"""

from __future__ import annotations

import math
import os
from urllib.parse import urlsplit

import pytest

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("CSM_JAX_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]
FRAME_SAMPLES = 1920
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Client:
    """One page of the web client, connected, recording page errors and every request it makes."""

    def __init__(self, browser, server):
        self.server = server
        self.context = browser.new_context()
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        self.page.on("console", lambda msg: msg.type == "error" and self.console_errors.append(msg.text))
        self.page.on("request", lambda req: self.requests.append(req.url))
        self.page.on("websocket", lambda ws: self.requests.append(ws.url))

    def open(self):
        self.page.goto(self.server.http_url)
        self.page.wait_for_function("window.csm !== undefined && document.body.dataset.loaded === 'true'")
        self.page.click("#connect")
        self.page.wait_for_selector("#status[data-state=ready]")
        return self

    def csm(self, expr: str = ""):
        return self.page.evaluate(f"window.csm{expr}")

    def new_conversation(self) -> str:
        before = self.csm(".conversationId")
        self.page.click("#new-conversation")
        self.page.wait_for_function("(before) => window.csm.conversationId && window.csm.conversationId !== before",
                                    arg=before)
        cid = self.csm(".conversationId")
        assert self.page.text_content("#conversation-id") == cid
        return cid

    def say(self, text: str, *, speaker: int = 0, max_audio_ms: int = 480, seed: int | None = 0, top_k: int = 50,
            temperature: float = 0.9) -> dict:
        self.page.fill("#speaker", str(speaker))
        self.page.fill("#text", text)
        self.page.fill("#max-audio-ms", str(max_audio_ms))
        self.page.fill("#top-k", str(top_k))
        self.page.fill("#temperature", str(temperature))
        self.page.fill("#seed", "" if seed is None else str(seed))
        self.page.click("#say")
        self.page.wait_for_function("window.csm.lastDone !== null")
        return self.csm(".lastDone")

    def wait_history_turn(self, turn_id: int):
        return self.page.wait_for_selector(f"#history li[data-turn-id='{turn_id}']")

    def check_clean(self):
        assert self.page_errors == [], self.page_errors
        assert self.console_errors == [], self.console_errors
        base = urlsplit(self.server.http_url).netloc
        foreign = [u for u in self.requests if not u.startswith("data:") and urlsplit(u).netloc != base]
        assert foreign == [], f"the page fetched from elsewhere: {foreign}"

    def close(self):
        self.context.close()


@pytest.fixture
def client(browser, live_server):
    c = Client(browser, live_server).open()
    yield c
    try:
        c.check_clean()
    finally:
        c.close()


def test_page_loads_and_connects(client):
    page = client.page
    ready = client.csm(".ready")
    assert ready["type"] == "ready" and ready["protocol"] == 1
    assert ready["sample_rate"] == 24000 and ready["frame_samples"] == FRAME_SAMPLES
    assert client.csm(".connected") is True
    assert page.text_content("#status")
    # The assets came from the server: the stylesheet applies, the module ran.
    assert page.evaluate("getComputedStyle(document.querySelector('section')).borderRadius") == "8px"
    # The limits from `ready` are shown.
    for key, value in ready["limits"].items():
        assert page.text_content(f"#limits dd[data-key='{key}']") == str(value)
    # The socket goes to /ws on the page's own host.
    assert client.csm(".events[0].type") == "ready"
    assert f"{urlsplit(client.server.http_url).netloc}/ws" in page.text_content("#server-url")
    # Controls are labelled.
    for control in ["speaker", "text", "temperature", "top-k", "max-audio-ms", "seed", "voice", "record-speaker",
                    "transcript", "encoding", "resume-id"]:
        assert page.locator(f"label[for='{control}']").count() == 1, control
    # A new conversation shows its id and an empty history.
    cid = client.new_conversation()
    assert len(cid) > 0
    page.wait_for_function("window.csm.events.some(e => e.type === 'history')")
    assert client.csm(".history") == []
    assert not page.is_disabled("#say") and page.is_disabled("#cancel")


def test_say_streams_frames_and_lists_turn(client):
    page = client.page
    client.new_conversation()
    done = client.say("Hello there.", speaker=0, max_audio_ms=480, seed=1)
    sent = [e for e in client.csm(".sent") if e["type"] == "say"][-1]
    assert sent["text"] == "Hello there." and sent["speaker"] == 0 and sent["max_audio_ms"] == 480
    assert sent["seed"] == 1 and sent["top_k"] == 50 and sent["temperature"] == 0.9
    assert "voice" not in sent  # the server's default preset (the random model has none)
    options = page.eval_on_selector_all("#voice option", "os => os.map(o => [o.value, o.textContent])")
    assert options == [["", "server default (none)"], ["none", "none"]], options
    assert done["stop_reason"] in ("eos", "max_length")
    assert 0 < done["frames"] <= 6
    assert client.csm(".framesReceived") == done["frames"]
    assert client.csm(".samplesReceived") == FRAME_SAMPLES * done["frames"]
    assert client.csm(".framesScheduled") == done["frames"]  # every frame went to WebAudio
    playback = client.csm(".playback()")
    assert playback["state"] == "running" and playback["nextTime"] > 0
    assert done["turn_id"] is not None
    started = client.csm(".lastStarted")
    assert started["response_id"] == done["response_id"] and started["id"] == sent["id"] == done["id"]
    # Stats panel.
    assert page.text_content("#stats dd[data-key='frames']") == str(done["frames"])
    assert page.text_content("#stats dd[data-key='stop_reason']") == done["stop_reason"]
    for key in ("ttfa_ms", "rtf"):
        assert page.text_content(f"#stats dd[data-key='{key}']") not in ("", "-")
    # History lists the turn.
    item = client.wait_history_turn(done["turn_id"])
    assert "Hello there." in item.text_content()
    assert item.get_attribute("data-source") == "generated"
    history = client.csm(".history")
    assert [t["turn_id"] for t in history] == [done["turn_id"]]
    assert history[0]["frames"] == done["frames"] and history[0]["speaker"] == 0
    assert not page.is_disabled("#say") and page.is_disabled("#cancel")
    # "none" asks for no voice preset
    page.select_option("#voice", "none")
    page.click("#say")
    page.wait_for_function("window.csm.sent.filter(e => e.type === 'say').length === 2 && "
                           "window.csm.lastDone !== null && "
                           "window.csm.lastDone.id === window.csm.sent.filter(e => e.type === 'say')[1].id")
    assert [e for e in client.csm(".sent") if e["type"] == "say"][-1]["voice"] is None
    page.select_option("#voice", "")


def test_cancel_stops_the_response(client):
    page = client.page
    client.new_conversation()
    max_ms = min(client.csm(".ready.limits.max_audio_ms"), 8000)
    page.fill("#text", "A longer sentence that we are going to interrupt.")
    page.fill("#max-audio-ms", str(max_ms))
    page.click("#say")
    page.wait_for_function("window.csm.framesReceived > 0 || window.csm.lastDone !== null")
    if client.csm(".lastDone") is None:
        page.click("#cancel")
    page.wait_for_function("window.csm.lastDone !== null")
    done = client.csm(".lastDone")
    assert client.csm(".framesReceived") == done["frames"]
    if done["stop_reason"] == "cancelled":
        assert done["turn_id"] is None
        assert any(e["type"] == "cancel" for e in client.csm(".sent"))
        page.click("#refresh-history")
        page.wait_for_function("window.csm.events.filter(e => e.type === 'history').length >= 2")
        assert client.csm(".history") == []
    else:  # the response finished before the cancel could be sent
        assert done["stop_reason"] in ("max_length", "eos") and done["turn_id"] is not None
    # The page keeps working.
    done = client.say("After the cancel.", max_audio_ms=240)
    assert done["frames"] > 0 and client.csm(".framesReceived") == done["frames"]


@pytest.mark.parametrize("encoding", ["pcm16", "float32"])
def test_record_user_turn(client, encoding):
    page = client.page
    client.new_conversation()
    page.fill("#record-speaker", "1")
    page.select_option("#encoding", encoding)
    page.fill("#transcript", f"testing the microphone in {encoding}")
    page.click("#record")
    page.wait_for_function("window.csm.recordSampleRate !== null && "
                           "window.csm.recordedSamples >= window.csm.recordSampleRate * 1.0")
    page.click("#record")
    page.wait_for_function("window.csm.lastStored !== null")
    stored = client.csm(".lastStored")
    rate = client.csm(".recordSampleRate")
    seconds = client.csm(".recordedSamples") / rate
    assert 1.0 <= seconds < 5.0
    start = [e for e in client.csm(".sent") if e["type"] == "audio.start"][-1]
    assert start["sample_rate"] == rate and start["encoding"] == encoding and start["speaker"] == 1
    assert any(e["type"] == "audio.started" for e in client.csm(".events"))
    assert stored["frames"] > 0
    assert abs(stored["frames"] - seconds * 24000 / FRAME_SAMPLES) <= 2
    turn = stored["turn"]
    assert turn["source"] == "user" and turn["speaker"] == 1
    assert turn["text"] == f"testing the microphone in {encoding}"
    assert "Stored" in page.text_content("#record-status")
    item = client.wait_history_turn(turn["turn_id"])
    assert item.get_attribute("data-source") == "user"
    assert f"testing the microphone in {encoding}" in item.text_content()
    assert page.text_content("#record") == "Record" and not page.is_disabled("#say")


def test_errors_are_shown_and_the_page_keeps_working(client):
    page = client.page
    client.new_conversation()
    max_chars = client.csm(".ready.limits.max_text_chars")
    page.fill("#text", "x" * (max_chars + 1))
    assert "over" in page.get_attribute("#text-count", "class")
    page.click("#say")
    item = page.wait_for_selector("#errors li[data-code='text_too_long']")
    assert "text_too_long" in item.text_content()
    error = [e for e in client.csm(".events") if e["type"] == "error"][-1]
    say_id = [e for e in client.csm(".sent") if e["type"] == "say"][-1]["id"]
    assert error["code"] == "text_too_long" and error["id"] == say_id and error["message"]
    assert client.csm(".lastDone") is None and client.csm(".framesReceived") == 0
    # Resuming an unknown conversation is an error too; the current session stays.
    cid = client.csm(".conversationId")
    page.fill("#resume-id", "no-such-conversation")
    page.click("#resume")
    page.wait_for_selector("#errors li[data-code='unknown_conversation']")
    assert page.text_content("#conversation-id") == cid
    # Still works.
    assert not page.is_disabled("#say")
    done = client.say("Short enough.", max_audio_ms=240)
    assert done["frames"] > 0 and client.csm(".framesReceived") == done["frames"]
    client.wait_history_turn(done["turn_id"])
    # The expected errors came from the server, nothing else went wrong.
    codes = [e["code"] for e in client.csm(".events") if e["type"] == "error"]
    assert codes == ["text_too_long", "unknown_conversation"]


def test_resume_conversation_in_a_new_page(browser, client, live_server):
    client.new_conversation()
    done = client.say("Remember me.", max_audio_ms=240)
    cid = client.csm(".conversationId")
    other = Client(browser, live_server).open()
    try:
        other.page.fill("#resume-id", cid)
        other.page.click("#resume")
        other.page.wait_for_function("(cid) => window.csm.conversationId === cid", arg=cid)
        assert "resumed" in other.page.text_content("#session-info")
        item = other.wait_history_turn(done["turn_id"])
        assert "Remember me." in item.text_content()
        started = [e for e in other.csm(".events") if e["type"] == "session.started"][-1]
        assert started["resumed"] is True and started["turns"] == 1
        other.check_clean()
    finally:
        other.close()
