"""Talk mode of the web client (csm_jax/serving/static/) in headless Chromium: the fake microphone plays a real speech
file (`--use-file-for-fake-audio-capture`), the page streams it to a private server whose replies come from a
scripted OpenAI-compatible chat-completions server, and one press of Talk gives a whole turn: the user's speech is
detected, stored and transcribed, the reply text streams in and is spoken, its audio plays in the page.

Needs the `playwright` Python package and the system Chromium at /usr/bin/chromium (no `playwright install`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import soundfile as sf
import soxr
from chat_server import ChatServer, Piece
from serve_fixtures import LiveServer
from speech_data import TEXTS

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("CSM_JAX_CHROMIUM", "/usr/bin/chromium")
DATA = Path(__file__).parent / "data"
MIC_RATE = 48_000  # Chromium's fake capture resamples the file to the device rate; give it that rate
LEAD_S, TAIL_S = 0.5, 2.5  # silence around the speech in the microphone file
REPLY_PIECES = ["Nice to ", "hear you.", " Tell me", " more."]  # the scripted reply text, as streamed
REPLY = "".join(REPLY_PIECES)
REPLY_MAX_AUDIO_MS = 960  # per spoken sentence: the default model rarely stops by itself
TURN_TIMEOUT_MS = 600_000  # the default model on a couple of shared CPU cores
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")


def mic_file(path: Path, period_s: float | None = None) -> Path:
    """tests/data/speech_3s.wav at 48 kHz after LEAD_S of silence, then TAIL_S of silence, or silence up to
    `period_s` (for a microphone that loops); a 16-bit mono WAV."""
    speech, rate = sf.read(DATA / "speech_3s.wav", dtype="float32")
    speech = soxr.resample(speech, rate, MIC_RATE)
    total = int((period_s or LEAD_S + len(speech) / MIC_RATE + TAIL_S) * MIC_RATE)
    audio = np.zeros(total, np.float32)
    lead = int(LEAD_S * MIC_RATE)
    audio[lead:lead + len(speech)] = speech
    sf.write(path, audio, MIC_RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def playwright():
    with sync_api.sync_playwright() as p:
        yield p


def launch(playwright, mic: Path, loop: bool):
    # Without %noloop the file plays again and again; with it, once per microphone stream, then silence.
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic}{'' if loop else '%noloop'}",
        "--autoplay-policy=no-user-gesture-required"])


@pytest.fixture(scope="module")
def browser(playwright, tmp_path_factory: pytest.TempPathFactory):
    b = launch(playwright, mic_file(tmp_path_factory.mktemp("mic") / "once.wav"), loop=False)
    yield b
    b.close()


@contextlib.contextmanager
def open_page(browser, server: LiveServer):
    """A connected page of the web client; on leaving, checks it had no script errors and fetched nothing from
    elsewhere."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []
    requests: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and problems.append(f"console: {msg.text}"))
    page.on("request", lambda req: requests.append(req.url))
    page.on("websocket", lambda ws: requests.append(ws.url))
    try:
        page.goto(server.http_url)
        page.wait_for_function("window.csm !== undefined && document.body.dataset.loaded === 'true'")
        assert page.is_disabled("#talk")  # not connected yet
        page.click("#connect")
        page.wait_for_selector("#status[data-state=ready]")
        yield page
        assert problems == [], problems
        base = urlsplit(server.http_url).netloc
        assert [u for u in requests if not u.startswith("data:") and urlsplit(u).netloc != base] == []
    finally:
        context.close()


@pytest.fixture
def page(browser, talk_server: LiveServer):
    with open_page(browser, talk_server) as p:
        yield p


def csm(page, expr: str = ""):
    return page.evaluate(f"window.csm{expr}")


def wait(page, condition: str, timeout_ms: int = TIMEOUT_MS, what: str = "") -> None:
    """Wait for a JavaScript condition; on timeout, fail with what the page had received from the server."""
    try:
        page.wait_for_function(condition, timeout=timeout_ms, polling=250)
    except sync_api.TimeoutError:
        talk = csm(page, ".talk")
        events = [{k: v for k, v in e.items() if k not in ("turns", "limits", "defaults")} for e in csm(page, ".events")]
        pytest.fail(f"timed out waiting for {what or condition}\nstate: {talk['state']} ({talk['states']})\n"
                    f"errors: {csm(page, '.errors')}\nevents: {events}")


