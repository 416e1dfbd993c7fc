"""lm-evaluation-harness (``lm-eval``, the optional extra ``llm_trainer[lm-eval]``) on an ``LlmModel`` folder.

    import lm_eval
    from lm_eval.tasks import TaskManager
    from llm_trainer.evaluation.lm_eval_adapter import LlmTrainerLM
    results = lm_eval.simple_evaluate(model=LlmTrainerLM(pretrained="runs/sft/final"), tasks=["my_task"],
                                      task_manager=TaskManager(include_path="my_tasks/"))

or from the shell, with the harness's own arguments (the model is registered as ``llm_trainer``)::

    python -m llm_trainer.evaluation.lm_eval_adapter --model llm_trainer --model_args pretrained=runs/sft/final \\
        --include_path my_tasks/ --tasks my_task

The three request types run on our model code (no transformers): ``loglikelihood`` and ``loglikelihood_rolling``
through :func:`~.base.loglikelihoods` (batched, chunked log-probs; the context/continuation split and the rolling
windows are the harness's own: trailing spaces of a context move to its continuation, ``get_rolling_token_windows``),
``generate_until`` through :func:`~llm_trainer.generation.generate` cut at the first ``until`` string. One process.
"""
from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..generation import GenerateConfig, generate
from ..model import LlmModel
from ..parallel.single import SingleBackend
from ..tokenizer import Tokenizer
from .base import loglikelihoods

__all__ = ["LlmTrainerLM"]


class _ModelHost:
    """What :func:`~.base.loglikelihoods` reads of a trainer, for a model outside training (one process)."""

    def __init__(self, model: LlmModel, tokenizer: Tokenizer, device: str | None, dtype: str):
        self.backend = SingleBackend(dtype, device)
        self.device = self.backend.device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer

    def pad_token_id(self) -> int:
        for v in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, self.model.config.pad_token_id):
            if v is not None:
                return int(v)
        return 0

    def policy_for_generation(self, plain: Any) -> Any:
        return plain


@register_model("llm_trainer")
class LlmTrainerLM(LM):
    """``pretrained``: an HF-format LlmModel folder; ``tokenizer``: its tokenizer (default: the same folder);
    ``batch_size`` sequences per forward pass; ``max_length`` tokens per sequence (default the model's
    ``max_position_embeddings``); ``device`` (default CUDA if available); ``dtype`` 'fp32' | 'bf16' | 'fp16'."""

    def __init__(self, pretrained: str, tokenizer: str | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, device: str | None = None, dtype: str = "fp32", **_: Any):
        super().__init__()
        model = LlmModel.from_pretrained(pretrained)
        self.tok = Tokenizer(tokenizer or pretrained)
        self.host = _ModelHost(model, self.tok, device, dtype)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.pretrained = str(pretrained)

    @property
    def prefix_token_id(self) -> int:
        tok = self.tok
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    # --------------------------------------------------------------------------------------------- requests
    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The harness's split: the context's trailing spaces go to the continuation, which gets the tokens the
        whole string has beyond the context's (an empty context: the prefix token)."""
        if context == "":
            return [self.prefix_token_id], self.tok.encode(continuation)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.tok.encode(context + continuation), self.tok.encode(context)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._split(*r.args) for r in requests]
        reqs = [(ctx + cont, len(cont)) for ctx, cont in pairs]
        ll, greedy = loglikelihoods(self.host, reqs, self.batch_size, self.max_length, greedy=True)
        return [(float(a), bool(g)) for a, g in zip(ll, greedy)]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        reqs, owner = [], []
        for k, r in enumerate(requests):
            windows = get_rolling_token_windows(token_list=self.tok.encode(r.args[0]), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for ctx, pred in map(make_disjoint_window, windows):
                reqs.append((list(ctx) + list(pred), len(pred)))
                owner.append(k)
        ll = loglikelihoods(self.host, reqs, self.batch_size, self.max_length)
        totals = [0.0] * len(requests)
        for k, v in zip(owner, ll.tolist()):
            totals[k] += v
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation arguments are generated ``batch_size`` at a time."""
        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted((r.args[1] or {}).items())), []).append(i)
        stops = [i for i in (self.tok.eos_token_id,) if i is not None]
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            cfg = GenerateConfig(max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                                 do_sample=bool(kwargs.get("do_sample", False)),
                                 temperature=float(kwargs.get("temperature", 1.0)) or 1.0)
            for start in range(0, len(idx), self.batch_size):
                part = idx[start:start + self.batch_size]
                prompts = [self.tok.encode(requests[i].args[0])[-self.max_length:] for i in part]
                res = generate(self.host.model, prompts, cfg, eos_token_ids=stops,
                               pad_token_id=self.host.pad_token_id())
                for i, ids in zip(part, res.completions):
                    text = self.tok.decode(ids)
                    out[i] = text[:min([text.find(u) for u in until if u and u in text], default=len(text))]
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt, tokenize=False)


def main(argv: list[str] | None = None) -> None:
    """The harness's command line with this model registered (``--model llm_trainer``)."""
    from lm_eval.__main__ import cli_evaluate
    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
