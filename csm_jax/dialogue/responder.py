"""Responder: the text of the assistant's reply, from an OpenAI-compatible chat-completions endpoint, streamed.

    responder = build_responder(ResponderConfig(backend="openai", base_url="http://127.0.0.1:8080/v1"))
    async with contextlib.aclosing(sentences(responder.reply(history))) as stream:  # history: [(role, text), ...]
        async for sentence in stream:                                               # "user" / "assistant", oldest first
            speak(sentence)                                                         # as soon as it is complete

Backends:
- `none` (default): no responder (`build_responder` returns None); the client supplies the reply text.
- `openai`: any server that speaks the OpenAI chat-completions API with streaming (llama.cpp server, vLLM, Ollama,
  OpenAI itself, ...), through the `openai` package. That package is optional and imported only when this backend is
  built, so the server runs without it while the responder is off.

The API key is read from the environment variable named by `api_key_env` (never from config text); when it is unset
a placeholder is sent, which local servers ignore.

Every failure of the endpoint raises `ResponderError` with a `.code` and a one-line message (no traceback, no object
addresses, the endpoint's own message truncated):
- `responder_unreachable`: connection refused, unknown host, could not connect in time.
- `responder_timeout`: no first text within `first_token_timeout_s`, or the reply took over `timeout_s` in all.
- `responder_error`: the endpoint answered an HTTP error status (the message names it and quotes the endpoint's
  error message), or reported an error inside its stream.
- `responder_bad_stream`: a stream that is not chat-completion chunks (invalid SSE/JSON, chunks without choices or
  delta), that broke off, or that ended without any text.
A `ResponderError` may come after some deltas have been yielded (a stream that breaks off or times out midway).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

BACKENDS = ("none", "openai")
ERROR_CODES = ("responder_unreachable", "responder_timeout", "responder_error", "responder_bad_stream")
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant talking with a person. Your replies are spoken aloud, so answer briefly, "
    "in one to three short sentences of plain conversational language, with no lists, markdown, emoji or code."
)
MAX_ERROR_CHARS = 200  # of the endpoint's own error message, in ours
NO_KEY = "no-key"  # sent as the API key when the key's environment variable is unset (local servers ignore it)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ResponderConfig:
    """backend: "none" (no responder) or "openai" (an OpenAI-compatible chat-completions endpoint).
    base_url: the endpoint's API root, e.g. "http://127.0.0.1:8080/v1" (llama.cpp), "http://127.0.0.1:11434/v1"
        (Ollama); None: the openai package's default ($OPENAI_BASE_URL or api.openai.com).
    model: the model name sent in the request (llama.cpp ignores it; vLLM and Ollama need the served name).
    api_key_env: the environment variable holding the API key (sent as a Bearer token).
    system_prompt: the first message of every request.
    max_tokens, temperature: sampling settings sent with the request.
    timeout_s: the most time one reply may spend waiting on the endpoint, all in all (connection, first text, the
        rest of the stream; time the caller spends between reading deltas is not counted).
    first_token_timeout_s: the most time until the first text arrives.
    max_history_turns: only the last this many messages of the conversation are sent (after merging consecutive
        messages of one role).
    """

    backend: str = "none"
    base_url: str | None = None
    model: str = "default"
    api_key_env: str = "OPENAI_API_KEY"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_tokens: int = 200
    temperature: float = 0.7
    timeout_s: float = 30.0
    first_token_timeout_s: float = 10.0
    max_history_turns: int = 16

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"responder.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.base_url is not None and not re.match(r"https?://[^/\s]+", self.base_url):
            raise ValueError(f"responder.base_url must be an http(s) URL, got {self.base_url!r}")
        if not self.api_key_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError(f"responder.api_key_env must name an environment variable, got {self.api_key_env!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"responder.max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"responder.temperature must be in [0, 2], got {self.temperature!r}")
        if not self.timeout_s > 0 or not self.first_token_timeout_s > 0:
            raise ValueError("responder.timeout_s and responder.first_token_timeout_s must be positive, got "
                             f"{self.timeout_s!r} and {self.first_token_timeout_s!r}")
        if not isinstance(self.max_history_turns, int) or self.max_history_turns < 1:
            raise ValueError(f"responder.max_history_turns must be a positive integer, got {self.max_history_turns!r}")


class ResponderError(Exception):
    """A failure of the responder endpoint. `.code`: one of ERROR_CODES; `str(err)` / `.message`: one clear line."""

    def __init__(self, code: str, message: str):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message


def build_responder(config: ResponderConfig) -> Responder | None:
    """The configured responder, or None for backend "none"."""
    return None if config.backend == "none" else Responder(config)


def _clean(text: object, limit: int = MAX_ERROR_CHARS) -> str:
    """One line of at most `limit` characters, object addresses removed."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _endpoint_message(body: object, fallback: str) -> str:
    """The human-readable part of an error body: {"error": {"message": ...}}, {"message": ...}, {"detail": ...}
    (FastAPI, vLLM), {"error": "..."} (Ollama), or the raw text."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            for key in ("message", "detail", "msg"):
                if inner.get(key):
                    return _clean(inner[key])
        elif isinstance(inner, str) and inner:
            return _clean(inner)
        if body.get("detail"):
            return _clean(body["detail"])
    elif isinstance(body, (str, bytes)) and body:
        return _clean(body.decode("utf-8", "replace") if isinstance(body, bytes) else body)
    return _clean(fallback)


def _root_cause(err: BaseException) -> BaseException:
    seen = set()
    while (err.__cause__ or err.__context__) is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return err


class Responder:
    """Streams reply text from an OpenAI-compatible chat-completions endpoint; see the module docstring.

    One instance serves many replies (one HTTP connection pool); `await aclose()` when done. Raises ImportError at
    construction when the `openai` package is missing.
    """

    def __init__(self, config: ResponderConfig):
        if config.backend != "openai":
            raise ValueError(f"Responder needs backend 'openai', got {config.backend!r} (use build_responder)")
        try:
            import openai
        except ImportError as err:
            raise ImportError("responder.backend=openai needs the `openai` package: pip install 'csm-jax[responder]' "
                              "(or pip install openai)") from err
        self.config = config
        self._openai = openai
        self._client: Any = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self.endpoint = (config.base_url or "the default OpenAI endpoint").rstrip("/")

    def messages(self, history: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
        """The request's messages: the system prompt, then the last `max_history_turns` messages of `history`
        ((role "user" | "assistant", text), oldest first; empty texts skipped, consecutive messages of one role
        merged with a newline; a truncated history starts at a user message). ValueError on another role."""
        turns: list[dict[str, str]] = []
        for role, text in history:
            if role not in ("user", "assistant"):
                raise ValueError(f"history roles must be 'user' or 'assistant', got {role!r}")
            text = (text or "").strip()
            if not text:
                continue
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] += "\n" + text
            else:
                turns.append({"role": role, "content": text})
        if len(turns) > self.config.max_history_turns:
            turns = turns[-self.config.max_history_turns:]
            if turns[0]["role"] == "assistant" and len(turns) > 1:
                turns = turns[1:]
        return [{"role": "system", "content": self.config.system_prompt}, *turns]

    def _get_client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            cfg = self.config
            kwargs: dict[str, Any] = {}
            if cfg.base_url is not None:
                kwargs["base_url"] = cfg.base_url
            connect_s = min(cfg.first_token_timeout_s, cfg.timeout_s, 10.0)
            self._client = self._openai.AsyncOpenAI(
                api_key=os.environ.get(cfg.api_key_env) or NO_KEY, max_retries=0,
                timeout=self._openai.Timeout(cfg.timeout_s, connect=connect_s), **kwargs)
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP connection pool (the responder can still be used afterwards: it opens a new one)."""
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def reply(self, history: Sequence[tuple[str, str]]) -> AsyncIterator[str]:
        """Yield the reply's text deltas (non-empty str) as the endpoint streams them.

        history: [(role, text), ...], role "user" or "assistant", oldest first (see `messages`).
        Raises ResponderError (see the module docstring), ValueError on a bad history. Cancelling the consumer (or
        closing the generator) closes the HTTP stream.
        """
        cfg = self.config
        messages = self.messages(history)
        client = self._get_client()
        budget = [cfg.timeout_s, min(cfg.first_token_timeout_s, cfg.timeout_s)]  # [total, to first text] left
        stream = None
        got_text = False
        try:
            create = client.chat.completions.create(
                model=cfg.model, messages=messages, stream=True, max_tokens=cfg.max_tokens,
                temperature=cfg.temperature)
            stream = await self._wait(create, budget, got_text, streaming=False)
            chunks = stream.__aiter__()
            while True:
                try:
                    chunk = await self._wait(chunks.__anext__(), budget, got_text, streaming=True)
                except StopAsyncIteration:
                    break
                text = self._delta_text(chunk)
                if text:
                    got_text = True
                    yield text
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.close()
        if not got_text:
            raise ResponderError("responder_bad_stream",
                                 f"the responder at {self.endpoint} ended its stream without any text")

    async def _wait(self, step: Awaitable[T], budget: list[float], got_text: bool, *, streaming: bool) -> T:
        """Await one step of the request within what is left of the time budget, mapping every failure."""
        limit = budget[0] if got_text else min(budget)
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            return await asyncio.wait_for(step, max(limit, 0.0))
        except StopAsyncIteration:
            raise
        except TimeoutError:  # (asyncio.TimeoutError is TimeoutError from Python 3.11)
            if got_text:
                raise ResponderError("responder_timeout", f"the responder at {self.endpoint} took over "
                                     f"{self.config.timeout_s:g} s for one reply") from None
            first = min(self.config.first_token_timeout_s, self.config.timeout_s)
            raise ResponderError("responder_timeout", f"the responder at {self.endpoint} sent no reply text within "
                                 f"{first:g} s") from None
        except ResponderError:
            raise
        except Exception as err:
            raise self._map_error(err, streaming, got_text) from err
        finally:
            spent = loop.time() - start
            budget[0] -= spent
            budget[1] -= spent

    def _map_error(self, err: Exception, streaming: bool, got_text: bool) -> ResponderError:
        openai, where = self._openai, self.endpoint
        cause = _root_cause(err)
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            message = _endpoint_message(err.body, err.message)
            hint = ""
            if status in (401, 403):
                key = "set" if os.environ.get(self.config.api_key_env) else "unset"
                hint = f" (the API key comes from ${self.config.api_key_env}, which is {key})"
            return ResponderError("responder_error", f"the responder at {where} answered HTTP {status}: "
                                  f"{message}{hint}")
        if isinstance(err, openai.APIResponseValidationError):
            return ResponderError("responder_bad_stream", f"the responder at {where} sent an invalid response: "
                                  f"{_clean(err.message)}")
        if isinstance(err, openai.APITimeoutError):
            if type(cause).__name__ == "ConnectTimeout":
                return ResponderError("responder_unreachable", f"cannot reach the responder at {where}: could not "
                                      "connect in time")
            return ResponderError("responder_timeout", f"the responder at {where} timed out (no data for "
                                  f"{self.config.timeout_s:g} s)")
        if isinstance(err, openai.APIConnectionError):
            detail = _clean(cause) if cause is not err else _clean(err.message)
            if streaming:
                return ResponderError("responder_bad_stream", f"the responder's stream from {where} broke off"
                                      f"{' after some text' if got_text else ''}: {detail or 'connection lost'}")
            return ResponderError("responder_unreachable", f"cannot reach the responder at {where}: "
                                  f"{detail or type(cause).__name__}")
        if isinstance(err, openai.APIError):  # an error event inside the stream
            message = _endpoint_message(err.body, err.message)
            return ResponderError("responder_error", f"the responder at {where} reported an error: {message}")
        if isinstance(err, openai.OpenAIError):
            return ResponderError("responder_error", f"the responder client failed: {_clean(err)}")
        # Anything else while reading the stream: undecodable JSON (json.JSONDecodeError), data that does not fit
        # the chunk model (pydantic), a malformed event, ...
        detail = _clean(err, 120) or type(err).__name__
        return ResponderError("responder_bad_stream", f"the responder at {where} sent a malformed stream "
                              f"({type(err).__name__}: {detail})")

    def _delta_text(self, chunk: Any) -> str:
        """The text of one chat.completion.chunk ("" for role-only, finish and usage chunks)."""
        choices = getattr(chunk, "choices", None)
        if not isinstance(choices, list):
            raise ResponderError("responder_bad_stream", f"the responder at {self.endpoint} sent a stream chunk "
                                 "without choices (not a chat.completion.chunk)")
        if not choices:
            return ""  # e.g. the final usage chunk
        delta = getattr(choices[0], "delta", None)
        if delta is None:
            if getattr(choices[0], "finish_reason", None):
                return ""
            raise ResponderError("responder_bad_stream", f"the responder at {self.endpoint} sent a stream chunk "
                                 "whose choice has no delta (not a chat.completion.chunk)")
        content = getattr(delta, "content", None)
        if content is None:
            return ""
        if not isinstance(content, str):
            raise ResponderError("responder_bad_stream", f"the responder at {self.endpoint} sent non-text content "
                                 f"({type(content).__name__}) in a stream chunk")
        return content


