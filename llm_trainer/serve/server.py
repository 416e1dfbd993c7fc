"""The HTTP server: Python's standard ``http.server`` (a thread per connection, HTTP/1.1 keep-alive), in front of
one :class:`~llm_trainer.serve.engine.BatchEngine` (or :class:`~llm_trainer.serve.rewards.RewardBatcher`) that
owns the model.

Routes: ``GET /`` (web chat), ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/rewards``.

Streaming answers are server-sent events (``data: {json}`` … ``data: [DONE]``) in a chunked HTTP/1.1 response.
A client that goes away is noticed when a write fails or, between tokens, when its socket reads end-of-file; its
sequences are cancelled at once and leave the batch at the next step. Every error — a malformed request line,
headers or body, a bad field, an over-long prompt, a failure inside the model — is answered with OpenAI's error
JSON and never stops the server.
"""
from __future__ import annotations

import json
import queue
import select
import socket
import sys
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .engine import BatchEngine, Overloaded, Sequence
from .loading import ServedModel
from .page import chat_page
from .protocol import (APIError, GenerationRequest, chat_response, completion_response, image_loader,
                       parse_chat_request, parse_completion_request, parse_reward_request, stream_chunk, usage)
from .rewards import RewardBatcher
from .text import TextStream

__all__ = ["OpenAIServer", "make_server"]

_POLL_S = 0.1  # how often a waiting handler checks that its client is still connected
_ROUTES = {"/": "GET", "/health": "GET", "/v1/models": "GET", "/v1/chat/completions": "POST",
           "/v1/completions": "POST", "/v1/rewards": "POST"}


class ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


