"""Request validation and response bodies of the OpenAI-compatible API (and our ``/v1/rewards``).

Every malformed request raises :class:`APIError`, which the server answers with OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}`` and a 4xx status. Requests are checked strictly: an unknown
field, a wrong type or an out-of-range value is named in the message (``param``) instead of being ignored.

Extensions to OpenAI's parameters (as in vLLM): ``top_k``, ``repetition_penalty`` and ``ignore_eos``.
Not supported (400 when set to anything but their neutral value): ``logprobs``/``top_logprobs``, ``echo``,
``suffix``, ``best_of``, tools and function calling, ``response_format``, presence/frequency penalties.
"""
from __future__ import annotations

import math
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..generation import GenerateConfig
from .loading import Prompt, ServedModel, decode_data_url

__all__ = ["APIError", "GenerationRequest", "parse_chat_request", "parse_completion_request", "parse_reward_request",
           "image_loader", "MAX_N", "MAX_STOP"]

MAX_N = 16
MAX_STOP = 4
_SAMPLING = {"max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "n", "seed",
             "stop", "stream", "stream_options", "ignore_eos", "user", "presence_penalty", "frequency_penalty",
             "logprobs", "model"}
_CHAT_FIELDS = _SAMPLING | {"messages", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
                            "response_format", "parallel_tool_calls"}
_COMPLETION_FIELDS = _SAMPLING | {"prompt", "echo", "suffix", "best_of"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered to the client: HTTP ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, f"'{param}': {message}", param=param, code=code)


@dataclass
class GenerationRequest:
    """A validated chat or text completion request: ``prompts`` (one per prompt; a chat has one), ``n`` samples
    each, decoding ``config``, ``seed`` (None → random), text ``stop`` strings, streaming flags."""

    kind: str  # "chat" | "completion"
    prompts: list[Prompt]
    config: GenerateConfig
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    id: str = ""
    created: int = 0

    def seeds(self) -> list[int]:
        """The seed of every choice: ``seed + k`` for sample ``k`` of each prompt (random when no seed)."""
        if self.seed is None:
            return [secrets.randbits(62) for _ in range(len(self.prompts) * self.n)]
        return [self.seed + k for _ in self.prompts for k in range(self.n)]


# ------------------------------------------------------------------------------------------------ field checks
def _int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"must be an integer, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise _bad(name, f"must be {bounds}, got {v}")
    return v


def _float(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, f"must be a number, got {v!r}")
    if v > hi or v < lo or (lo_open and v == lo):
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, f"must be true or false, got {v!r}")
    return v


def _check_fields(body: Any, allowed: set[str]) -> None:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(unknown[0], f"unrecognized request argument (supported: {', '.join(sorted(allowed))})")


def _check_model(body: dict, served: ServedModel) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"must be a string, got {model!r}")
    if model is not None and model != served.name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served.name}'",
                       param="model", code="model_not_found")


def _unsupported(body: dict, neutral: dict[str, Any]) -> None:
    for name, ok in neutral.items():
        v = body.get(name)
        if v is not None and v != ok and not (ok == [] and v == []):
            raise _bad(name, "is not supported by this server", code="unsupported_parameter")


# ------------------------------------------------------------------------------------------------ sampling
def _sampling(body: dict, served: ServedModel, prompt_lengths: list[int], default_max: int | None,
              what: str) -> tuple[GenerateConfig, dict]:
    _unsupported(body, {"logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0,
                        "echo": False, "suffix": "", "best_of": 1, "tools": [], "functions": [],
                        "tool_choice": "none", "function_call": "none", "response_format": {"type": "text"},
                        "parallel_tool_calls": False})
    limit = served.max_model_len
    longest = max(prompt_lengths)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, name, None, lo=1)
    if max_tokens is None:
        room = limit - longest
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your {what} "
                                f"resulted in {longest} tokens, leaving no room for the completion. Please reduce "
                                f"the length of the {what}.", param="messages" if what == "messages" else "prompt",
                           code="context_length_exceeded")
        max_tokens = room if default_max is None else min(default_max, room)
    elif longest + max_tokens > limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{longest + max_tokens} tokens ({longest} in the {what}, {max_tokens} in the "
                            f"completion). Please reduce the length of the {what} or completion.",
                       param=name, code="context_length_exceeded")
    temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", 0, lo=-1)
    penalty = _float(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)
    config = GenerateConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                            top_k=None if top_k <= 0 else top_k, repetition_penalty=penalty,
                            do_sample=temperature > 0)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop)):
        raise _bad("stop", f"must be a string or a list of at most {MAX_STOP} strings, got {stop!r}")
    options = body.get("stream_options")
    stream = _bool(body, "stream")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad("stream_options", f"must be an object with 'include_usage', got {options!r}")
        if not stream:
            raise _bad("stream_options", "is only allowed when 'stream' is true")
    extra = dict(n=_int(body, "n", 1, lo=1, hi=MAX_N), seed=_int(body, "seed", None),
                 stop=[s for s in stop if s], stream=stream,
                 include_usage=_bool(options or {}, "include_usage"), ignore_eos=_bool(body, "ignore_eos"))
    if extra["seed"] is not None and not -(2 ** 63) <= extra["seed"] < 2 ** 63 - MAX_N:
        raise _bad("seed", "must fit in a signed 64-bit integer")
    return config, extra


