"""Evaluation tasks over local jsonl files (formats in ``docs/evaluation.md``), each an :class:`~.base.Evaluator`.

- :class:`GenerationTask` — generate an answer to each prompt (greedy by default), extract it and compare with the
  reference (``exact_match``), and/or score the completions with a reward function (``reward``): GSM8K-style.
- :class:`MultipleChoiceTask` — the log-likelihood of each choice as a continuation of the prompt; the prediction is
  the most likely choice (``acc``) or the most likely per character (``acc_norm``), the method of
  lm-evaluation-harness (Gao et al. 2021; ``output_type: multiple_choice``).
- :class:`PerplexityTask` — held-out text scored in windows of ``max_length`` input tokens that together predict
  every token once (the first from the BOS/EOS token, as lm-evaluation-harness's rolling log-likelihood): ``nll`` per
  token, ``ppl = exp(nll)`` and ``bits_per_byte``.

All are batched and split over ranks (see :mod:`.base`); prompts are chat-templated with the tokenizer when
``chat=True``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..generation import GenerateConfig, generate
from ..trainers.collective import even_batches, rank_shard
from ..trainers.rewards import RewardSet
from .base import EvalTask, is_prompt, is_text, language_model, loglikelihoods, scatter_sum

__all__ = ["GenerationTask", "MultipleChoiceTask", "PerplexityTask", "EXTRACTORS", "normalize_answer"]

_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")
_GSM8K = re.compile(r"####\s*(-?[$]?\d[\d,]*(?:\.\d+)?)")


def _numbers(text: str) -> list[str]:
    return _NUMBER.findall(text)


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "last_number": lambda t: (_numbers(t) or [None])[-1],
    "first_number": lambda t: (_numbers(t) or [None])[0],
    "gsm8k": lambda t: (m.group(1) if (m := _GSM8K.search(t)) else (_numbers(t) or [None])[-1]),
    "first_line": lambda t: t.strip().split("\n")[0].strip() or None,
    "full": lambda t: t.strip() or None,
}
"""Answer extractors by name: the last / first number of the completion, GSM8K's ``#### <number>`` (else the last
number, lm-evaluation-harness's "flexible" match), the first line, or the whole stripped completion."""


def normalize_answer(text: str | int | float | None) -> str | None:
    """Comparable form of an answer: stripped; a number loses ``$``, thousands commas and a trailing ``.0``."""
    if text is None:
        return None
    s = str(text).strip().rstrip(".")
    num = s.replace(",", "").replace("$", "")
    try:
        value = float(num)
    except ValueError:
        return s
    return str(int(value)) if value.is_integer() else repr(value)


def _is_answer(v: Any) -> str | None:
    ok = isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool))
    return None if ok else "expected a string or a number"


def _is_choices(v: Any) -> str | None:
    if isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) and c for c in v):
        return None
    return "expected a list of at least 2 non-empty strings"