class OpenAIServer(ThreadingHTTPServer):
    """``OpenAIServer((host, port), served, ...)``; ``serve_forever()``; once it returns (``shutdown()`` from another
    thread, or an exception), ``close()`` stops the model thread.
    ``max_body``: request bodies above this many bytes get 413; ``image_dir``: the only folder image file paths
    may name (None: data URLs only)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # listen backlog: socketserver's 5 resets connections when many clients connect at once

    def __init__(self, address: tuple[str, int], served: ServedModel, max_batch: int = 16, max_waiting: int = 1024,
                 batch_wait_s: float = 0.0, max_body: int = 32 << 20, image_dir: str | None = None,
                 verbose: bool = False):
        self.served, self.max_body, self.verbose = served, max_body, verbose
        self.load_image = image_loader(image_dir)
        self.created = int(time.time())
        if served.kind == "reward":
            self.engine, self.rewards = None, RewardBatcher(served, max_batch=max_batch, batch_wait_s=batch_wait_s)
        else:
            self.rewards = None
            self.engine = BatchEngine(served, max_batch=max_batch, max_waiting=max_waiting, batch_wait_s=batch_wait_s)
        super().__init__(address, _Handler)  # binds: fails (address in use) before the model thread starts
        (self.engine or self.rewards).start()

    def close(self) -> None:
        self.server_close()
        for worker in (self.engine, self.rewards):
            if worker is not None:
                worker.close()

    def health(self) -> dict:
        s = self.served
        stats = dict((self.engine or self.rewards).stats)
        return {"status": "ok", "model": s.name, "kind": s.kind, "max_model_len": s.max_model_len, **stats}


def make_server(served: ServedModel, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> OpenAIServer:
    return OpenAIServer((host, port), served, **kwargs)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "llm-trainer"
    timeout = 300  # seconds a connection may stay silent (idle keep-alive, or a body that never comes)
    server: OpenAIServer

    # ------------------------------------------------------------------------------------------- plumbing
    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors http.server raises itself (bad request line, headers too long, unsupported method): JSON too."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: still answer with a status line
            self.request_version = "HTTP/1.0"
        if code == HTTPStatus.NOT_IMPLEMENTED:  # http.server's answer to a method it has no do_X for
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command!r} is not allowed"
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "Error"
        self._send_json(code, APIError(code, message or phrase).body())

    def _send_json(self, status: int, body: Any, extra_headers: dict | None = None) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self._responded = True

    def _read_json(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise APIError(411, "send the request body with a Content-Length header (no chunked request bodies)")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise APIError(411, "a POST request needs a Content-Length header and a JSON body")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise APIError(400, f"invalid Content-Length header {length!r}") from None
        if n > self.server.max_body:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise APIError(413, f"the request body has {n} bytes; the limit is {self.server.max_body}",
                           code="request_too_large")
        raw = self.rfile.read(n)
        if len(raw) < n:
            self.close_connection = True
            raise APIError(400, f"the request body ended after {len(raw)} of {n} bytes")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {type(e).__name__}: {e}",
                           code="invalid_json") from None

    def _client_gone(self) -> bool:
        """True once the client's side of the connection is closed (it reads end-of-file)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # ------------------------------------------------------------------------------------------- dispatch
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        self._responded = self._streaming = False
        allowed = None
        path = self.path.split("?", 1)[0]
        try:
            if method == "POST" and path in _ROUTES and _ROUTES[path] == "POST":
                body = self._read_json()
                {"/v1/chat/completions": self._chat, "/v1/completions": self._completions,
                 "/v1/rewards": self._rewards}[path](body)
            elif method == "GET" and (_ROUTES.get(path) == "GET" or path.startswith("/v1/models/")):
                self._get(path)
            elif path in _ROUTES or path.startswith("/v1/models/"):
                allowed = "GET" if path.startswith("/v1/models/") else _ROUTES[path]
                if method == "POST":  # an unread body would be taken for the next request
                    self.close_connection = True
                raise APIError(405, f"{method} is not allowed on {path}; use {allowed}", code="method_not_allowed")
            else:
                if method == "POST":
                    self.close_connection = True
                raise APIError(404, f"no route {method} {path}; see docs/serve.md for the API", code="not_found")
        except APIError as e:
            if self._streaming:  # a streaming answer has begun: the error goes into the stream
                self._sse_error(e)
            elif self._responded:
                self.close_connection = True
            else:
                self._send_json(e.status, e.body(), {"Allow": allowed} if allowed else None)
        except (ClientGone, BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # a bug must cost one request, not the server
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
            try:
                if self._streaming:
                    self._sse_error(err)
                elif not self._responded:
                    self._send_json(500, err.body())
            except OSError:
                pass

    def _get(self, path: str) -> None:
        s = self.server.served
        model = {"id": s.name, "object": "model", "created": self.server.created, "owned_by": "llm_trainer",
                 "kind": s.kind, "max_model_len": s.max_model_len}
        if path == "/":
            page = chat_page(s.name, s.kind)
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(page)
            self._responded = True
        elif path == "/health":
            self._send_json(200, self.server.health())
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [model]})
        elif path[len("/v1/models/"):] == s.name:
            self._send_json(200, model)
        else:
            raise APIError(404, f"The model '{path[len('/v1/models/'):]}' does not exist", code="model_not_found")

    # ------------------------------------------------------------------------------------------- endpoints
    def _needs(self, kind: str, path: str) -> None:
        s = self.server.served
        if kind == "reward" and s.kind != "reward":
            raise APIError(400, f"{path} scores with a reward model; {s.name} is a {s.kind} model",
                           code="unsupported_endpoint")
        if kind == "generate" and s.kind == "reward":
            raise APIError(400, f"{path} needs a language model; {s.name} is a reward model (use /v1/rewards)",
                           code="unsupported_endpoint")

    def _chat(self, body: Any) -> None:
        self._needs("generate", "/v1/chat/completions")
        self._generate(parse_chat_request(body, self.server.served, self.server.load_image))

    def _completions(self, body: Any) -> None:
        self._needs("generate", "/v1/completions")
        self._generate(parse_completion_request(body, self.server.served))

    def _rewards(self, body: Any) -> None:
        self._needs("reward", "/v1/rewards")
        s = self.server.served
        seqs = parse_reward_request(body, s)
        try:
            scores = self.server.rewards.score(seqs)
        except RuntimeError as e:
            raise APIError(500, str(e), type="server_error") from None
        n = sum(len(x) for x in seqs)
        self._send_json(200, {"object": "list", "model": s.name,
                              "data": [{"object": "reward", "index": i, "score": v} for i, v in enumerate(scores)],
                              "usage": {"prompt_tokens": n, "total_tokens": n}})

    def _generate(self, req: GenerationRequest) -> None:
        s, engine = self.server.served, self.server.engine
        events: queue.SimpleQueue = queue.SimpleQueue()
        stop_ids = frozenset() if req.ignore_eos else frozenset(s.stop_token_ids)
        seeds = req.seeds()
        seqs = [Sequence(p, req.config, stop_ids, events, index=i * req.n + k, seed=seeds[i * req.n + k])
                for i, p in enumerate(req.prompts) for k in range(req.n)]
        strip = req.kind == "chat" and s.tokenizer.chat_template == "plain"
        texts = [TextStream(s.tokenizer, req.stop, strip_leading_space=strip) for _ in seqs]
        reasons: list[str | None] = [None] * len(seqs)
        counts = [0] * len(seqs)  # tokens of each choice up to its end (a cancelled row may run one step longer)
        try:
            engine.submit(seqs)
        except Overloaded as e:
            raise APIError(503, f"the server is overloaded: {e}; retry later", type="server_error",
                           code="overloaded") from None
        try:
            if req.stream:
                self._start_stream()
                for i in range(len(seqs) if req.kind == "chat" else 0):
                    self._sse(stream_chunk(req, s.name, i, first=True))
            for i, kind, value in self._events(seqs, events, reasons):
                delta, finish = "", None
                if kind == "token":
                    counts[i] += 1
                    delta, stopped = texts[i].push(value)
                    if stopped:
                        engine.cancel(seqs[i])
                        finish = reasons[i] = "stop"
                elif kind == "end":
                    delta, finish = texts[i].flush(), value
                    reasons[i] = value
                else:
                    raise APIError(500, value, type="server_error")
                if req.stream and (delta or finish):
                    if delta:
                        self._sse(stream_chunk(req, s.name, i, delta))
                    if finish:
                        self._sse(stream_chunk(req, s.name, i, finish=finish))
        finally:
            for seq in seqs:
                if not seq.done:
                    engine.cancel(seq)
        u = usage(sum(len(p.ids) for p in req.prompts), sum(counts))
        if req.stream:
            if req.include_usage:
                self._sse(stream_chunk(req, s.name, None, u=u))
            self._write_chunk(b"data: [DONE]\n\n")
            self._write_chunk(b"")
            return
        build = chat_response if req.kind == "chat" else completion_response
        self._send_json(200, build(req, s.name, [t.text for t in texts], reasons, u))

    def _events(self, seqs: list[Sequence], events: queue.SimpleQueue, reasons: list):
        """Yield ``(index, kind, value)`` until every sequence has ended; raise :class:`ClientGone` if the client
        disconnects meanwhile."""
        next_check = time.monotonic() + _POLL_S
        while any(r is None for r in reasons):
            try:
                index, kind, value = events.get(timeout=_POLL_S)
            except queue.Empty:
                index = None
            if time.monotonic() >= next_check:
                if self._client_gone():
                    raise ClientGone()
                next_check = time.monotonic() + _POLL_S
            if index is not None and reasons[index] is None:
                yield index, kind, value

    # ------------------------------------------------------------------------------------------- streaming
    def _start_stream(self) -> None:
        """Chunked transfer encoding for HTTP/1.1 clients; an HTTP/1.0 client gets the events until the
        connection closes."""
        self._chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self._responded = self._streaming = True

    def _write_chunk(self, data: bytes) -> None:
        """One chunk of the streamed body (``b""`` ends it)."""
        if self._chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        elif data:
            self.wfile.write(data)

    def _sse(self, obj: dict) -> None:
        self._write_chunk(b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n")

    def _sse_error(self, err: APIError) -> None:
        self.close_connection = True
        self._sse(err.body())
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")
