"""The background-thread shell shared by the generation engine and the reward batcher: a condition variable, a
queue of waiting work, ``start()`` and ``close()``."""
from __future__ import annotations

import collections
import threading


class QueueWorker:
    """One thread runs ``_loop`` over ``_waiting`` (guarded by ``_cond``); ``close()`` stops it, joins it and hands
    the work still queued to ``_abandon`` (which fails it with the reason)."""

    thread_name = "llm-trainer-worker"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self):
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._abandon(list(self._waiting), "the server is shutting down")
        self._waiting.clear()

    def _loop(self) -> None:
        raise NotImplementedError

    def _abandon(self, waiting: list, reason: str) -> None:
        raise NotImplementedError