def refreshed_history(page) -> list[dict]:
    """Presses Refresh in the history panel; -> the history it then shows."""
    n = len([e for e in csm(page, ".events") if e["type"] == "history"])
    page.click("#refresh-history")
    page.wait_for_function("(n) => window.csm.events.filter(e => e.type === 'history').length > n", arg=n)
    return csm(page, ".history")


def test_talk_mode_turn_in_the_page(page, chat: ChatServer, talk_server: LiveServer) -> None:
    chat.script.append([Piece(text) for text in REPLY_PIECES])
    asked = len(chat.requests)  # the chat server is shared with other tests
    page.fill("#record-speaker", "1")  # the user's voice
    page.fill("#speaker", "0")  # the voice that answers
    page.fill("#max-audio-ms", str(REPLY_MAX_AUDIO_MS))
    page.fill("#seed", "3")
    assert page.text_content("#talk") == "Talk" and page.get_attribute("#talk", "aria-pressed") == "false"
    assert page.text_content("#talk-state") == "off"

    t0 = time.monotonic()
    page.click("#talk")  # no session yet: the page starts one first
    wait(page, "window.csm.talk.started !== null", what="talk.started")
    assert page.text_content("#talk") == "Stop talking" and page.get_attribute("#talk", "aria-pressed") == "true"
    assert page.is_disabled("#say") and page.is_disabled("#record")
    sent = csm(page, ".sent")
    types = [e["type"] for e in sent]
    assert types.index("session.start") < types.index("talk.start")
    start = sent[types.index("talk.start")]
    rate = csm(page, ".talk.sampleRate")
    assert start["speaker"] == 1 and start["reply_speaker"] == 0 and start["sample_rate"] == rate
    assert start["encoding"] == "pcm16" and start["max_audio_ms"] == REPLY_MAX_AUDIO_MS and start["seed"] == 3
    started = csm(page, ".talk.started")
    assert started["id"] == start["id"] and started["responder"] is True
    assert started["vad"]["end_silence_ms"] == 500  # the talk_server fixture's setting
    cid = csm(page, ".conversationId")
    assert cid

    # The user's turn: speech found in the microphone stream, stored and transcribed.
    wait(page, "window.csm.talk.turns.length > 0", TURN_TIMEOUT_MS, "the user's turn (turn.stored)")
    t_turn = time.monotonic() - t0
    turn = csm(page, ".talk.turns[0]")
    assert turn["source"] == "user" and turn["speaker"] == 1 and turn["frames"] > 0
    assert turn["transcribed"] is True and isinstance(turn["text"], str)
    user_item = page.wait_for_selector(f"#talk-transcript li[data-role=user][data-turn-id='{turn['turn_id']}']")
    assert (turn["text"] or "(no transcript)") in user_item.text_content()
    # The speech is 3.2 s of the file: the stored turn covers it (plus the server's margins), not the silence.
    assert 2.5 <= turn["frames"] * 0.08 <= 5.0, turn

    # The reply: its text streams in, it is spoken sentence by sentence, and the audio plays in the page.
    wait(page, "window.csm.talk.replies.length > 0 && window.csm.talk.replies[0].done", TURN_TIMEOUT_MS,
         "reply.done")
    wait(page, "(() => { const r = window.csm.talk.replies[0]; return r.framesPlayed > 0 && "
               "r.framesPlayed === r.framesReceived; })()", TURN_TIMEOUT_MS, "the reply's audio to play")
    t_reply = time.monotonic() - t0
    reply = csm(page, ".talk.replies[0]")
    assert reply["text"] == REPLY and reply["interrupted"] is False
    spoken = reply["responses"]
    assert [r["reply_id"] for r in spoken] == [reply["reply_id"]] * len(spoken) and len(spoken) == 2, spoken
    assert all(r["frames"] > 0 and r["stop_reason"] in ("eos", "max_length") for r in spoken), spoken
    frames = sum(r["frames"] for r in spoken)
    assert reply["framesReceived"] == reply["framesScheduled"] == reply["framesPlayed"] == frames
    reply_item = page.wait_for_selector("#talk-transcript li[data-role=reply][data-done=true]")
    assert REPLY in reply_item.text_content()
    # The user's words went to the chat model.
    assert len(chat.requests) == asked + 1
    if turn["text"].strip():
        assert chat.requests[-1]["messages"][-1] == {"role": "user", "content": turn["text"].strip()}

    # Event order, as the page received them.
    talk_events = csm(page, ".talk.events")
    kinds = [e["type"] for e in talk_events]
    for earlier, later in [("talk.started", "speech.started"), ("speech.started", "speech.stopped"),
                           ("speech.stopped", "turn.stored"), ("turn.stored", "reply.started"),
                           ("reply.started", "reply.delta"), ("reply.delta", "response.started"),
                           ("response.done", "reply.done")]:
        assert kinds.index(earlier) < kinds.index(later), (earlier, later, kinds)
    deltas = [e["text"] for e in talk_events if e["type"] == "reply.delta"]
    assert "".join(deltas) == REPLY
    assert [e for e in talk_events if e["type"] == "error"] == []
    states = csm(page, ".talk.states")
    for name in ("listening", "you are speaking", "thinking", "speaking"):
        assert name in states, states
    assert states.index("listening") < states.index("you are speaking") < states.index("thinking") \
        < states.index("speaking")

    # Stop: talk.stop -> talk.stopped, the microphone is closed, the other panels work again.
    page.wait_for_function("window.csm.talk.state === 'listening'")
    page.click("#talk")
    wait(page, "window.csm.talk.stopped !== null && !window.csm.talk.active", what="talk.stopped")
    stop = [e for e in csm(page, ".sent") if e["type"] == "talk.stop"]
    assert len(stop) == 1 and csm(page, ".talk.stopped.id") == stop[0]["id"]
    assert page.text_content("#talk") == "Talk" and page.text_content("#talk-state") == "off"
    assert not page.is_disabled("#say") and not page.is_disabled("#record")
    # The whole stream went to the server: the file and its silences (the capture lags a little at the start).
    assert csm(page, ".talk.sentSamples") >= rate * 3.2

    # History (the page's panel, fresh from the server): the user's turn, then one spoken turn per sentence.
    history = refreshed_history(page)
    assert [(t["source"], t["speaker"], t["text"]) for t in history] == [
        ("user", 1, turn["text"]), ("generated", 0, "Nice to hear you."), ("generated", 0, "Tell me more.")]
    assert [t["turn_id"] for t in history] == [turn["turn_id"]] + [r["turn_id"] for r in spoken]
    assert [t["frames"] for t in history[1:]] == [r["frames"] for r in spoken]
    for t in history:
        page.wait_for_selector(f"#history li[data-turn-id='{t['turn_id']}']")
    assert csm(page, ".conversationId") == cid
    assert csm(page, ".errors") == []
    words = set(TEXTS["speech_3s.wav"].lower().strip(".").split())
    print(f"\nweb talk: user turn stored {t_turn:.1f} s after Talk, reply played {t_reply:.1f} s after Talk; "
          f"mic {rate} Hz; transcript {turn['text']!r} ({len(words & set(turn['text'].lower().split()))} of "
          f"{len(words)} words); reply {frames} frames, rtf {[r['rtf'] for r in spoken]}")


