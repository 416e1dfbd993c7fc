"""Python functions as tools: their JSON schema for the chat template, and running a call with a time and an output
limit.

:meth:`Tool.from_function` reads the schema off the signature (``int`` → integer, ``float`` → number, ``str`` →
string, ``bool`` → boolean, ``list`` → array, ``dict`` → object; parameters without a default are required) and the
description off the docstring's first paragraph.

:class:`ToolRunner` runs the calls in a forked worker process (POSIX ``fork``: the functions need no pickling, and
closures work): a call still running after ``timeout_s`` is killed (``SIGKILL``, with its worker) and answered with
a timeout error, so a tool that hangs or loops costs at most its limit. The worker sends back each result as text
(``str(result)``, JSON for dicts and lists) through a pipe, as JSON — nothing is unpickled; a result longer than
``max_output_chars`` is cut and marked. An exception in the tool, arguments that do not fit its signature, an
unknown tool name, a child that dies (e.g. ``os._exit`` or a crash in C code) all become an error message for the
model, never an exception in the trainer. Tools should not use torch: the child of a multithreaded process may
deadlock in a thread pool it inherited (the timeout then ends it).
"""
from __future__ import annotations

import inspect
import json
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["Tool", "ToolRunner", "ToolResult"]

_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}
_STR_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}


@dataclass
class Tool:
    """A callable with its name, description and JSON-schema ``parameters``."""

    fn: Callable[..., Any]
    name: str
    description: str
    parameters: dict[str, Any]

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None,
                      description: str | None = None) -> "Tool":
        if not callable(fn):
            raise TypeError(f"a tool must be callable, got {type(fn).__name__}")
        sig = inspect.signature(fn)
        props: dict[str, Any] = {}
        required: list[str] = []
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            ann = _STR_TYPES.get(p.annotation, p.annotation) if isinstance(p.annotation, str) else p.annotation
            props[p.name] = {"type": _JSON_TYPES[ann]} if ann in _JSON_TYPES else {}
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
        doc = inspect.getdoc(fn) or ""
        return cls(fn=fn, name=name or fn.__name__, description=description or doc.split("\n\n")[0].strip(),
                   parameters={"type": "object", "properties": props, "required": required})

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema chat templates render (``tools=[...]``)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def check_arguments(self, arguments: dict[str, Any]) -> str | None:
        """Why ``arguments`` do not fit the signature (None when they do)."""
        try:
            inspect.signature(self.fn).bind(**arguments)
        except TypeError as e:
            return f"bad arguments for tool {self.name!r}: {e}"
        return None


@dataclass
class ToolResult:
    """``output``: what the model sees; ``ok``: False for errors (exception, timeout, bad call)."""

    output: str
    ok: bool


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


