"""The synthetic arithmetic task: ``a+b`` with two-digit operands, as text, chat, preference pairs and RL prompts.

Held-out problems are operand pairs never seen in any training file, so accuracy measures generalisation.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

SYSTEM = "You add numbers."


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def question(self) -> str:
        return f"{self.a}+{self.b}=?"


def split_problems(max_operand: int = 49, test_fraction: float = 0.1, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """All ``a+b`` with ``0 ≤ a, b ≤ max_operand``, split into disjoint train and held-out sets."""
    rng = random.Random(seed)
    problems = [Problem(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng.shuffle(problems)
    n_test = max(1, int(len(problems) * test_fraction))
    return problems[n_test:], problems[:n_test]


def chat_prompt(p: Problem) -> list[dict]:
    return [{"role": "user", "content": p.question}]


def pretrain_lines(problems: list[Problem], rng: random.Random, repeats: int) -> list[str]:
    forms = ("{a}+{b}={c}", "{a} plus {b} is {c}", "{b}+{a}={c}")
    out = []
    for _ in range(repeats):
        for p in problems:
            out.append(rng.choice(forms).format(a=p.a, b=p.b, c=p.answer))
    rng.shuffle(out)
    return out


def wrong_answer(p: Problem, rng: random.Random) -> int:
    """A plausible wrong sum (off by one, two, ten or eleven), never negative and never the right one."""
    return rng.choice([p.answer + d for d in (-10, -2, -1, 1, 2, 10, 11) if p.answer + d >= 0])


def write_jsonl(path: Path, records) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            n += 1
    return n


def write_task_files(out: Path, seed: int = 0, max_operand: int = 49, pretrain_repeats: int = 4) -> dict[str, Path]:
    """Write every stage's jsonl into ``out`` and return their paths."""
    rng = random.Random(seed)
    train, test = split_problems(max_operand, seed=seed)
    files = {
        "pretrain": out / "pretrain.jsonl",
        "sft": out / "sft.jsonl",
        "dpo": out / "dpo.jsonl",
        "rl": out / "rl.jsonl",
        "test": out / "test.jsonl",
    }
    write_jsonl(files["pretrain"], ({"text": t} for t in pretrain_lines(train, rng, pretrain_repeats)))
    write_jsonl(files["sft"], ({"messages": chat_prompt(p) + [{"role": "assistant", "content": str(p.answer)}]}
                               for p in train))
    write_jsonl(files["dpo"], ({"prompt": chat_prompt(p), "chosen": str(p.answer),
                                "rejected": str(wrong_answer(p, rng))} for p in train))
    write_jsonl(files["rl"], ({"prompt": chat_prompt(p), "answer": str(p.answer)} for p in train))
    write_jsonl(files["test"], ({"prompt": chat_prompt(p), "answer": str(p.answer)} for p in test))
    return files


_INT = re.compile(r"-?\d+")


def extract_answer(text: str) -> str | None:
    """The first integer in a completion (None if there is none)."""
    m = _INT.search(text)
    return m.group(0) if m else None


def exact_match(completion: str, answer: str) -> float:
    return 1.0 if extract_answer(completion) == str(answer).strip() else 0.0


def correct(*, completions, answers, **_) -> list[float]:
    """Reward function (the ``RewardFun`` protocol): 1.0 when a completion's first integer is the reference answer."""
    return [exact_match(c, a) if a is not None else 0.0 for c, a in zip(completions, answers)]


def prepare_task_data(out: Path, max_operand: int = 9, tokenizer: str | None = None,
                      stages: tuple[str, ...] = ("sft", "rl", "test")) -> str:
    """Write the task files, train a tokenizer unless one is given, and tokenise ``stages`` into
    ``out/data/<stage>_tokens`` ('test' is RL-format). Rank 0 does the work while the other ranks of a distributed
    run wait for it. Returns the tokenizer folder."""
    import os
    import time

    from ..data import prepare_data
    from ..tokenizer import Tokenizer, train_tokenizer
    ready = out / "data" / "ready.json"
    if int(os.environ.get("RANK", "0")) == 0 and not ready.exists():
        files = write_task_files(out / "data", seed=0, max_operand=max_operand, pretrain_repeats=1)
        tok_dir = tokenizer or str(out / "tokenizer")
        if tokenizer is None:
            train_tokenizer([files["sft"]], vocab_size=320, output_dir=tok_dir, show_progress=False)
        tok = Tokenizer(tok_dir)
        for stage in stages:
            prepare_data("rl" if stage == "test" else stage, tok, files[stage], out / "data" / f"{stage}_tokens",
                         progress=False)
        ready.write_text(json.dumps({"tokenizer": tok_dir}))
    while not ready.exists():
        time.sleep(0.5)
    return json.loads(ready.read_text())["tokenizer"]


def statement_records(problems: list[Problem], rng: random.Random, max_sum: int) -> list[dict]:
    """The classification task: ``"a+b=c"`` statements labelled ``"true"`` or ``"false"``, one of each per problem
    (the false sum a random wrong one in ``[0, max_sum]``), shuffled."""
    out = []
    for p in problems:
        wrong = rng.choice([c for c in range(max_sum + 1) if c != p.answer])
        out.append({"text": f"{p.a}+{p.b}={p.answer}", "label": "true"})
        out.append({"text": f"{p.a}+{p.b}={wrong}", "label": "false"})
    rng.shuffle(out)
    return out


def write_classify_files(out: Path, seed: int = 0, max_operand: int = 49) -> dict[str, Path]:
    """``classify.jsonl`` (training problems) and ``classify_test.jsonl`` (the held-out operand pairs of
    :func:`split_problems`) in ``out``."""
    rng = random.Random(seed + 1)
    train, test = split_problems(max_operand, seed=seed)
    files = {"classify": out / "classify.jsonl", "classify_test": out / "classify_test.jsonl"}
    write_jsonl(files["classify"], statement_records(train, rng, 2 * max_operand))
    write_jsonl(files["classify_test"], statement_records(test, rng, 2 * max_operand))
    return files