def wait_python(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_barge_in_and_errors_keep_talk_mode_going(playwright, tmp_path: Path, chat: ChatServer,
                                                   talk_server: LiveServer) -> None:
    """The microphone says its sentence every `period_s` seconds. The first reply is cut off by the second time the
    user speaks (its first sentence is playing, its second sentence's text is held back by the chat server): the
    page stops the audio at once; the second reply fails (the chat server answers HTTP 500): the error is shown and
    talk mode goes on; the third user turn is answered again."""
    period_s = 10.0  # speech at 0.5-3.7 s of every period; the first reply plays from about 5-6 s for up to 8 s
    browser = launch(playwright, mic_file(tmp_path / "loop.wav", period_s), loop=True)
    held = threading.Event()  # the rest of the first reply: never needed, released at the end
    chat.status = 200
    chat.script.append([Piece("Nice to hear you. "), Piece("Tell me more.", gate=held)])
    asked = len(chat.requests)
    try:
        with open_page(browser, talk_server) as page:
            page.fill("#max-audio-ms", "8000")
            page.click("#talk")
            wait(page, "window.csm.talk.replies.length > 0 && window.csm.talk.replies[0].framesPlayed > 0",
                 TURN_TIMEOUT_MS, "the first reply to play")
            chat.status = 500  # the next reply fails
            wait(page, "window.csm.talk.replies.length > 0 && window.csm.talk.replies[0].done", TURN_TIMEOUT_MS,
                 "the first reply to be cut off")
            wait(page, "document.querySelector(\"#errors li[data-code='responder_error']\") !== null",
                 TURN_TIMEOUT_MS, "the second reply's error")
            chat.status = 200
            assert csm(page, ".talk.active") is True
            wait(page, "window.csm.talk.turns.length >= 3 && window.csm.talk.replies.length >= 3 && "
                       "window.csm.talk.replies[2].responses.length > 0", TURN_TIMEOUT_MS, "the third reply")
            page.click("#talk")
            wait(page, "!window.csm.talk.active && window.csm.talk.stopped !== null", what="talk.stopped")
            talk = csm(page, ".talk")
            errors = csm(page, ".errors")
            history = refreshed_history(page)
    finally:
        held.set()
        browser.close()

    # Barge-in: the server cut the reply off and stored what it had sent; the page had already stopped playing it.
    first = talk["replies"][0]
    assert first["text"] == "Nice to hear you. " and first["interrupted"] is True, first
    assert len(first["responses"]) == 1 and first["responses"][0]["turn_id"] is not None, first["responses"]
    cut = [b for b in talk["bargeIns"] if first["reply_id"] in b["replies"]]
    assert cut and cut[0]["stoppedFrames"] > 0, talk["bargeIns"]
    assert first["framesPlayed"] < first["framesReceived"], first
    assert page_state_order(talk["states"], "speaking", "you are speaking")
    # The failed reply: an error shown in the error panel, a reply.done without text, and talk mode went on.
    second = talk["replies"][1]
    assert second["done"] and second["text"] == "" and second["responses"] == [], second
    assert [e["code"] for e in errors] == ["responder_error"], errors
    assert [e["code"] for e in talk["events"] if e["type"] == "error"] == ["responder_error"]
    third = talk["replies"][2]
    assert third["text"] == "Okay." and third["responses"][0]["frames"] > 0, third
    assert len(chat.requests) - asked >= 3
    # Stored: each user turn and what was spoken of the replies, in order (later turns may follow).
    spoken = [r["turn_id"] for reply in talk["replies"][:3] for r in reply["responses"] if r["turn_id"] is not None]
    expected = sorted([t["turn_id"] for t in talk["turns"][:3]] + spoken)
    ids = [t["turn_id"] for t in history]
    assert ids[:len(expected)] == expected, (ids, expected)
    by_id = {t["turn_id"]: t for t in history}
    for reply in talk["replies"][:3]:
        for r in reply["responses"]:
            if r["turn_id"] is not None:
                assert by_id[r["turn_id"]]["frames"] == r["frames"] and by_id[r["turn_id"]]["source"] == "generated"
    print(f"\nweb talk barge-in: first reply {first['framesReceived']} frames received, {first['framesPlayed']} "
          f"played, {cut[0]['stoppedFrames']} stopped in the page; states {talk['states']}")


def page_state_order(states: list[str], before: str, after: str) -> bool:
    """Whether `after` was shown at some point after `before`."""
    return before in states and after in states[states.index(before) + 1:]
