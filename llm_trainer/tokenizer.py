"""`Tokenizer`: a thin, explicit wrapper over the Hugging Face `tokenizers` library, plus chat templates and
byte-level BPE training.

Loading
-------
``Tokenizer(path)`` takes a ``tokenizer.json`` file or a folder holding one. A ``tokenizer_config.json`` next to it
(Hugging Face layout) supplies the special tokens (``eos_token``, ``bos_token``, ``pad_token``, ``unk_token``; a string
or ``{"content": ...}``) and extra ``added_tokens_decoder`` / ``additional_special_tokens`` entries.

Chat templates (see :mod:`llm_trainer.chat`): the model's own Jinja template — ``chat_template.jinja`` /
``additional_chat_templates/*.jinja`` beside ``tokenizer.json``, else ``tokenizer_config.json``'s ``chat_template``
(a string, or named templates) — rendered sandboxed exactly as ``transformers`` renders it. Without one, the built-in
named by ``llm_trainer_chat_template`` (tokenizers trained here), else a built-in guessed from the vocabulary
(``<|im_start|>`` → chatml, ``<|start_header_id|>`` → llama3, otherwise plain; a warning says so on first use).
``llm_trainer_chat_template_kwargs`` holds default template variables (e.g. ``{"enable_thinking": false}``).

Special-token fallbacks when ``tokenizer_config.json`` names none: eos = the first of ``<|endoftext|>``,
``<|end_of_text|>``, ``</s>``, ``<eos>`` present; pad = ``<pad>``/``<|pad|>`` if present, else eos.

Encoding
--------
``encode(text)`` does **not** add the tokenizer's post-processor tokens (e.g. Llama 3's BOS) unless
``add_special_tokens=True``: chat templates write their own special tokens, and pretraining code appends eos itself.
Special-token strings inside ``text`` are always recognised as single tokens.
"""
from __future__ import annotations

import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

from llm_trainer.chat import TEMPLATES, ChatTemplate, detect_builtin, get_builtin, render_conversation, spans_to_mask
from llm_trainer.chat.jinja import prepare_messages
from llm_trainer.chat.turns import check_control_tokens, end_of_turn
from llm_trainer.chat.templates import config_entry, load_model_templates, select

__all__ = ["Tokenizer", "ChatEncoding", "train_tokenizer", "default_special_tokens", "TEMPLATES"]

_EOS_FALLBACKS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_PAD_FALLBACKS = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>")
_IMAGE_TOKENS = ("<image>", "<|image_pad|>", "<|image|>")


@dataclass
class ChatEncoding:
    """Token ids of a rendered conversation and a 0/1 mask of the tokens an SFT model should learn."""

    input_ids: list[int]
    assistant_mask: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    def labels(self, ignore_index: int = -100) -> list[int]:
        """``input_ids`` where the mask is 1, ``ignore_index`` elsewhere (unshifted; the loss shifts)."""
        return [t if m else ignore_index for t, m in zip(self.input_ids, self.assistant_mask)]


