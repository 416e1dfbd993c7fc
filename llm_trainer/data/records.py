"""Per-record encoding for ``prepare_data``: one parsed JSON record → token arrays, in a worker process.

:class:`RecordEncoder` checks each field a stage reads and raises :class:`BadRecord` (field, reason) for anything it
cannot use; :func:`encode_chunk` turns a chunk of jsonl lines into compact numpy arrays plus ``(line, field, reason)``
errors, which :func:`llm_trainer.data.prepare.prepare` reports (or skips) naming the file. Every chat record goes
through :meth:`llm_trainer.tokenizer.Tokenizer.apply_chat_template`, so ids and loss masks are exactly the tokenizer's.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from llm_trainer.chat import REASONING_FIELDS, ChatTemplateError

__all__ = ["BadRecord", "RecordEncoder", "ChunkOut", "encode_chunk", "init_worker"]

_SURROGATE = re.compile("[\ud800-\udfff]")


class BadRecord(Exception):
    """A record field that cannot be used: ``field`` (None: the whole line) and ``reason``."""

    def __init__(self, field_name: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field_name, reason


class RecordEncoder:
    """Turns one parsed JSON record into token arrays. Lives in each worker process."""

    def __init__(self, tokenizer: Any, stage: str, template: str | None, max_length: int | None,
                 image_field: str | None, text_field: str, template_kwargs: dict | None = None,
                 reasoning_history: str = "template"):
        self.tok, self.stage, self.template = tokenizer, stage, template
        self.max_length, self.image_field, self.text_field = max_length, image_field, text_field
        self.template_kwargs, self.reasoning_history = dict(template_kwargs or {}), reasoning_history
        self.tools: list | None = None  # the current record's tools
        self.eos = tokenizer.eos_token_id
        self.image_id = tokenizer.image_token_id

    # ------------------------------------------------------------------------------------------------ fields
    @staticmethod
    def _get(obj: dict, name: str) -> Any:
        if name not in obj:
            raise BadRecord(name, "missing field")
        return obj[name]

    def _str(self, obj: dict, name: str, allow_empty: bool = False) -> str:
        v = self._get(obj, name)
        if not isinstance(v, str):
            raise BadRecord(name, f"expected a string, got {type(v).__name__}")
        if not allow_empty and not v.strip():
            raise BadRecord(name, "empty string")
        return v

    @staticmethod
    def _check_messages(v: Any, name: str) -> list[dict]:
        if not isinstance(v, list):
            raise BadRecord(name, f"expected a list of messages, got {type(v).__name__}")
        if not v:
            raise BadRecord(name, "empty list of messages")
        for j, m in enumerate(v):
            if not isinstance(m, dict):
                raise BadRecord(name, f"message {j} must be an object with 'role' and 'content', got "
                                      f"{type(m).__name__}")
            role = m.get("role")
            if not isinstance(role, str):
                raise BadRecord(name, f"message {j} has no string 'role'")
            c = m.get("content")
            if c is None and not (role == "assistant" and (m.get("tool_calls") or
                                                           any(m.get(k) for k in REASONING_FIELDS))):
                raise BadRecord(name, f"message {j} (role {role!r}): 'content' is "
                                      f"{'null' if 'content' in m else 'missing'} (only an assistant message with "
                                      "tool_calls or reasoning may have none)")
            if c is not None and not isinstance(c, (str, list)):
                raise BadRecord(name, f"message {j}: 'content' must be a string or a list of parts, got "
                                      f"{type(c).__name__}")
            for k in REASONING_FIELDS:
                if m.get(k) is not None and not isinstance(m[k], str):
                    raise BadRecord(name, f"message {j}: {k!r} must be a string, got {type(m[k]).__name__}")
        return v

    def _turns(self, obj: dict, name: str, role: str) -> list[dict]:
        """A string (one message of ``role``) or a list of messages."""
        v = self._get(obj, name)
        if isinstance(v, str):
            if not v.strip():
                raise BadRecord(name, "empty string")
            return [{"role": role, "content": v}]
        return self._check_messages(v, name)

    def _chat(self, messages: list[dict], name: str, add_generation_prompt: bool = False):
        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                template=self.template, tools=self.tools,
                                                reasoning_history=self.reasoning_history, **self.template_kwargs)
        except ChatTemplateError as e:  # names the template and the message
            raise BadRecord(name, str(e)) from None
        except (ValueError, TypeError, KeyError) as e:
            raise BadRecord(name, f"cannot apply the chat template: {e}") from None

    def _images(self, obj: dict, *token_lists: list[int]) -> list[str] | None:
        if self.image_field is None:
            return None
        v = obj.get(self.image_field)
        if v is None:
            paths: list[str] = []
        elif isinstance(v, str):
            paths = [v] if v else []
        elif isinstance(v, list) and all(isinstance(p, str) and p for p in v):
            paths = list(v)
        else:
            raise BadRecord(self.image_field, "expected an image path or a list of image paths")
        if paths and self.image_id is None:
            raise BadRecord(self.image_field, "the tokenizer has no image placeholder token (<image>)")
        for ids in token_lists:
            n = sum(1 for t in ids if t == self.image_id) if self.image_id is not None else 0
            if n != len(paths):
                raise BadRecord(self.image_field, f"{len(paths)} image path(s) but {n} image placeholder(s) "
                                             f"{self.tok.image_token!r} in the text")
        return paths

    def _keep_images(self, paths: list[str] | None, ids: list[int]) -> list[str] | None:
        if not paths:
            return paths
        return paths[:sum(1 for t in ids if t == self.image_id)]

    # ------------------------------------------------------------------------------------------------ stages
    def encode(self, obj: dict, out: "ChunkOut") -> None:
        _check_values(obj)
        tools = obj.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise BadRecord("tools", "expected a list of tool schemas (JSON objects)")
        self.tools = tools
        getattr(self, "_" + ("dpo" if self.stage == "reward" else self.stage))(obj, out)

    def _pretrain(self, obj: dict, out: "ChunkOut") -> None:
        ids = self.tok.encode(self._str(obj, self.text_field))
        if self.max_length is not None and len(ids) + 1 > self.max_length:
            ids = ids[:self.max_length - 1]
            out.truncated += 1
        out.seq(ids + [self.eos])
        out.records += 1

    def _sft(self, obj: dict, out: "ChunkOut") -> None:
        if "messages" in obj:
            msgs = self._check_messages(obj["messages"], "messages")
            name = "messages"
        elif "prompt" in obj or "response" in obj:
            msgs = [{"role": "user", "content": self._str(obj, "prompt")},
                    {"role": "assistant", "content": self._str(obj, "response")}]
            if "system" in obj:
                msgs.insert(0, {"role": "system", "content": self._str(obj, "system", allow_empty=True)})
            name = "prompt"
        else:
            raise BadRecord("messages", "missing field (an SFT record needs 'messages', or 'prompt' and 'response')")
        enc = self._chat(msgs, name)
        ids, mask = list(enc.input_ids), list(enc.assistant_mask)
        if not any(mask):
            raise BadRecord(name, "no assistant message: nothing to train on")
        images = self._images(obj, ids)
        if self.max_length is not None and len(ids) > self.max_length:
            ids, mask = ids[:self.max_length], mask[:self.max_length]
            if not any(mask):
                out.dropped += 1
                return
            out.truncated += 1
            images = self._keep_images(images, ids)
        out.seq(ids, mask)
        out.image(images)
        out.records += 1

    def _dpo(self, obj: dict, out: "ChunkOut") -> None:
        prompt = self._turns(obj, "prompt", "user")
        chosen = self._turns(obj, "chosen", "assistant")
        rejected = self._turns(obj, "rejected", "assistant")
        if chosen == rejected:
            raise BadRecord("rejected", "identical to 'chosen'")
        c = self._chat(prompt + chosen, "chosen")
        r = self._chat(prompt + rejected, "rejected")
        for name, enc in (("chosen", c), ("rejected", r)):
            if not any(enc.assistant_mask):
                raise BadRecord(name, "no assistant message: nothing to train on")
        gen = list(self._chat(prompt, "prompt", add_generation_prompt=True).input_ids)
        cid, rid = list(c.input_ids), list(r.input_ids)
        cm, rm = list(c.assistant_mask), list(r.assistant_mask)
        if cid[:len(gen)] == gen and rid[:len(gen)] == gen:
            plen = len(gen)
        else:  # a template whose prompt is not a prefix: fall back to the shared prefix
            plen = next((k for k, (a, b) in enumerate(zip(cid, rid)) if a != b), min(len(cid), len(rid)))
        if cid == rid:
            raise BadRecord("rejected", "tokenises identically to 'chosen'")
        images = self._images(obj, cid[:plen])
        if self.max_length is not None and max(len(cid), len(rid)) > self.max_length:
            if plen >= self.max_length:
                out.dropped += 1
                return
            cid, cm, rid, rm = cid[:self.max_length], cm[:self.max_length], rid[:self.max_length], rm[:self.max_length]
            out.truncated += 1
        out.seq(cid, cm)
        out.seq(rid, rm)
        out.plen.append(plen)
        out.image(images)
        out.records += 1

    def _rl(self, obj: dict, out: "ChunkOut") -> None:
        prompt = self._turns(obj, "prompt", "user")
        ids = list(self._chat(prompt, "prompt", add_generation_prompt=True).input_ids)
        answer = obj.get("answer")
        if answer is None:
            text = ""
        elif isinstance(answer, str):
            text = answer
        elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
            text = str(answer)  # finite: _check_values rejects NaN and infinities
        else:
            raise BadRecord("answer", f"expected a string or a number, got {type(answer).__name__}")
        images = self._images(obj, ids)
        if self.max_length is not None and len(ids) > self.max_length:
            out.dropped += 1
            return
        out.seq(ids)
        out.answer(self.tok.encode(text) if text else [], text)
        out.image(images)
        out.records += 1


def _check_values(record: dict) -> None:
    """Reject what ``json`` accepts but no tokenizer or reward can use: lone surrogates (``"\\ud800"``, an unpaired
    escape) and NaN/Infinity (not JSON). The error names the top-level field and the path inside it."""
    for name, value in record.items():
        _check_value(value, name, name)


def _check_value(value: Any, field: str, path: str) -> None:
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        if m:
            raise BadRecord(field, f"{path} has a lone surrogate \\u{ord(m.group(0)):04x} at character {m.start()} "
                                   "(an unpaired \\u escape in the JSON: not valid Unicode)")
    elif isinstance(value, float) and not math.isfinite(value):
        raise BadRecord(field, f"{path} is {value!r}, not a finite number (NaN and Infinity are not JSON)")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_value(v, field, f"{path}.{k}")
    elif isinstance(value, list):
        for j, v in enumerate(value):
            _check_value(v, field, f"{path}[{j}]")


class ChunkOut:
    """Token arrays of one chunk, built in a worker and shipped back as compact numpy arrays."""

    def __init__(self):
        self.tokens: list[int] = []
        self.lengths: list[int] = []
        self.mask: list[int] = []
        self.plen: list[int] = []
        self.ans: list[int] = []
        self.ans_len: list[int] = []
        self.txt = bytearray()
        self.txt_len: list[int] = []
        self.img = bytearray()
        self.img_len: list[int] = []
        self.records = 0
        self.truncated = 0
        self.dropped = 0
        self.errors: list[tuple[int, str | None, str]] = []

    def seq(self, ids: list[int], mask: list[int] | None = None) -> None:
        self.tokens += ids
        self.lengths.append(len(ids))
        if mask is not None:
            self.mask += mask

    def answer(self, ids: list[int], text: str) -> None:
        self.ans += ids
        self.ans_len.append(len(ids))
        b = text.encode("utf-8")
        self.txt += b
        self.txt_len.append(len(b))

    def image(self, paths: list[str] | None) -> None:
        if paths is not None:
            b = "\0".join(paths).encode("utf-8")
            self.img += b
            self.img_len.append(len(b))

    def pack(self) -> dict:
        return {"tokens": np.asarray(self.tokens, np.uint32), "lengths": np.asarray(self.lengths, np.int64),
                "mask": np.asarray(self.mask, np.uint8), "plen": np.asarray(self.plen, np.int32),
                "ans": np.asarray(self.ans, np.uint32), "ans_len": np.asarray(self.ans_len, np.int64),
                "txt": np.frombuffer(bytes(self.txt), np.uint8), "txt_len": np.asarray(self.txt_len, np.int64),
                "img": np.frombuffer(bytes(self.img), np.uint8), "img_len": np.asarray(self.img_len, np.int64),
                "records": self.records, "truncated": self.truncated, "dropped": self.dropped,
                "errors": self.errors}


_ENCODER: RecordEncoder | None = None


def init_worker(*args) -> None:
    global _ENCODER
    _ENCODER = RecordEncoder(*args)


def encode_chunk(job: tuple[str, int, list[bytes]], encoder: RecordEncoder | None = None) -> dict:
    file, first_line, lines = job
    enc = encoder or _ENCODER
    out = ChunkOut()
    for k, raw in enumerate(lines):
        lineno = first_line + k
        if not raw.strip():
            continue
        try:
            try:
                obj = json.loads(raw.rstrip(b"\r\n"))
            except UnicodeDecodeError as e:
                raise BadRecord(None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise BadRecord(None, f"malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise BadRecord(None, f"expected a JSON object, got {type(obj).__name__}")
            before = (len(out.lengths), len(out.tokens), len(out.mask), len(out.plen), len(out.ans), len(out.ans_len),
                      len(out.txt), len(out.txt_len), len(out.img), len(out.img_len))
            try:
                enc.encode(obj, out)
            except BadRecord:
                _rollback(out, before)
                raise
        except BadRecord as e:
            out.errors.append((lineno, e.field, e.reason))
    packed = out.pack()
    packed["file"] = file
    return packed


def _rollback(out: ChunkOut, before: tuple[int, ...]) -> None:
    """Undo a record's partial appends (e.g. chosen written, then the image check failed)."""
    (n_len, n_tok, n_mask, n_plen, n_ans, n_ans_len, n_txt, n_txt_len, n_img, n_img_len) = before
    del out.lengths[n_len:], out.tokens[n_tok:], out.mask[n_mask:], out.plen[n_plen:], out.ans[n_ans:]
    del out.ans_len[n_ans_len:], out.txt[n_txt:], out.txt_len[n_txt_len:], out.img[n_img:], out.img_len[n_img_len:]


