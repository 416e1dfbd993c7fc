"""Every loss of llm_trainer as a pure function of tensors (see docs/architecture.md, "Losses").

* :mod:`.lm` — next-token CE, chunked CE, critical-token weights, distillation (KL / reverse KL / GKD JSD),
  per-token log-probs and entropy.
* :mod:`.preference` — DPO (+ conservative, robust, hinge), IPO, ORPO, SimPO, Bradley-Terry.
* :mod:`.rl` — KL estimators, masked statistics and whitening, reward normalisation, GAE, group advantages.
* :mod:`.policy` — PPO's clipped surrogate and value loss, the GRPO family (grpo / bnpo / dr_grpo / dapo
  aggregations, clip-higher, delta cap, GSPO, CISPO).

Every loss returns a sum over its units (tokens, pairs, sequences); the training loop adds the units of the whole
accumulation window over all ranks and divides once.
"""
from __future__ import annotations

from .lm import *  # noqa: F401,F403
from .lm import __all__ as _lm_all
from .policy import *  # noqa: F401,F403
from .policy import __all__ as _policy_all
from .preference import *  # noqa: F401,F403
from .preference import __all__ as _pref_all
from .rl import *  # noqa: F401,F403
from .rl import __all__ as _rl_all

__all__ = sorted({*_lm_all, *_policy_all, *_pref_all, *_rl_all})