def _token_content(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    raise ValueError(f"cannot read a special token from {v!r} (expected a string or {{'content': ...}})")


class Tokenizer:
    """See the module docstring. Construct from a path, or wrap an in-memory ``tokenizers.Tokenizer`` with
    :meth:`from_tokenizers`."""

    def __init__(self, path: str | os.PathLike | None = None, *, chat_template: str | None = None,
                 chat_template_kwargs: Mapping[str, Any] | None = None,
                 _backend: _HFTokenizer | None = None, _config: dict | None = None):
        folder, cfg_name = None, "tokenizer_config.json"
        if _backend is not None:
            self._tok = _backend
            config = dict(_config or {})
            self.path = None
        else:
            if path is None:
                raise TypeError("Tokenizer needs a path to a tokenizer.json file or a folder holding one")
            p = Path(path)
            if p.is_dir():
                file = p / "tokenizer.json"
                if not file.is_file():
                    raise FileNotFoundError(f"no tokenizer.json in {p} (folders with only vocab/merges or "
                                            "sentencepiece files are not supported; convert to tokenizer.json)")
            elif p.is_file():
                file = p
            else:
                raise FileNotFoundError(f"tokenizer path does not exist: {p}")
            try:
                self._tok = _HFTokenizer.from_file(str(file))
            except Exception as e:  # the Rust error names no file
                raise ValueError(f"cannot read tokenizer file {file}: {e}") from e
            config = {}
            folder = file.parent
            cfg_file = folder / "tokenizer_config.json"
            cfg_name = str(cfg_file)
            if cfg_file.is_file():
                try:
                    config = json.loads(cfg_file.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{cfg_file}: invalid JSON: {e}") from e
            self.path = str(file)
        self._config = config
        self._register_config_tokens(config)
        self._atoms: re.Pattern | None = None
        self._eot_cache: dict[str, str | None] = {}

        self.eos_token = _token_content(config.get("eos_token")) or self._first_present(_EOS_FALLBACKS)
        self.bos_token = _token_content(config.get("bos_token"))
        self.unk_token = _token_content(config.get("unk_token"))
        self.pad_token = _token_content(config.get("pad_token")) or self._first_present(_PAD_FALLBACKS) \
            or self.eos_token
        for name in ("eos_token", "bos_token", "unk_token", "pad_token"):
            tok = getattr(self, name)
            if tok is not None and self._tok.token_to_id(tok) is None:
                raise ValueError(f"{name} {tok!r} from tokenizer_config.json is not in the vocabulary")

        # the model's own templates; one identical to a built-in is that built-in (tokenizers saved here)
        self._model_templates = {name: next((b for b in TEMPLATES.values() if b.source == t.source), t)
                                 for name, t in load_model_templates(folder, config, cfg_name).items()}
        builtin = config.get("llm_trainer_chat_template")
        self._guessed_template = builtin is None and not self._model_templates
        self._builtin = get_builtin(builtin).name if builtin is not None else \
            detect_builtin(lambda t: self._tok.token_to_id(t) is not None)
        #: default variables for every chat template render (call arguments override them), e.g. enable_thinking
        self.chat_template_kwargs: dict[str, Any] = dict(config.get("llm_trainer_chat_template_kwargs") or {})
        self.chat_template_kwargs.update(chat_template_kwargs or {})
        self.chat_template = chat_template

    # ------------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_tokenizers(cls, tokenizer: _HFTokenizer, *, eos_token: str | None = None, bos_token: str | None = None,
                        pad_token: str | None = None, unk_token: str | None = None,
                        chat_template: str | None = None) -> "Tokenizer":
        """Wrap an in-memory ``tokenizers.Tokenizer``; ``chat_template``: a built-in's name or Jinja source."""
        config = {k: v for k, v in dict(eos_token=eos_token, bos_token=bos_token, pad_token=pad_token,
                                         unk_token=unk_token).items() if v is not None}
        if chat_template in TEMPLATES:
            config["llm_trainer_chat_template"] = chat_template
        elif chat_template is not None:
            config["chat_template"] = chat_template
        return cls(_backend=tokenizer, _config=config)

    def _register_config_tokens(self, config: dict) -> None:
        """Add tokens that tokenizer_config.json declares but tokenizer.json lacks (rare, but HF allows it)."""
        new: list[AddedToken] = []
        decoder = config.get("added_tokens_decoder") or {}
        for _, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = _token_content(spec)
            if content and self._tok.token_to_id(content) is None:
                new.append(AddedToken(content, special=bool(spec.get("special", True)) if isinstance(spec, dict)
                                      else True, normalized=False))
        for t in config.get("additional_special_tokens") or []:
            content = _token_content(t)
            if content and self._tok.token_to_id(content) is None and all(a.content != content for a in new):
                new.append(AddedToken(content, special=True, normalized=False))
        if new:
            self._tok.add_tokens(new)

    def _first_present(self, candidates: Iterable[str]) -> str | None:
        for c in candidates:
            if self._tok.token_to_id(c) is not None:
                return c
        return None

    def add_special_tokens(self, tokens: Sequence[str], special: bool = True) -> int:
        """Add tokens (as single, never-split tokens); returns how many were new. Resize the model's embeddings after."""
        self._atoms = None
        return self._tok.add_tokens([AddedToken(t, special=special, normalized=False) for t in tokens])

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    # ----------------------------------------------------------------------------------------------------- vocab
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding may be larger, e.g. padded to 64)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def image_token(self) -> str | None:
        return self._first_present(_IMAGE_TOKENS)

    @property
    def image_token_id(self) -> int | None:
        return self._id(self.image_token)

    @property
    def special_tokens(self) -> list[str]:
        return [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end generation under the current chat template: its end-of-turn token, then eos (deduplicated)."""
        return self.chat_stop_token_ids()

    def chat_stop_token_ids(self, template: str | None = None) -> list[int]:
        """The end-of-turn token of ``template`` (default: the tokenizer's), then eos. A built-in declares its token;
        for a model's template it is the first special token the template writes after an assistant's content."""
        tpl = self.get_chat_template(template)
        eot = tpl.end_of_turn if tpl.builtin else self._probe_end_of_turn(tpl)
        return list(dict.fromkeys(i for i in (self._id(eot), self.eos_token_id) if i is not None))

    def _probe_end_of_turn(self, tpl: ChatTemplate) -> str | None:
        if tpl.source not in self._eot_cache:
            self._eot_cache[tpl.source] = end_of_turn(tpl, self._template_tokens(tpl), self._control_tokens(),
                                                      set(self.special_tokens))
        return self._eot_cache[tpl.source]

    # ------------------------------------------------------------------------------------------------- encoding
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def batch_encode(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        if isinstance(texts, str):
            raise TypeError("batch_encode expects a list of strings; use encode for one string")
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Any, skip_special_tokens: bool = True) -> list[str]:
        if hasattr(batch, "tolist"):
            batch = batch.tolist()
        return self._tok.decode_batch([[int(i) for i in ids] for ids in batch],
                                      skip_special_tokens=skip_special_tokens)

    __call__ = encode

    # ---------------------------------------------------------------------------------------------- chat template
    @property
    def chat_template(self) -> str:
        """Name of the template :meth:`apply_chat_template` uses by default: a built-in's name (``chatml``, ...), the
        model template's name (``default``, or a named template's), or ``custom``. Assign a name or Jinja source."""
        return self.get_chat_template().name

    @chat_template.setter
    def chat_template(self, name: str | None) -> None:
        old, self._default_template = getattr(self, "_default_template", None), name
        try:
            self.get_chat_template()
        except ValueError:
            self._default_template = old
            raise
        if name is not None:  # chosen, not guessed
            self._guessed_template = False

    @property
    def chat_templates(self) -> dict[str, ChatTemplate]:
        """The model's own templates by name (empty for tokenizers without one), then the built-ins."""
        return {**self._model_templates, **{n: t for n, t in TEMPLATES.items() if n not in self._model_templates}}

    def get_chat_template(self, template: str | None = None, tools: Any = None) -> ChatTemplate:
        """The :class:`~llm_trainer.chat.ChatTemplate` for ``template`` (a name or Jinja source; default: the
        tokenizer's, ``tool_use`` when ``tools`` are given and the model has it)."""
        return select(self._model_templates, self._builtin, template or self._default_template, tools)

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                            tokenize: bool = True, template: str | None = None, *,
                            tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None,
                            reasoning_history: str = "template",
                            **template_kwargs: Any) -> "ChatEncoding | str":
        """Render a conversation with a chat template (see :mod:`llm_trainer.chat`); the same string and ids as
        ``transformers``' ``apply_chat_template`` for the same tokenizer files.

        ``template``: a template name or Jinja source (default: :attr:`chat_template`). ``tools`` / ``documents``:
        JSON-schema dicts / ``{"title", "text"}`` dicts handed to the template. ``template_kwargs`` (over
        :attr:`chat_template_kwargs`): extra template variables such as ``enable_thinking=False``.
        ``reasoning_history``: ``"template"``, ``"keep"`` or ``"drop"`` — how earlier turns' reasoning is rendered
        (:mod:`llm_trainer.chat.turns`). ``tokenize=False`` returns the string. ``tokenize=True`` returns
        :class:`ChatEncoding`: the ids of the whole string (no post-processor tokens added), and a mask that is 1 on
        every token overlapping assistant output — the template's ``{% generation %}`` blocks (equal to
        ``transformers``' ``assistant_masks``), else each assistant turn found by rendering prefixes of the
        conversation. Errors (:class:`~llm_trainer.chat.ChatTemplateError`, a ``ValueError``) name the template
        and the message.
        """
        for name, value in (("tools", tools), ("documents", documents)):
            if value is not None and (isinstance(value, (str, Mapping)) or not isinstance(value, Sequence)
                                      or not all(isinstance(x, Mapping) for x in value)):
                raise TypeError(f"{name} must be a list of dicts (JSON schemas / documents), got {value!r:.80}")
        tpl = self.get_chat_template(template, tools)
        if self._guessed_template and template is None and tpl.builtin:
            self._guessed_template = False
            warnings.warn(f"the tokenizer {self.path or ''} has no chat template; using the built-in {tpl.name!r} "
                          "template, guessed from its vocabulary (pass template= to choose)", stacklevel=2)
        variables = {**self._template_tokens(tpl), **self.chat_template_kwargs, **template_kwargs}
        rendered = render_conversation(tpl, messages, add_generation_prompt=add_generation_prompt,
                                       variables=variables, tools=tools, documents=documents,
                                       reasoning_history=reasoning_history, with_spans=tokenize,
                                       atoms=self._control_tokens())
        if not tokenize:
            return rendered.text
        check_control_tokens(tpl, rendered.text, lambda t: self._tok.token_to_id(t) is not None, messages,
                             variables=variables, tools=tools, documents=documents)
        enc = self._tok.encode(rendered.text, add_special_tokens=False)
        return ChatEncoding(enc.ids, spans_to_mask(rendered.spans, enc.offsets))

    def _template_tokens(self, tpl: ChatTemplate) -> dict[str, str]:
        """The special-token variables ``transformers`` passes to templates (``bos_token``, ``eos_token``, ...)."""
        out = {name: value for name in ("bos_token", "eos_token", "unk_token", "pad_token")
               if (value := getattr(self, name)) is not None}
        for name in ("sep_token", "cls_token", "mask_token"):
            if (value := _token_content(self._config.get(name))) is not None:
                out[name] = value
        if tpl.builtin:
            out["image_token"] = self.image_token or "<image>"
        return out

    def _control_tokens(self) -> re.Pattern:
        """Matches any added token (longest first): prefix comparisons and probes never split one."""
        if self._atoms is None:
            tokens = sorted({t.content for t in self._tok.get_added_tokens_decoder().values()}, key=len, reverse=True)
            self._atoms = re.compile("|".join(map(re.escape, tokens)) or "(?!)")
        return self._atoms

    # ------------------------------------------------------------------------------------------------------ save
    def save(self, directory: str | os.PathLike) -> str:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (Hugging Face layout, loadable by
        ``transformers.AutoTokenizer`` with the same chat template(s)). Returns the directory."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        config = dict(self._config)
        for name in ("eos_token", "bos_token", "pad_token", "unk_token"):
            value = getattr(self, name)
            if value is not None:
                config[name] = value
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "special": t.special, "single_word": t.single_word,
                     "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized}
            for i, t in sorted(self._tok.get_added_tokens_decoder().items())}
        tpl = self.get_chat_template()
        config["llm_trainer_chat_template"] = tpl.name if tpl.builtin else self._builtin
        is_model = self._model_templates.get(tpl.name) is tpl
        config["chat_template"] = config_entry(self._model_templates) if is_model else tpl.source
        config.pop("llm_trainer_chat_template_kwargs", None)
        if self.chat_template_kwargs:
            config["llm_trainer_chat_template_kwargs"] = dict(self.chat_template_kwargs)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("model_max_length", 1 << 30)
        config.setdefault("clean_up_tokenization_spaces", False)
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
        return str(d)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, pad={self.pad_token!r}, "
                f"bos={self.bos_token!r}, chat_template={self.chat_template!r})")


