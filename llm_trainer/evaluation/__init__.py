"""Evaluation inside the training loop: tasks over local jsonl files, run on every rank at each evaluation.

    from llm_trainer.evaluation import GenerationTask, MultipleChoiceTask, PerplexityTask
    trainer = SFTTrainer(train_config=cfg, evaluators=[
        GenerationTask("gsm8k", "data/gsm8k_test.jsonl", extract="gsm8k", limit=200, every=500),
        MultipleChoiceTask("arc", "data/arc_easy.jsonl"),
        PerplexityTask("wiki", "data/wiki_heldout.jsonl"),
    ])

Results are logged as ``eval/<task>/<metric>`` (``metrics.jsonl``, the printed eval line, ``vis_log``'s PNG). Any
callable ``fn(trainer) -> {metric: float}`` that every rank calls is an evaluator too (:class:`Evaluator`). File formats
and the maths: ``docs/evaluation.md``.
"""
from .base import EvalTask, Evaluator, loglikelihoods
from .tasks import EXTRACTORS, GenerationTask, MultipleChoiceTask, PerplexityTask, normalize_answer

__all__ = ["Evaluator", "EvalTask", "GenerationTask", "MultipleChoiceTask", "PerplexityTask", "EXTRACTORS",
           "loglikelihoods", "normalize_answer"]
