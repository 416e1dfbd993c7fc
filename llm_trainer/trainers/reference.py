"""The reference model of DPO, GRPO and PPO: what a KL or preference term compares the policy with.

Three kinds, never a random model:

* a frozen copy of the initial policy (the default), built by the backend (``frozen_replica(source=...)``: an
  eval-mode copy, or a partitioned ZeRO-3 inference engine under DeepSpeed);
* a frozen model loaded from ``ref_model_weights_path`` (``frozen_replica(build=...)``);
* with LoRA and no path: the policy itself with its adapters switched off — no second copy.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from ..generation import eval_mode
from ..model.lora import has_lora, lora_disabled
from .setup import load_model, resolve_model_config

__all__ = ["Reference", "build_reference", "eval_mode"]


@dataclass
class Reference:
    """``frozen``: a frozen replica; or ``policy``: the (plain) policy whose LoRA adapters are switched off."""

    frozen: nn.Module | None = None
    policy: nn.Module | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """The module to run reference forward passes with (no gradients needed)."""
        if self.frozen is not None:
            yield self.frozen
            return
        with eval_mode(self.policy), lora_disabled(self.policy):
            yield self.policy

    def release(self) -> None:
        """Free the frozen replica (e.g. after precomputing the reference log-probs)."""
        module, self.frozen = self.frozen, None
        if module is not None and hasattr(module, "destroy"):
            module.destroy()


def build_reference(backend, policy: nn.Module, weights_path: str | None,
                    what: str = "ref_model_weights_path") -> Reference:
    """The reference for ``policy`` (the plain module, before any update): see the module docstring. ``what``
    names the setting ``weights_path`` came from."""
    if weights_path is not None:
        config = resolve_model_config(getattr(policy, "config", None), weights_path, what=what)
        return Reference(frozen=backend.frozen_replica(build=lambda: load_model(config, weights_path)))
    if has_lora(policy):
        return Reference(policy=policy)
    return Reference(frozen=backend.frozen_replica(source=policy))
