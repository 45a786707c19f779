"""A scripted OpenAI-compatible chat-completions server (streamed SSE) in a background thread, for the talk-mode
tests: each request takes the next scripted reply (`script`), sent in pieces; a piece may wait for a gate the test
opens; `status` other than 200 answers with an OpenAI error body instead, 0 hangs up without an answer, -1 sends
a malformed stream."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Piece:
    text: str
    gate: threading.Event | None = None  # sent only once the test sets it


@dataclass
class ChatServer:
    script: list[list[Piece]] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    url: str = ""
    status: int = 200  # anything else: answer with an OpenAI error body

    def serve(self) -> Iterator[ChatServer]:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        runner_box: list[web.AppRunner] = []

        async def completions(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.requests.append(body)
            if self.status == 0:
                request.transport.close()
                return web.Response()
            if self.status == -1:
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                await response.write(b"data: {not json\n\n")
                return response
            if self.status != 200:
                return web.json_response({"error": {"message": "scripted failure", "type": "server_error"}},
                                         status=self.status)
            pieces = self.script.pop(0) if self.script else [Piece("Okay.")]
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i, piece in enumerate(pieces):
                if piece.gate is not None:
                    await asyncio.to_thread(piece.gate.wait, 60)
                chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": piece.text},
                                      "finish_reason": "stop" if i == len(pieces) - 1 else None}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(0.05)
            await response.write(b"data: [DONE]\n\n")
            return response

        async def start() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", completions)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            runner_box.append(runner)
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
            started.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(start())
            loop.run_forever()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started.wait(30)
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(runner_box[0].cleanup(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