# ------------------------------------------------------------------------------------------------ chat
def image_loader(image_dir: str | os.PathLike | None) -> Callable[[str, str], Any]:
    """``load(url, param)``: a base64 data URL → pillow image; a file path (or ``file://`` URL) → the path, only
    under ``image_dir`` (None: no file paths); remote URLs are refused (the server fetches nothing)."""
    root = Path(image_dir).resolve() if image_dir is not None else None

    def load(url: str, param: str):
        if url.startswith("data:"):
            try:
                return decode_data_url(url)
            except ValueError as e:
                raise _bad(param, str(e)) from None
        if url.startswith(("http://", "https://")):
            raise _bad(param, "remote image URLs are not fetched; send the image as a base64 data URL")
        path = url[len("file://"):] if url.startswith("file://") else url
        if root is None:
            raise _bad(param, "file paths are refused unless the server is started with --image-dir; send the "
                              "image as a base64 data URL")
        full = (root / path).resolve()
        if not full.is_relative_to(root):
            raise _bad(param, f"the image path must lie inside the server's image directory {root}")
        if not full.is_file():
            raise _bad(param, f"no such image file: {path}")
        return str(full)

    return load


def _chat_messages(messages: Any, served: ServedModel, load_image) -> tuple[list[dict], list]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of messages")
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, f"must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role", f"must be one of {sorted(_ROLES)}, got {role!r}")
        unknown = sorted(set(m) - {"role", "content", "name", "reasoning_content"})
        if unknown:
            raise _bad(f"{where}.{unknown[0]}", "is not supported (no tool calls)")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                pw = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise _bad(f"{pw}.image_url", "must be {'url': '<data URL or path>'}")
                    if served.kind != "vlm":
                        raise _bad(pw, f"the model {served.name} is a text model; it does not accept images")
                    images.append(load_image(url, f"{pw}.image_url"))
                    parts.append({"type": "image"})
                else:
                    raise _bad(pw, "must be {'type': 'text', 'text': ...} or {'type': 'image_url', "
                                   "'image_url': {'url': ...}}")
            content = parts
        elif content is not None and not isinstance(content, str):
            raise _bad(f"{where}.content", f"must be a string or a list of parts, got {type(content).__name__}")
        msg = {"role": _ROLES[role], "content": content}
        if isinstance(m.get("reasoning_content"), str) and role == "assistant":
            msg["reasoning_content"] = m["reasoning_content"]
        out.append(msg)
    return out, images


def parse_chat_request(body: Any, served: ServedModel, load_image) -> GenerationRequest:
    _check_fields(body, _CHAT_FIELDS)
    _check_model(body, served)
    messages, images = _chat_messages(body.get("messages"), served, load_image)
    try:
        prompt = served.chat_prompt(messages, images)
    except (ValueError, TypeError) as e:
        raise _bad("messages", str(e)) from None
    config, extra = _sampling(body, served, [len(prompt.ids)], None, "messages")
    return GenerationRequest("chat", [prompt], config, **extra, id=f"chatcmpl-{uuid.uuid4().hex}",
                             created=int(time.time()))