# Sentence splitting -------------------------------------------------------------------------------------------------

# A sentence ends at a run of . ! ? or … (then any closing quotes or brackets) that is followed by whitespace, at a
# CJK full stop / ! / ?, or at a newline. "Followed by whitespace" keeps decimals (3.5), versions and URLs whole; a
# "." after a known abbreviation or a dotted one (e.g., i.e., U.S.) does not end a sentence. When in doubt the text
# is not split (a longer chunk costs only latency).
_BOUNDARY = re.compile(r"[.!?…]+[\"'”’»)\]]*(?=\s)|[。！？]+[」』”’）]*|\n")
_WORD_BEFORE = re.compile(r"([A-Za-z.]+)$")
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "cf", "approx", "mt", "ft"})


def _is_abbreviation(text: str, dot: int) -> bool:
    """Whether the "." at text[dot] closes an abbreviation (Mr. Dr. vs. e.g. i.e. U.S.)."""
    m = _WORD_BEFORE.search(text, 0, dot)
    if m is None:
        return False
    word = m.group(1).lower().lstrip(".")
    return word in ABBREVIATIONS or "." in word


def _split(buffer: str) -> tuple[list[str], str]:
    """The complete sentences at the start of `buffer` and the rest."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(buffer):
        if m.group() == "." and _is_abbreviation(buffer, m.start()):
            continue
        out.append(buffer[start:m.end()])
        start = m.end()
    return out, buffer[start:]


def _speakable(sentence: str) -> str:
    sentence = sentence.strip()
    return sentence if any(ch.isalnum() for ch in sentence) else ""


async def sentences(deltas: AsyncIterator[str]) -> AsyncIterator[str]:
    """Re-chunk text deltas into sentences, each yielded (stripped) as soon as it is complete; the remainder is
    yielded when `deltas` ends. Pieces without any letter or digit ("...", "---", whitespace) are dropped.

    A sentence ends at . ! ? … (or a run of them, with closing quotes/brackets) followed by whitespace, at a CJK
    sentence end, or at a newline, but not at the "." of an abbreviation (Mr. Dr. vs. e.g. i.e. U.S.). Since an end
    needs the whitespace after it, a sentence is yielded when the delta after its last character arrives.
    Errors from `deltas` propagate (after the sentences completed before them); closing this generator closes
    `deltas` when it can be closed.
    """
    buffer = ""
    try:
        async for delta in deltas:
            buffer += delta
            done, buffer = _split(buffer)
            for sentence in done:
                if sentence := _speakable(sentence):
                    yield sentence
        if sentence := _speakable(buffer):
            yield sentence
    finally:
        aclose = getattr(deltas, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
