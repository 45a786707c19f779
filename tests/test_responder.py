"""Responder against a local OpenAI-compatible chat-completions server (aiohttp, real SSE chunk format), and the
sentence splitter. Each test runs its own server on 127.0.0.1 (an OS-chosen port) in the test's event loop."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from csm_jax.dialogue.responder import (
    Responder,
    ResponderConfig,
    ResponderError,
    build_responder,
    sentences,
)

KEY_ENV = "CSM_JAX_TEST_RESPONDER_KEY"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def chunk(content: str | None = None, *, role: str | None = None, finish: str | None = None) -> dict:
    delta = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1700000000, "model": "test-model",
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


class FakeLLM:
    """POST /v1/chat/completions runs `script(fake, request) -> response`; requests are recorded."""

    def __init__(self, script: Callable[[FakeLLM, web.Request], Awaitable[web.StreamResponse]]):
        self.script = script
        self.requests: list[dict] = []
        self.go = asyncio.Event()  # scripts wait on it to hold back the rest of a reply
        self.release = asyncio.Event()  # set at shutdown: every waiting script ends
        self.disconnected = asyncio.Event()
        self.sent: list[str] = []  # contents sent so far
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({"headers": dict(request.headers), "body": await request.json()})
        try:
            return await self.script(self, request)
        except ConnectionError:  # the client went away (a timeout, a closed reply)
            self.disconnected.set()
            raise web.HTTPGone() from None

    async def open_sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    async def send(self, resp: web.StreamResponse, data: dict | str) -> None:
        line = data if isinstance(data, str) else json.dumps(data)
        await resp.write(f"data: {line}\n\n".encode())
        if isinstance(data, dict) and data.get("choices"):
            content = data["choices"][0].get("delta", {}).get("content")
            if content:
                self.sent.append(content)

    async def hold(self, event: asyncio.Event, seconds: float = 10.0) -> None:
        """Wait for `event` (or shutdown, or `seconds`)."""
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.release.wait())]
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()


@contextlib.asynccontextmanager
async def serve(script) -> AsyncIterator[FakeLLM]:
    fake = FakeLLM(script)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        yield fake
    finally:
        fake.release.set()
        await runner.cleanup()


def make(url: str, **kw) -> Responder:
    kw.setdefault("api_key_env", KEY_ENV)
    return Responder(ResponderConfig(backend="openai", base_url=url, model="test-model", **kw))


async def collect(agen: AsyncIterator[str]) -> list[str]:
    return [x async for x in agen]


async def expect_error(responder: Responder, code: str, history=(("user", "Hi"),)) -> tuple[ResponderError, list]:
    got: list[str] = []
    with pytest.raises(ResponderError) as info:
        async for delta in responder.reply(list(history)):
            got.append(delta)
    err = info.value
    assert err.code == code, (err.code, str(err))
    text = str(err)
    assert "\n" not in text and "Traceback" not in text and " at 0x" not in text and len(text) < 400, text
    await responder.aclose()
    return err, got


# --- scripted answers ----------------------------------------------------------------------------------------------


async def incremental(fake: FakeLLM, request: web.Request):
    resp = await fake.open_sse(request)
    await fake.send(resp, chunk("", role="assistant"))
    for piece in ["Hello", " there", ".", " How"]:
        await fake.send(resp, chunk(piece))
        await asyncio.sleep(0.02)
    await fake.hold(fake.go)  # the rest only once the test has the first sentence
    for piece in [" are you", "? I am", " fine"]:
        await fake.send(resp, chunk(piece))
        await asyncio.sleep(0.02)
    await fake.send(resp, chunk(finish="stop"))
    await fake.send(resp, {"id": "chatcmpl-test", "object": "chat.completion.chunk", "choices": [],
                           "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}})
    await fake.send(resp, "[DONE]")
    return resp


def test_reply_streams_sentences_as_they_complete(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-123")

    async def main():
        async with serve(incremental) as fake:
            responder = make(fake.url, system_prompt="Be brief.", max_tokens=50, temperature=0.5)
            history = [("user", "Hi!"), ("assistant", "Hello! What's up?"), ("user", "  "), ("user", "How are you?")]
            out = []
            async for sentence in sentences(responder.reply(history)):
                if not out:  # the first sentence is out before the server has sent the rest of the reply
                    assert sentence == "Hello there." and "".join(fake.sent) == "Hello there. How"
                    fake.go.set()
                out.append(sentence)
            await responder.aclose()
            return fake, out

    fake, out = run(main())
    assert out == ["Hello there.", "How are you?", "I am fine"]
    [req] = fake.requests
    assert req["headers"]["Authorization"] == "Bearer sk-test-123"
    body = req["body"]
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! What's up?"},
        {"role": "user", "content": "How are you?"},
    ]
    assert body["stream"] is True and body["model"] == "test-model"
    assert body["max_tokens"] == 50 and body["temperature"] == 0.5


def test_reply_yields_deltas_as_they_arrive(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)

    async def main():
        async with serve(incremental) as fake:
            responder = make(fake.url)
            deltas = []
            async for delta in responder.reply([("user", "Hi")]):
                deltas.append(delta)
                if delta == " How":
                    fake.go.set()
            # The responder reuses its client for the next reply.
            fake.go.clear()
            fake.go.set()
            again = await collect(responder.reply([("user", "Hi")]))
            await responder.aclose()
            return fake, deltas, again

    fake, deltas, again = run(main())
    assert deltas == ["Hello", " there", ".", " How", " are you", "? I am", " fine"] == again
    # Without the key's variable a placeholder key is sent (local servers ignore it).
    assert fake.requests[0]["headers"]["Authorization"] == "Bearer no-key"
    assert fake.requests[0]["body"]["messages"][0]["role"] == "system"


def test_closing_the_reply_closes_the_http_stream():
    """Barge-in: the consumer stops reading; the endpoint sees the connection go."""

    async def endless(fake: FakeLLM, request: web.Request):
        resp = await fake.open_sse(request)
        for i in range(200):
            await fake.send(resp, chunk(f"word{i} "))
            await asyncio.sleep(0.02)
        return resp

    async def main():
        async with serve(endless) as fake:
            responder = make(fake.url)
            gen = responder.reply([("user", "Talk forever")])
            assert await gen.__anext__() == "word0 "
            await gen.aclose()
            await asyncio.wait_for(fake.disconnected.wait(), 3)
            await responder.aclose()
            return len(fake.sent)

    assert run(main()) < 150


def test_history_messages_and_truncation():
    responder = Responder(ResponderConfig(backend="openai", base_url="http://127.0.0.1:9/v1", max_history_turns=3,
                                          system_prompt="S"))
    history = [("user", "a"), ("assistant", "b"), ("user", "c"), ("user", "d"), ("assistant", ""), ("assistant", "e"),
               ("user", "f")]
    # merged: user a, assistant b, user "c\nd", assistant e, user f -> the last 3, starting at a user message
    assert responder.messages(history) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "c\nd"},
        {"role": "assistant", "content": "e"}, {"role": "user", "content": "f"}]
    assert responder.messages([("assistant", "Hi, I'm here."), ("user", "Hello")])[1]["role"] == "assistant"
    with pytest.raises(ValueError, match="role"):
        responder.messages([("system", "x")])


def test_config_and_build():
    assert build_responder(ResponderConfig()) is None
    assert isinstance(build_responder(ResponderConfig(backend="openai")), Responder)
    with pytest.raises(ValueError, match="build_responder"):
        Responder(ResponderConfig())
    for bad in ({"backend": "llama"}, {"base_url": "127.0.0.1:8080"}, {"api_key_env": "sk-abc-123"},
                {"max_tokens": 0}, {"temperature": 3.0}, {"timeout_s": 0}, {"first_token_timeout_s": -1},
                {"max_history_turns": 0}):
        with pytest.raises(ValueError, match="responder"):
            ResponderConfig(**bad)


def test_openai_is_imported_lazily():
    """The server must run without the optional `openai` package while the responder is off."""
    path = Path(__file__).parents[1] / "csm_jax" / "dialogue" / "responder.py"
    tree = ast.parse(path.read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not any(name.split(".")[0] == "openai" for name in names), names


# --- faults ----------------------------------------------------------------------------------------------------------


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/v1"


def test_unreachable():
    url = closed_port_url()

    async def main():
        start = time.monotonic()
        err, got = await expect_error(make(url), "responder_unreachable")
        return err, got, time.monotonic() - start

    err, got, elapsed = run(main())
    assert got == [] and elapsed < 5
    assert url in str(err) and "cannot reach" in str(err)


@pytest.mark.parametrize("where", ["before_headers", "after_role_chunk"])
def test_slow_first_token(where):
    async def slow(fake: FakeLLM, request: web.Request):
        if where == "before_headers":
            await fake.hold(fake.go)
        resp = await fake.open_sse(request)
        await fake.send(resp, chunk("", role="assistant"))
        await fake.hold(fake.go)
        await fake.send(resp, chunk("Too late."))
        return resp

    async def main():
        async with serve(slow) as fake:
            start = time.monotonic()
            err, got = await expect_error(make(fake.url, first_token_timeout_s=0.5), "responder_timeout")
            return err, got, time.monotonic() - start

    err, got, elapsed = run(main())
    assert got == [] and 0.45 <= elapsed < 1.5, elapsed
    assert "no reply text within 0.5 s" in str(err)


def test_total_timeout_after_some_text():
    async def trickle(fake: FakeLLM, request: web.Request):
        resp = await fake.open_sse(request)
        for i in range(100):
            await fake.send(resp, chunk(f"w{i} "))
            await fake.hold(fake.go, 0.2)
        return resp

    async def main():
        async with serve(trickle) as fake:
            start = time.monotonic()
            err, got = await expect_error(make(fake.url, timeout_s=1.0, first_token_timeout_s=0.5),
                                          "responder_timeout")
            return err, got, time.monotonic() - start

    err, got, elapsed = run(main())
    assert 3 <= len(got) <= 6 and 0.95 <= elapsed < 2.0, (got, elapsed)
    assert "took over 1 s" in str(err)


@pytest.mark.parametrize("status,body,expect", [
    (500, {"error": {"message": "model crashed:\n out of memory", "type": "server_error", "param": None,
                     "code": None}}, "HTTP 500: model crashed: out of memory"),
    (404, {"error": {"message": "The model `test-model` does not exist.", "type": "invalid_request_error",
                     "code": "model_not_found"}}, "HTTP 404: The model `test-model` does not exist."),
    (503, {"detail": "Service Unavailable"}, "HTTP 503: Service Unavailable"),
    (502, "<html><body>" + "Bad gateway " * 100 + "</body></html>", "HTTP 502: <html><body>Bad gateway"),
])
def test_http_error_status(status, body, expect):
    async def failing(fake: FakeLLM, request: web.Request):
        if isinstance(body, str):
            return web.Response(status=status, text=body, content_type="text/html")
        return web.json_response(body, status=status)

    async def main():
        async with serve(failing) as fake:
            return await expect_error(make(fake.url), "responder_error")

    err, _ = run(main())
    assert expect in str(err), str(err)
    assert len(str(err)) < 300


def test_http_401_names_the_key_variable(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)

    async def unauthorized(fake: FakeLLM, request: web.Request):
        return web.json_response({"error": {"message": "Invalid API Key", "type": "authentication_error"}},
                                 status=401)

    async def main():
        async with serve(unauthorized) as fake:
            return await expect_error(make(fake.url), "responder_error")

    err, _ = run(main())
    assert "HTTP 401: Invalid API Key" in str(err) and f"${KEY_ENV}, which is unset" in str(err)


async def sse_lines(fake: FakeLLM, request: web.Request, lines: list[dict | str]):
    resp = await fake.open_sse(request)
    for line in lines:
        await fake.send(resp, line)
    return resp


BAD_STREAMS = {
    "garbage_json": ([chunk("", role="assistant"), "{not json at all"], "malformed stream"),
    "no_text": ([chunk("", role="assistant"), chunk(finish="stop"), "[DONE]"], "without any text"),
    "no_choices": ([{"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m"}], "without choices"),
    "choice_without_delta": ([{"id": "x", "object": "chat.completion.chunk",
                               "choices": [{"index": 0, "text": "hi"}]}], "no delta"),
    "non_text_content": ([chunk(5)], "non-text content"),
    "empty_stream": ([], "without any text"),
}


@pytest.mark.parametrize("name", list(BAD_STREAMS))
def test_malformed_stream(name):
    lines, expect = BAD_STREAMS[name]

    async def main():
        async with serve(lambda fake, request: sse_lines(fake, request, lines)) as fake:
            return await expect_error(make(fake.url), "responder_bad_stream")

    err, _ = run(main())
    assert expect in str(err), str(err)


def test_plain_json_answer_is_not_a_stream():
    """A server that ignores stream=true and answers one JSON completion."""

    async def non_streaming(fake: FakeLLM, request: web.Request):
        return web.json_response({"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}]})

    async def main():
        async with serve(non_streaming) as fake:
            return await expect_error(make(fake.url), "responder_bad_stream")

    err, _ = run(main())
    assert "without any text" in str(err)


def test_stream_that_breaks_off():
    async def broken(fake: FakeLLM, request: web.Request):
        resp = await fake.open_sse(request)
        await fake.send(resp, chunk("Half a sent"))
        request.transport.close()  # the server dies mid-reply
        return resp

    async def main():
        async with serve(broken) as fake:
            return await expect_error(make(fake.url), "responder_bad_stream")

    err, got = run(main())
    assert got == ["Half a sent"] and "broke off after some text" in str(err), str(err)


def test_error_event_inside_the_stream():
    async def error_event(fake: FakeLLM, request: web.Request):
        return await sse_lines(fake, request, [chunk("Hm"), {"error": {"message": "context length exceeded",
                                                                       "type": "invalid_request_error"}}])

    async def main():
        async with serve(error_event) as fake:
            return await expect_error(make(fake.url), "responder_error")

    err, got = run(main())
    assert got == ["Hm"] and "reported an error: context length exceeded" in str(err), str(err)


# --- sentences -------------------------------------------------------------------------------------------------------


async def agen(pieces):
    for p in pieces:
        yield p


def split(text: str, step: int | None = None) -> list[str]:
    pieces = [text] if step is None else [text[i:i + step] for i in range(0, len(text), step)]
    return run(collect(sentences(agen(pieces))))


@pytest.mark.parametrize("text,expect", [
    ("Hello there. How are you? Great!", ["Hello there.", "How are you?", "Great!"]),
    ("Mr. Smith met Dr. Jones, e.g. at noon. Then left.", ["Mr. Smith met Dr. Jones, e.g. at noon.", "Then left."]),
    ("It costs 3.5 dollars. Version 2.0.1 is out.", ["It costs 3.5 dollars.", "Version 2.0.1 is out."]),
    ("Well... I think so?! \"Really.\" Yes", ["Well...", "I think so?!", "\"Really.\"", "Yes"]),
    ("First line\nsecond line\n\n- third", ["First line", "second line", "- third"]),
    ("Wait …  what", ["Wait …", "what"]),
    ("  \n ... \n Ok.  ", ["Ok."]),
    ("你好。我很好！", ["你好。", "我很好！"]),
    ("The U.S. economy grew. Fine", ["The U.S. economy grew.", "Fine"]),
    ("", []),
])
def test_sentences(text, expect):
    assert split(text) == expect
    # However the text is cut into deltas, the sentences are the same.
    for step in (1, 2, 3, 7):
        assert split(text, step) == expect, step


def test_sentences_are_yielded_before_the_stream_ends():
    async def main():
        more = asyncio.Event()
        seen = []

        async def deltas():
            yield "One. Tw"
            await asyncio.wait_for(more.wait(), 5)  # only after "One." has been yielded
            yield "o."

        async for s in sentences(deltas()):
            seen.append(s)
            more.set()
        return seen

    assert run(main()) == ["One.", "Two."]


def test_sentences_propagates_errors_after_complete_sentences():
    async def main():
        async def deltas():
            yield "Done. Not d"
            raise ResponderError("responder_timeout", "slow")

        seen = []
        with pytest.raises(ResponderError):
            async for s in sentences(deltas()):
                seen.append(s)
        return seen

    assert run(main()) == ["Done."]