def parse_completion_request(body: Any, served: ServedModel) -> GenerationRequest:
    _check_fields(body, _COMPLETION_FIELDS)
    _check_model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        ids = [served.tokenizer.encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        ids = served.tokenizer.batch_encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt):
        ids = [list(p) for p in prompt]
    else:
        raise _bad("prompt", "must be a non-empty string, list of strings, list of token ids or list of token-id "
                             "lists")
    if len(ids) > MAX_N:
        raise _bad("prompt", f"at most {MAX_N} prompts per request, got {len(ids)}")
    image_id = served.model.config.image_token_id if served.kind == "vlm" else None
    for i, p in enumerate(ids):
        if not p:
            raise _bad("prompt", f"prompt {i} is empty")
        try:
            served.check_ids(p, f"prompt {i}")
        except ValueError as e:
            raise _bad("prompt", str(e)) from None
        if image_id is not None and image_id in p:
            raise _bad("prompt", f"prompt {i} holds the image token; send images through /v1/chat/completions")
    config, extra = _sampling(body, served, [len(p) for p in ids], 16, "prompt")
    if len(ids) * extra["n"] > MAX_N:
        raise _bad("n", f"prompts × n must be at most {MAX_N}, got {len(ids)} × {extra['n']}")
    return GenerationRequest("completion", [Prompt(p) for p in ids], config, **extra,
                             id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()))


# ------------------------------------------------------------------------------------------------ rewards
def parse_reward_request(body: Any, served: ServedModel) -> list[list[int]]:
    """``{"model"?, "input": ITEM | [ITEM, ...]}`` → token ids per item; see ``docs/serve.md``."""
    _check_fields(body, {"model", "input"})
    _check_model(body, served)
    items = body.get("input")
    if isinstance(items, (str, dict)):
        items = [items]
    if not isinstance(items, list) or not items:
        raise _bad("input", "must be a string, an object, or a non-empty list of them")
    out = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if isinstance(item, str):
            if not item:
                raise _bad(where, "is an empty string")
            ids = served.tokenizer.encode(item)
        elif isinstance(item, dict) and "role" in item:
            raise _bad(where, "is a message; wrap a conversation as {'messages': [...]}")
        elif isinstance(item, dict) and set(item) == {"messages"}:
            ids = _render(served, _chat_messages(item["messages"], served, None)[0], f"{where}.messages")
        elif isinstance(item, dict) and set(item) == {"prompt", "response"}:
            msgs = []
            for key, role in (("prompt", "user"), ("response", "assistant")):
                v = item[key]
                if isinstance(v, str):
                    msgs.append({"role": role, "content": v})
                else:
                    msgs += _chat_messages(v, served, None)[0]
            ids = _render(served, msgs, where)
        else:
            raise _bad(where, "must be a string, {'messages': [...]} or {'prompt': ..., 'response': ...}")
        if len(ids) > served.max_model_len:
            raise APIError(400, f"This model's maximum context length is {served.max_model_len} tokens. However, "
                                f"{where} resulted in {len(ids)} tokens.", param=where,
                           code="context_length_exceeded")
        out.append(ids)
    return out


def _render(served: ServedModel, messages: list[dict], where: str) -> list[int]:
    try:
        return list(served.tokenizer.apply_chat_template(messages).input_ids)
    except (ValueError, TypeError) as e:
        raise _bad(where, str(e)) from None


# ------------------------------------------------------------------------------------------------ responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(req: GenerationRequest, model: str, texts: list[str], reasons: list[str], u: dict) -> dict:
    return {"id": req.id, "object": "chat.completion", "created": req.created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                         "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))],
            "usage": u, "system_fingerprint": None}


def completion_response(req: GenerationRequest, model: str, texts: list[str], reasons: list[str], u: dict) -> dict:
    return {"id": req.id, "object": "text_completion", "created": req.created, "model": model,
            "choices": [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                        for i, (t, r) in enumerate(zip(texts, reasons))], "usage": u, "system_fingerprint": None}


def stream_chunk(req: GenerationRequest, model: str, index: int | None, text: str | None = None,
                 finish: str | None = None, first: bool = False, u: dict | None = None) -> dict:
    """One server-sent event: a text delta and/or a finish reason of choice ``index``; with ``u`` the final
    usage-only chunk (no choices)."""
    if req.kind == "chat":
        obj = "chat.completion.chunk"
        delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        obj = "text_completion"
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
    out = {"id": req.id, "object": obj, "created": req.created, "model": model,
           "choices": [] if u is not None else [choice], "system_fingerprint": None}
    if u is not None:
        out["usage"] = u
    return out