# ============================================================================================= tokenizer training
def default_special_tokens(template: str = "chatml") -> tuple[list[str], list[str]]:
    """(special tokens, plain added tokens) that :func:`train_tokenizer` reserves for a chat template.

    ``<think>``/``</think>`` are added as normal (non-special) tokens, as Qwen3 does, so that decoding with
    ``skip_special_tokens=True`` keeps them (reward functions look for them)."""
    get_builtin(template)
    plain = ["<think>", "</think>"]
    if template == "llama3":
        special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<image>", "<pad>"]
    elif template == "chatml":
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<pad>"]
    else:
        special = ["<|endoftext|>", "<image>", "<pad>"]
    return special, plain


# The Qwen2 / Llama 3 pre-tokenizer split: newline runs and digits are kept apart, so a chat template's
# "header\n" + "answer" tokenizes the same whether encoded together or apart.
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _iter_corpus(files: Sequence[str], text_field: str) -> Iterator[str]:
    for f in files:
        try:
            yield from _iter_file(f, text_field)
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _iter_file(f: str, text_field: str) -> Iterator[str]:
    if True:
        suffix = Path(f).suffix.lower()
        with open(f, encoding="utf-8") as fh:
            if suffix == ".jsonl":
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{f}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                    if isinstance(obj, dict) and isinstance(obj.get(text_field), str):
                        yield obj[text_field]
                    elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                        try:
                            msgs = prepare_messages(obj["messages"])
                        except (TypeError, ValueError) as e:
                            raise ValueError(f"{f}:{lineno}: {e}") from None
                        for m in msgs:
                            yield from _message_texts(m)
                    else:
                        raise ValueError(f"{f}:{lineno}: expected a JSON object with a string {text_field!r} field or "
                                         f"a 'messages' list")
            else:
                # keep newlines: chat formats depend on "\n" / "\n\n" merges
                buf: list[str] = []
                size = 0
                for line in fh:
                    buf.append(line)
                    size += len(line)
                    if size >= 1 << 16:
                        yield "".join(buf)
                        buf, size = [], 0
                if buf:
                    yield "".join(buf)


