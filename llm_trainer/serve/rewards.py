"""Batched scoring for reward-model and classifier folders: concurrent ``/v1/rewards`` requests are scored together.

One thread owns the model; each request's token-id sequences wait in a queue, and the thread scores every waiting
sequence (up to ``max_batch`` per forward pass) with ``RewardModel.score`` (a classifier: ``SequenceClassifier.predict``, the logits of every class) —
right-padded, read at each sequence's
last real token, so a sequence's score does not depend on what it was batched with (up to floating-point
summation order).
"""
from __future__ import annotations

import sys
import time
import traceback
from concurrent.futures import Future

import torch

from .loading import ServedModel
from .worker import QueueWorker

__all__ = ["RewardBatcher"]


class RewardBatcher(QueueWorker):
    """``score(seqs) -> list[float]`` (a classifier: ``list[list[float]]``, its logits) from any thread; ``start()`` / ``close()`` the scoring thread.
    ``batch_wait_s``: when idle, wait this long after the first arrival so that requests arriving together are
    scored together."""

    def __init__(self, served: ServedModel, max_batch: int = 16, batch_wait_s: float = 0.0):
        if not served.scores_text:
            raise ValueError(f"RewardBatcher scores with a reward model or classifier; {served.name} is a "
                             f"{served.kind} model")
        super().__init__()
        self.served, self.max_batch, self.batch_wait_s = served, max_batch, batch_wait_s
        self.stats = {"scored": 0, "batches": 0, "peak_batch": 0, "failed": 0}

    thread_name = "llm-trainer-rewards"

    def _abandon(self, waiting: list, reason: str) -> None:
        for _, fut in waiting:
            fut.set_exception(RuntimeError(reason))

    def score(self, seqs: list[list[int]]) -> list[float]:
        fut: Future = Future()
        with self._cond:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._waiting.append((seqs, fut))
            self._cond.notify_all()
        return fut.result()

    def _loop(self) -> None:
        pad = self.served.tokenizer.pad_token_id
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                deadline = time.monotonic() + self.batch_wait_s
                while not self._closing and sum(len(j) for j, _ in self._waiting) < self.max_batch:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._closing:
                    return
                jobs, n = [], 0
                while self._waiting and (not jobs or n + len(self._waiting[0][0]) <= self.max_batch):
                    jobs.append(self._waiting.popleft())
                    n += len(jobs[-1][0])
            seqs = [s for job, _ in jobs for s in job]
            try:
                with torch.inference_mode():
                    if self.served.kind == "classifier":
                        scores = self.served.model.predict(seqs, batch_size=self.max_batch, pad_token_id=pad).tolist()
                    else:
                        scores = self.served.model.score(seqs, [[] for _ in seqs], batch_size=self.max_batch,
                                                         pad_token_id=pad).tolist()
            except Exception as e:  # a failing batch fails its requests, not the server
                traceback.print_exc(file=sys.stderr)
                self.stats["failed"] += len(jobs)
                for _, fut in jobs:
                    fut.set_exception(RuntimeError(f"scoring failed: {type(e).__name__}: {e}"))
                continue
            self.stats["scored"] += len(seqs)
            self.stats["batches"] += 1
            self.stats["peak_batch"] = max(self.stats["peak_batch"], len(seqs))
            start = 0
            for job, fut in jobs:
                fut.set_result(scores[start:start + len(job)])
                start += len(job)
