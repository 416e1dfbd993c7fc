"""Pinned loss traces: every trainer's first steps on a tiny CPU fp32 model, compared with recorded values.

The safety net for refactors (torchtune pins per-recipe loss values the same way): a change to the loop, a loss, the
data path or the model that alters what a trainer computes shows up here. Each trace is 6 optimizer steps of
``(loss, grad_norm)``. On the machine and torch build that recorded them (``tests/data/loss_traces.json`` stores
the fingerprint) the values must be **bit-identical**; elsewhere (another CPU's kernels order float sums
differently) they must agree to ``rtol=1e-4``, far tighter than any real change to the maths moves them.

Re-record after a change whose new values are right (say why in the commit):
``python tests/test_loss_traces.py --write``.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from rl_helpers import copy_reward, grpo_train_config, ppo_train_config  # noqa: E402
from trainer_utils import tiny_model_config, train_config, write_pretrain_tokens, write_sft  # noqa: E402

TRACE_FILE = HERE / "data" / "loss_traces.json"
STEPS = 6


def fingerprint() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}|{cpu or platform.processor()}|torch {torch.__version__}"


def _pairs(n: int = 24, seed: int = 0, vocab: int = 96) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, vocab, (2 + i % 3,), generator=g).tolist()
        c = torch.randint(3, vocab, (1 + i % 4,), generator=g).tolist()
        r = torch.randint(3, vocab, (1 + (i + 2) % 3,), generator=g).tolist()
        item = {}
        for side, resp in (("chosen", c), ("rejected", r)):
            ids = torch.tensor(p + resp)
            labels = ids.clone()
            labels[:len(p)] = -100
            item[f"{side}_input_ids"], item[f"{side}_labels"] = ids, labels
        out.append(item)
    return out


def _run(trainer) -> list[list[float]]:
    trace = []
    for window in trainer.training_windows():
        stats = trainer.train_step(window)
        trace.append([float(stats["loss"]), float(stats["grad_norm"])])
    trainer.metrics.close()
    assert len(trace) == STEPS, trace
    return trace


def trace_pretrain(tmp: Path):
    from llm_trainer import Trainer
    data = write_pretrain_tokens(tmp / "tokens.npy")
    return _run(Trainer(train_config=train_config(tmp, data, max_steps=STEPS)))


def trace_kd(tmp: Path):
    from llm_trainer import KDConfig, PretrainConfig, Trainer
    from llm_trainer.model import LlmModel
    torch.manual_seed(123)
    teacher = tmp / "teacher"
    LlmModel(tiny_model_config()).save_pretrained(teacher)
    data = write_pretrain_tokens(tmp / "tokens.npy")
    kd = KDConfig(teacher_model_path=str(teacher), kd_coef=0.5, kind="jsd", temperature=2.0)
    cfg = train_config(tmp, data, max_steps=STEPS, pretrain_config=PretrainConfig(kd_config=kd))
    return _run(Trainer(train_config=cfg))


def trace_sft(tmp: Path):
    from llm_trainer import SFTConfig, SFTTrainer
    data = write_sft(tmp / "sft", n=48)
    cfg = train_config(tmp, data, max_steps=STEPS, sft_config=SFTConfig(gradient_accumulation_steps=2))
    return _run(SFTTrainer(train_config=cfg))


def trace_dpo(tmp: Path):
    from llm_trainer import DPOConfig, DPOTrainer
    cfg = train_config(tmp, None, file_dataset=_pairs(), max_steps=STEPS, dpo_config=DPOConfig(loss_beta=0.2))
    return _run(DPOTrainer(train_config=cfg))


def trace_reward(tmp: Path):
    from llm_trainer import RewardConfig, RewardTrainer
    cfg = train_config(tmp, None, file_dataset=_pairs(seed=1), max_steps=STEPS,
                       reward_config=RewardConfig(margin=0.1))
    return _run(RewardTrainer(train_config=cfg))


def trace_grpo(tmp: Path):
    from llm_trainer import GRPOTrainer
    cfg = grpo_train_config(tmp, steps=STEPS, loss_beta=0.04, grpo_epochs=2, grpo_batch_size=8)
    return _run(GRPOTrainer(train_config=cfg, reward_func=copy_reward))


def graded_reward(completion_ids):
    """A reward with signal from the first rollout on (the copy task's is all zero at first)."""
    return [float(c[0] % 3) if c else 0.0 for c in completion_ids]


def trace_ppo(tmp: Path):
    from llm_trainer import PPOTrainer
    cfg = ppo_train_config(tmp, steps=STEPS, kl_beta=0.1, ppo_batch_size=4)
    return _run(PPOTrainer(train_config=cfg, reward_func=graded_reward))


TRACES = {"pretrain": trace_pretrain, "kd": trace_kd, "sft": trace_sft, "dpo": trace_dpo,
          "reward": trace_reward, "grpo": trace_grpo, "ppo": trace_ppo}


def _recorded() -> dict:
    return json.loads(TRACE_FILE.read_text())


@pytest.mark.parametrize("name", sorted(TRACES))
def test_loss_trace_unchanged(name, tmp_path):
    rec = _recorded()
    got = TRACES[name](tmp_path)
    want = rec["traces"][name]
    if rec["fingerprint"] == fingerprint():
        assert got == want, f"{name}: trace changed on the recording machine\n got  {got}\n want {want}"
    else:
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    import tempfile
    torch.set_num_threads(1)
    if "--write" not in sys.argv:
        sys.exit("usage: python tests/test_loss_traces.py --write   (re-records tests/data/loss_traces.json)")
    traces = {}
    for name, fn in TRACES.items():
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            traces[name] = fn(Path(d))
        print(name, traces[name])
    TRACE_FILE.parent.mkdir(exist_ok=True)
    TRACE_FILE.write_text(json.dumps({"fingerprint": fingerprint(), "steps": STEPS, "traces": traces}, indent=1)
                          + "\n")
    print("wrote", TRACE_FILE)
