"""Shared pieces of the agentic (multi-turn, tool-calling) tests: tokenizers with real chat templates, a tiny
tokenizer and model for training runs, scripted environments and a scripted generation service."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llm_trainer.envs import StepResult, calculator
from llm_trainer.tokenizer import Tokenizer, train_tokenizer


def trl_template(name: str) -> str:
    import trl
    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


def template_tokenizer(folder: Path, name: str) -> Tokenizer:
    """A byte-level BPE (trained on the calculator conversations) holding the control tokens of TRL's template
    ``name`` as special tokens, with that template as its chat template."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as RustTokenizer

    from llm_trainer.chat.jinja import written_control_tokens
    source = trl_template(name)
    specials = sorted(set(written_control_tokens(source))) + ["<s>", "</s>", "<pad>"]
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}|[^\s\p{L}\p{N}]+|\s+|\p{L}+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [json.dumps(calculator.demonstration(r)) for r in calculator.records(50)]
    tok.train_from_iterator(corpus * 5, trainer=trainers.BpeTrainer(
        vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials]))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": source}))
    return Tokenizer(folder)


def chatml_tokenizer(folder: Path, vocab_size: int = 320) -> Tokenizer:
    """A tokenizer trained here (built-in ``chatml`` template) on the calculator conversations."""
    from llm_trainer.chat import get_builtin
    from llm_trainer.chat.jinja import prepare_messages, render
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "corpus.txt"
    text.write_text("".join(render(get_builtin("chatml").source, prepare_messages(calculator.demonstration(r)),
                                   True, {}).text for r in calculator.records(200)))
    return train_tokenizer([text], vocab_size=vocab_size, output_dir=folder / "tok", show_progress=False)


class CountdownEnv:
    """Answers every reply with a user message until the episode has had ``turns`` replies; the reward of a step is
    the number of characters of the reply (so episodes of a group differ)."""

    def __init__(self, turns: int = 3):
        self.turns, self.n = turns, 0

    def reset(self, record):
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        self.n += 1
        done = self.n >= self.turns
        return StepResult(None if done else [{"role": "user", "content": f"again {self.n}"}],
                          reward=float(len(text) % 5), done=done, info={"steps": 1})


class ScriptedService:
    """A generation service replying with fixed token ids (``replies[k]`` for the k-th reply of each context length
    seen), with made-up log-probs: the tests control every generated id."""

    def __init__(self, replies: list[list[int]]):
        self.replies, self.calls = replies, []

    def __call__(self, model, prompts, config, group_size):
        self.calls.append([list(p) for p in prompts])
        out, lps = [], []
        for p in prompts:
            for g in range(group_size):
                ids = self.replies[(len(p) + g) % len(self.replies)]
                out.append(list(ids))
                lps.append(torch.linspace(-1.0, -0.1, len(ids)))
        return type("R", (), {"completions": out, "logprobs": lps, "finished": None})()
