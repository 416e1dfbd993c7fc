"""Batched scoring for reward-model folders: concurrent ``/v1/rewards`` requests are scored together.

One thread owns the model; each request's token-id sequences wait in a queue, and the thread scores every waiting
sequence (up to ``max_batch`` per forward pass) with ``RewardModel.score`` — right-padded, read at each sequence's
last real token, so a sequence's score does not depend on what it was batched with (up to floating-point
summation order).
"""
from __future__ import annotations

import collections
import sys
import threading
import time
import traceback
from concurrent.futures import Future

import torch

from .loading import ServedModel

__all__ = ["RewardBatcher"]


class RewardBatcher:
    """``score(seqs) -> list[float]`` from any thread; ``start()`` / ``close()`` the scoring thread.
    ``batch_wait_s``: when idle, wait this long after the first arrival so that requests arriving together are
    scored together."""

    def __init__(self, served: ServedModel, max_batch: int = 16, batch_wait_s: float = 0.0):
        if served.kind != "reward":
            raise ValueError(f"RewardBatcher scores with a reward model; {served.name} is a {served.kind} model")
        self.served, self.max_batch, self.batch_wait_s = served, max_batch, batch_wait_s
        self._cond = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.stats = {"scored": 0, "batches": 0, "peak_batch": 0, "failed": 0}

    def start(self) -> "RewardBatcher":
        self._thread = threading.Thread(target=self._loop, name="llm-trainer-rewards", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        for _, fut in self._waiting:
            fut.set_exception(RuntimeError("the server is shutting down"))
        self._waiting.clear()

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