def _prompt_ids(tok: Any, prompt: str | list[dict], chat: bool, system: str | None) -> list[int]:
    if not chat:
        if not isinstance(prompt, str):
            raise ValueError("a chat-message prompt needs chat=True")
        return tok.encode(prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    return list(tok.apply_chat_template(messages, add_generation_prompt=True).input_ids)


@dataclass
class _Completions:
    """The fields a reward function reads (:class:`~llm_trainer.trainers.rewards.RewardSet`)."""

    prompt_text: list[str]
    completion_text: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    answer_text: list[str]
    finished: list[bool]
    answer_ids: None = None

    def __len__(self) -> int:
        return len(self.completion_text)


class GenerationTask(EvalTask):
    """Records ``{"prompt": str | messages, "answer": str | number}``. Metrics: ``exact_match`` (the extracted
    answer equals the reference after :func:`normalize_answer`), ``reward`` (mean of ``reward_fn``, when given: a
    reward function of the RL trainers, called with ``prompts``, ``completions``, ``answers``, ...) and
    ``completion_tokens`` (mean length).

    ``generate_config``: default greedy, 256 new tokens. ``extract``: a name of :data:`EXTRACTORS` or a callable
    ``text -> str | None``. ``chat``: apply the tokenizer's chat template (``system``: a system message first).
    ``log_samples``: append the first N records' prompt, completion, extracted answer and score to
    ``output_dir/eval_<name>.jsonl`` at each evaluation (main rank)."""

    fields = {"prompt": is_prompt, "answer": _is_answer}

    def __init__(self, name: str, data: Any, *, generate_config: GenerateConfig | None = None,
                 extract: str | Callable[[str], str | None] = "last_number", reward_fn: Callable | None = None,
                 chat: bool = True, system: str | None = None, log_samples: int = 0, **kwargs: Any):
        super().__init__(name, data, **kwargs)
        if isinstance(extract, str) and extract not in EXTRACTORS:
            raise ValueError(f"extract={extract!r}: one of {sorted(EXTRACTORS)} or a callable")
        self.extract = EXTRACTORS[extract] if isinstance(extract, str) else extract
        self.generate_config = generate_config or GenerateConfig(max_new_tokens=256, do_sample=False)
        self.rewards = RewardSet(reward_fn) if reward_fn is not None else None
        self.chat, self.system, self.log_samples = chat, system, log_samples
        self._prompts: list[list[int]] | None = None

    def evaluate(self, trainer: Any) -> dict[str, float]:
        tok, backend = self.tokenizer(trainer), trainer.backend
        if self._prompts is None:
            self._prompts = [_prompt_ids(tok, it["prompt"], self.chat, self.system) for it in self.items]
        mine = rank_shard(len(self.items), backend)
        rows: dict[int, list[float]] = {}
        texts: dict[int, str] = {}
        with backend.gathered_for_generation(trainer.model) as plain:
            lm = language_model(trainer, plain)
            # with the weights gathered a generation is no collective, but running the same number on every rank
            # keeps the ranks in step whatever the backend does
            for idx, padding in even_batches(backend, mine, self.batch(trainer), 0):
                out = generate(lm, [self._prompts[i] for i in idx], self.generate_config,
                               eos_token_ids=trainer.stop_token_ids(), pad_token_id=trainer.pad_token_id())
                if padding:
                    continue
                completions = [tok.decode(c) for c in out.completions]
                scores = self._scores(idx, completions, out, tok)
                for j, i in enumerate(idx):
                    rows[i] = [s[j] for s in scores] + [len(out.completions[j])]
                    texts[i] = completions[j]
        table = scatter_sum(backend, len(self.items), rows, 3 if self.rewards is not None else 2)
        metrics = {"exact_match": float(table[:, 0].mean()), "completion_tokens": float(table[:, -1].mean())}
        if self.rewards is not None:
            metrics["reward"] = float(table[:, 1].mean())
        if self.log_samples:
            self._write_samples(trainer, texts, table)
        return metrics

    def _scores(self, idx: list[int], completions: list[str], out: Any, tok: Any) -> list[list[float]]:
        answers = [str(self.items[i]["answer"]) for i in idx]
        extracted = [self.extract(c) for c in completions]
        exact = [float(e is not None and normalize_answer(e) == normalize_answer(a)) for e, a in zip(extracted, answers)]
        if self.rewards is None:
            return [exact]
        done = _Completions([tok.decode(self._prompts[i]) for i in idx], completions,
                            [self._prompts[i] for i in idx], [list(c) for c in out.completions], answers,
                            list(out.finished))
        return [exact, self.rewards(done).total.tolist()]

    def _write_samples(self, trainer: Any, texts: dict[int, str], table: torch.Tensor) -> None:
        shown = {i: t for i, t in texts.items() if i < self.log_samples}
        parts = trainer.backend.all_gather_object(shown)
        if not trainer.backend.is_main:
            return
        import json
        merged = {i: t for part in parts for i, t in part.items()}
        with open(trainer.output_dir / f"eval_{self.name}.jsonl", "a", encoding="utf-8") as f:
            for i in sorted(merged):
                f.write(json.dumps({"step": trainer.global_step, "prompt": self.items[i]["prompt"],
                                    "completion": merged[i], "extracted": self.extract(merged[i]),
                                    "answer": self.items[i]["answer"], "exact_match": float(table[i, 0])},
                                   ensure_ascii=False) + "\n")


class MultipleChoiceTask(EvalTask):
    """Records ``{"prompt": str | messages, "choices": [str, ...], "answer": int}`` (the index of the right choice).
    Each choice is scored as a continuation of the prompt: plain text ``prompt + delimiter + choice`` (the choice's
    tokens are those the whole string has beyond the prompt's, as lm-evaluation-harness splits them), or with
    ``chat=True`` the chat-templated prompt (ending in the generation prompt) followed by the choice. Metrics:
    ``acc`` (argmax of the summed log-probability) and ``acc_norm`` (argmax of it divided by the choice's length in
    characters). ``max_length``: longer requests lose their first tokens (None → the trainer's ``block_size``)."""

    fields = {"prompt": is_prompt, "choices": _is_choices,
              "answer": lambda v: None if isinstance(v, int) and not isinstance(v, bool) else "expected an int"}

    def __init__(self, name: str, data: Any, *, chat: bool = False, delimiter: str = " ", system: str | None = None,
                 max_length: int | None = None, **kwargs: Any):
        super().__init__(name, data, **kwargs)
        from ..data.formats import DataError
        for i, it in enumerate(self.items):
            if not 0 <= it["answer"] < len(it["choices"]):
                raise DataError(f"{type(self).__name__} {name!r}: answer {it['answer']} is not the index of one of "
                                f"the {len(it['choices'])} choices", file=self.source, record=i, field="answer")
        self.chat, self.delimiter, self.system, self.max_length = chat, delimiter, system, max_length
        self._requests: list[tuple[list[int], int]] | None = None

    def requests(self, tok: Any) -> list[tuple[list[int], int]]:
        """``(context + continuation ids, continuation length)`` of every (record, choice), in order."""
        out = []
        for it in self.items:
            ctx = _prompt_ids(tok, it["prompt"], self.chat, self.system)
            for choice in it["choices"]:
                cont = tok.encode(choice if self.chat else self.delimiter + choice)
                if not self.chat:
                    whole = tok.encode(it["prompt"] + self.delimiter + choice)
                    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
                        cont = whole[len(ctx):]
                if not ctx or not cont:
                    raise ValueError(f"{self.name}: an empty prompt or choice after tokenising ({it['prompt']!r}, "
                                     f"{choice!r})")
                out.append((ctx + cont, len(cont)))
        return out

    def evaluate(self, trainer: Any) -> dict[str, float]:
        if self._requests is None:
            self._requests = self.requests(self.tokenizer(trainer))
        lls = loglikelihoods(trainer, self._requests, self.batch(trainer), self.max_length or trainer.config.block_size)
        acc = acc_norm = 0.0
        k = 0
        for it in self.items:
            n = len(it["choices"])
            ll = lls[k:k + n]
            k += n
            norm = ll / torch.tensor([float(len(c)) for c in it["choices"]], dtype=torch.float64)
            acc += float(int(ll.argmax()) == it["answer"])
            acc_norm += float(int(norm.argmax()) == it["answer"])
        return {"acc": acc / len(self.items), "acc_norm": acc_norm / len(self.items)}


class PerplexityTask(EvalTask):
    """Records ``{"text": str}``. Each text is tokenised, the BOS token (else EOS) put in front, and cut into windows
    that predict up to ``max_length`` tokens (None → the trainer's ``block_size``) from the token before them and
    those of the window, so every token of the text is predicted exactly once (with up to ``max_length`` tokens of
    context). Metrics: ``nll`` (mean negative log-likelihood per token,
    nats), ``ppl`` (``exp(nll)``) and ``bits_per_byte`` (the summed NLL in bits over the texts' UTF-8 bytes,
    comparable across tokenizers)."""

    fields = {"text": is_text}

    def __init__(self, name: str, data: Any, *, max_length: int | None = None, **kwargs: Any):
        super().__init__(name, data, **kwargs)
        if max_length is not None and max_length < 1:
            raise ValueError(f"PerplexityTask.max_length must be >= 1, got {max_length}")
        self.max_length = max_length
        self._requests: list[tuple[list[int], int]] | None = None

    def requests(self, tok: Any, max_length: int) -> list[tuple[list[int], int]]:
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise ValueError(f"{self.name}: the tokenizer has neither a BOS nor an EOS token to start a text with")
        out = []
        for it in self.items:
            ids = [start] + tok.encode(it["text"])
            for s in range(1, len(ids), max_length):
                window = ids[s - 1:s + max_length]
                out.append((window, len(window) - 1))
        return out

    def evaluate(self, trainer: Any) -> dict[str, float]:
        max_length = self.max_length or trainer.config.block_size
        if self._requests is None:
            self._requests = self.requests(self.tokenizer(trainer), max_length)
        lls = loglikelihoods(trainer, self._requests, self.batch(trainer), max_length)
        tokens = sum(n for _, n in self._requests)
        nll = -float(lls.sum()) / tokens
        n_bytes = sum(len(it["text"].encode("utf-8")) for it in self.items)
        return {"nll": nll, "ppl": math.exp(min(nll, 50.0)),
                "bits_per_byte": -float(lls.sum()) / (math.log(2) * n_bytes)}