class ToolRunner:
    """Runs calls of ``tools`` in a forked worker process with a wall-clock limit ``timeout_s`` per call and an
    output limit ``max_output_chars`` (see the module docstring). The worker serves calls one after the other
    (a request and its answer are one line of JSON each); it is killed at a call's time limit, and replaced —
    lazily, at the next call — after a timeout, when it dies, and every ``calls_per_worker`` calls (a long-lived fork
    would keep old copies of pages the trainer has since rewritten). :meth:`shared` gives the environments of a run
    one runner per tool set. A worker also exits when this process does (its request pipe closes)."""

    _shared: dict[tuple, "ToolRunner"] = {}

    def __init__(self, tools: Sequence[Tool], timeout_s: float = 5.0, max_output_chars: int = 2000,
                 calls_per_worker: int = 256):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if isinstance(max_output_chars, bool) or not isinstance(max_output_chars, int) or max_output_chars < 1:
            raise ValueError(f"max_output_chars must be an int >= 1, got {max_output_chars!r}")
        if not hasattr(os, "fork"):
            raise RuntimeError("ToolRunner needs os.fork (POSIX) to cut off tools at their time limit")
        self.tools = list(tools)
        self.timeout_s = float(timeout_s)
        self.max_output_chars = max_output_chars
        self.calls_per_worker = calls_per_worker
        self._worker: tuple[int, int, int] | None = None           # (pid, request fd, answer fd)
        self._calls = 0

    @classmethod
    def shared(cls, tools: Sequence[Tool], timeout_s: float = 5.0, max_output_chars: int = 2000) -> "ToolRunner":
        """One runner (and worker) per set of tool functions and limits in this process."""
        key = (tuple((t.name, t.fn) for t in tools), float(timeout_s), max_output_chars)
        if key not in cls._shared:
            cls._shared[key] = cls(tools, timeout_s, max_output_chars)
        return cls._shared[key]

    def run(self, tool: Tool, arguments: dict[str, Any]) -> ToolResult:
        bad = tool.check_arguments(arguments)
        if bad is not None:
            return ToolResult(bad, ok=False)
        index = next(i for i, t in enumerate(self.tools) if t.name == tool.name)
        if self._worker is None or self._calls >= self.calls_per_worker:
            self.close()
            self._worker = self._spawn()
        self._calls += 1
        pid, req, ans = self._worker
        try:
            os.write(req, (json.dumps({"tool": index, "arguments": arguments}) + "\n").encode())
        except BrokenPipeError:
            data = b""
        else:
            data = self._read_line(ans, pid)
        if data is None:
            self.close()
            return ToolResult(f"tool {tool.name!r} timed out after {self.timeout_s:g} s", ok=False)
        try:
            payload = json.loads(data.decode())
            return ToolResult(str(payload["output"]), bool(payload["ok"]))
        except (ValueError, KeyError, TypeError):
            self.close()
            return ToolResult(f"tool {tool.name!r} stopped without returning a result", ok=False)

    def close(self) -> None:
        """Stop the worker (killed: a worker forked later may hold a copy of its request pipe, so it would not see
        the pipe close)."""
        if self._worker is None:
            return
        pid, req, ans = self._worker
        self._worker, self._calls = None, 0
        os.kill(pid, signal.SIGKILL)
        os.close(req)
        os.close(ans)
        os.waitpid(pid, 0)

    def _spawn(self) -> tuple[int, int, int]:
        sys.stdout.flush()
        sys.stderr.flush()
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        pid = os.fork()
        if pid == 0:                                    # the worker: serve requests until the pipe closes
            try:
                os.close(req_w)
                os.close(ans_r)
                self._serve(req_r, ans_w)
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(ans_w)
        return pid, req_w, ans_r

    def _serve(self, req: int, ans: int) -> None:
        with os.fdopen(req, "rb") as requests:
            for line in requests:
                call = json.loads(line)
                tool = self.tools[call["tool"]]
                try:
                    payload = {"ok": True, "output": self._cut(_as_text(tool.fn(**call["arguments"])))}
                except BaseException as e:  # noqa: BLE001 - the model is told what went wrong
                    payload = {"ok": False, "output": self._cut(f"tool {tool.name!r} raised {type(e).__name__}: {e}")}
                data = (json.dumps(payload) + "\n").encode()
                while data:
                    data = data[os.write(ans, data):]

    def _cut(self, text: str) -> str:
        if len(text) <= self.max_output_chars:
            return text
        return text[:self.max_output_chars] + f"... [cut: {len(text)} characters]"

    def _read_line(self, fd: int, pid: int) -> bytes | None:
        """The worker's answer line (b"" if it died first), or None if it is still running at the limit."""
        deadline = time.monotonic() + self.timeout_s
        chunks: list[bytes] = []
        poll = select.poll()
        poll.register(fd, select.POLLIN | select.POLLHUP)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poll.poll(left * 1000):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return b""
            chunks.append(chunk)
            if chunk.endswith(b"\n"):
                return b"".join(chunks)
