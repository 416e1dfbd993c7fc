"""RL teaches a tiny model to use a calculator (``example/agentic_grpo.py``, ``llm_trainer.envs.calculator``).

The example's pipeline with three seeds: a 2-layer model (hidden 64) is supervised until greedy tool-using episodes
solve 90% of probe problems, then on a mixture where only 30% of the conversations use the tool (the others answer
3-digit sums in the model's head, which it cannot do); GRPO then runs 8 steps (4 problems x 8 episodes, up to 3
turns each) with the calculator registered — and, as the control, with the same model and no tool. Held-out sampled
episodes (48 problems, temperature 1, the same random numbers before and after):

measured (this CPU, seeds 0 / 1 / 2, 10 steps, 64 problems; two code states, see docs/rl.md):
  with the tool:    reward 0.047 -> 0.297 / 0.453 / 0.312, correct tool calls 0.078 -> 0.469 / 0.625 / 0.531
                    reward 0.000 -> 0.500 / 0.531 / 0.453, correct tool calls 0.016 -> 0.625 / 0.688 / 0.547
  without the tool: reward 0.000 -> 0.000 (no reward variance: nothing to learn from)

Over kernel paths (after the merge; 1 thread with ATEN_CPU_CAPABILITY=default and =avx2, and this CPU's own
avx512 path with 2 threads), seeds 0 / 1 / 2:
  avx512/2:  reward gain 0.500 / 0.531 / 0.453, correct-tool-call gain 0.609 / 0.672 / 0.531
  default/1: reward gain 0.531 / 0.438 / 0.407, correct-tool-call gain 0.688 / 0.625 / 0.578
  avx2/1:    reward gain 0.625 / 0.093 / 0.234, correct-tool-call gain 0.750 / 0.281 / 0.500
  without the tool the reward stays 0.000 everywhere.
Asserted, about half the worst of each: reward gain >= 0.04 per seed and >= 0.15 as the mean over the seeds
(worst mean 0.317), correct-tool-call gain >= 0.14 per seed (worst 0.281), the tool-less run below 0.05.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("agentic_grpo_example", ROOT / "example" / "agentic_grpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rl_raises_the_reward_and_the_rate_of_correct_tool_calls(tmp_path, capsys):
    results = _example().main(["--out", str(tmp_path), "--steps", "10", "--seeds", "0", "1", "2"])
    with capsys.disabled():
        for key, r in results.items():
            if key != "warmup":
                print(f"\n{key}: reward {r['before'][0]:.3f} -> {r['after'][0]:.3f}, correct tool calls "
                      f"{r['before'][1]:.3f} -> {r['after'][1]:.3f}")
    assert results["warmup"][-1][1] >= 0.9                       # the warm-up reached its solve rate
    # floors at about half the worst value measured over 3 kernel paths (module docstring): per seed the reward
    # gain is noisy (0.093 at worst), its mean over the seeds is not (0.317 at worst)
    reward_gains = []
    for seed in (0, 1, 2):
        tool, no_tool = results[f"tool/{seed}"], results[f"no_tool/{seed}"]
        reward_gains.append(tool["after"][0] - tool["before"][0])
        assert reward_gains[-1] >= 0.04, (seed, tool)
        assert tool["after"][1] >= tool["before"][1] + 0.14, (seed, tool)
        assert no_tool["after"][0] < 0.05 and tool["after"][0] >= no_tool["after"][0] + 0.04, (seed, no_tool)
    assert sum(reward_gains) / 3 >= 0.15, reward_gains