def _message_texts(message: Mapping) -> Iterator[str]:
    """A chat message's reasoning and text (string content, or the text parts of a list)."""
    if isinstance(message.get("reasoning_content"), str) and message["reasoning_content"]:
        yield message["reasoning_content"]
    content = message.get("content")
    parts = content if isinstance(content, list) else [content]
    for part in parts:
        text = part.get("text") if isinstance(part, Mapping) and part.get("type") == "text" else part
        if isinstance(text, str) and text:
            yield text


def _expand_files(files: Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out: list[str] = []
    for f in files:
        p = Path(f)
        if p.is_dir():
            found = sorted(str(x) for x in p.rglob("*") if x.is_file() and x.suffix.lower() in (".txt", ".jsonl"))
            if not found:
                raise FileNotFoundError(f"no .txt or .jsonl files under {p}")
            out += found
        elif p.is_file():
            if p.suffix.lower() not in (".txt", ".jsonl", ".md", ".text"):
                raise ValueError(f"{p}: unsupported file type {p.suffix!r} (use .txt or .jsonl)")
            out.append(str(p))
        else:
            raise FileNotFoundError(f"training file not found: {p}")
    if not out:
        raise ValueError("no training files given")
    return out


def train_tokenizer(files: Sequence[str | os.PathLike], vocab_size: int, output_dir: str | os.PathLike | None = None,
                    *, template: str = "chatml", special_tokens: Sequence[str] | None = None,
                    added_tokens: Sequence[str] | None = None, min_frequency: int = 2, text_field: str = "text",
                    eos_token: str | None = None, pad_token: str | None = None, bos_token: str | None = None,
                    show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer (Qwen2/Llama 3 style pre-tokenizer, all 256 bytes in the base alphabet, so
    every string round-trips exactly) on ``.txt`` files (read with newlines kept) and ``.jsonl`` files (one object per
    line: a ``text_field`` string, or a chat ``messages`` list whose contents and think blocks are used).

    ``vocab_size`` counts everything: bytes, merges, special and added tokens. Special tokens default to those of
    ``template`` (:func:`default_special_tokens`); the first special token is the eos unless ``eos_token`` is given.
    Writes ``tokenizer.json`` + ``tokenizer_config.json`` to ``output_dir`` when given.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers, Regex

    get_builtin(template)
    paths = _expand_files(files)
    default_special, default_added = default_special_tokens(template)
    special = list(special_tokens) if special_tokens is not None else default_special
    added = [t for t in (list(added_tokens) if added_tokens is not None else default_added) if t not in special]
    if len(set(special)) != len(special):
        raise ValueError(f"duplicate special tokens: {special}")
    min_size = 256 + len(special) + len(added)
    if not isinstance(vocab_size, int) or vocab_size < min_size:
        raise ValueError(f"vocab_size must be an int >= {min_size} (256 bytes + {len(special)} special + "
                         f"{len(added)} added tokens), got {vocab_size!r}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")

    tok = _HFTokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added), min_frequency=min_frequency,
        # the Rust progress bar draws with cursor movements; without a terminal it prints only blank lines
        show_progress=show_progress and sys.stdout.isatty() and sys.stderr.isatty(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if show_progress:
        total = sum(os.path.getsize(p) for p in paths)
        print(f"train_tokenizer: {len(paths)} file(s), {total / 1e6:.1f} MB, target vocab {vocab_size}", flush=True)
    tok.train_from_iterator(_iter_corpus(paths, text_field), trainer=trainer)
    if added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])

    if eos_token is None:
        eos_token = special[0] if special else None
        if template == "llama3" and "<|end_of_text|>" in special:
            eos_token = "<|end_of_text|>"
    if pad_token is None:
        pad_token = "<pad>" if "<pad>" in special else eos_token
    if bos_token is None and template == "llama3" and "<|begin_of_text|>" in special:
        bos_token = "<|begin_of_text|>"
    config = {k: v for k, v in dict(eos_token=eos_token, pad_token=pad_token, bos_token=bos_token).items() if v}
    config["llm_trainer_chat_template"] = template
    result = Tokenizer(_backend=tok, _config=config)
    if output_dir is not None:
        result.save(output_dir)
        result.path = str(Path(output_dir) / "tokenizer.json")
    if show_progress:
        where = f", wrote {output_dir}" if output_dir is not None else ""
        print(f"train_tokenizer: vocab size {result.vocab_size}{where}", flush=True)
    return result
