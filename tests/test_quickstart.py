"""The quickstart and the pretrain/SFT examples run end to end (tiny settings) and leave what they promise."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llm_trainer.cli.main import main
from llm_trainer.model import LlmModel
from llm_trainer.quickstart.task import exact_match, extract_answer, split_problems

ROOT = Path(__file__).resolve().parents[1]


def test_task_split_is_disjoint_and_answers_parse():
    train, test = split_problems(max_operand=19, seed=3)
    assert not {(p.a, p.b) for p in train} & {(p.a, p.b) for p in test}
    assert len(train) + len(test) == 400
    assert extract_answer(" 57<|im_end|>") == "57" and extract_answer("no digits") is None
    assert exact_match("57", "57") == 1.0 and exact_match("571", "57") == 0.0


def test_quickstart_tiny_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--size", "tiny", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["pretrain", "sft", "dpo", "grpo", "classify"]
    for stage, res in results.items():
        assert all(0.0 <= v <= 1.0 for k, v in res.items() if k != "seconds")
        assert stage == "classify" or "chat_accuracy" in res
        assert (out / stage / "final" / "config.json").is_file() and (out / stage / "metrics.png").is_file()
    assert {"heldout_accuracy_before", "heldout_accuracy_after"} <= set(results["classify"])
    assert (out / "classify" / "confusion_matrix.png").is_file()
    assert {"preference_accuracy_before", "preference_accuracy_after"} <= set(results["dpo"])
    assert {"sampled_reward_before", "sampled_reward_after"} <= set(results["grpo"])
    printed = capsys.readouterr().out
    import torch
    n = torch.get_num_threads()
    assert re.search(rf"torch \S+ on {n} CPU threads?, \w+ kernels", printed)         # what the run used
    assert all(re.search(rf"{stage} done in \d+s → held-out", printed) for stage in results)   # each stage's time
    assert re.search(rf"finished in \d+s on {n} CPU threads?", printed)
    assert all(res["seconds"] >= 0 for res in results.values())
    LlmModel.from_pretrained(out / "grpo" / "final")   # the last export loads


def test_quickstart_rejects_unknown_stage(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["quickstart", "--stages", "pretrain,nope", "--output", str(tmp_path)])
    assert e.value.code == 2


def _run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "example" / name), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_pretrain_then_sft_examples(tmp_path):
    pre = _run_example("pretrain.py", "--out", str(tmp_path / "pre"), "--hidden", "32", "--layers", "1",
                       "--steps", "4", "--batch-size", "4", "--block-size", "32")
    assert pre.returncode == 0, pre.stderr[-3000:]
    final = tmp_path / "pre" / "final"
    assert (final / "tokenizer.json").is_file() and (tmp_path / "pre" / "metrics.jsonl").is_file()
    sft = _run_example("sft.py", "--out", str(tmp_path / "sft"), "--init", str(final), "--max-steps", "3",
                       "--batch-size", "4", "--block-size", "32", "--lora")
    assert sft.returncode == 0, sft.stderr[-3000:]
    merged = LlmModel.from_pretrained(tmp_path / "sft" / "final")
    assert merged.config.hidden_size == 32
    assert (tmp_path / "sft" / "lora_adapter").is_dir()   # the adapters alone, beside the merged export


def test_wrong_answers_are_never_right_or_negative():
    import random
    from llm_trainer.quickstart.task import Problem, wrong_answer
    rng = random.Random(0)
    for a in range(4):
        for b in range(4):
            for _ in range(20):
                w = wrong_answer(Problem(a, b), rng)
                assert w >= 0 and w != a + b


def test_quickstart_stages_continue_from_an_earlier_runs_export(tmp_path):
    """``--stages dpo`` after a pretrain+SFT run starts DPO from that run's SFT export, not from a new model."""
    import torch
    out = tmp_path / "qs"
    assert main(["quickstart", "--size", "tiny", "--output", str(out), "--stages", "pretrain,sft"]) == 0
    assert main(["quickstart", "--size", "tiny", "--output", str(out), "--stages", "dpo"]) == 0
    assert list(json.loads((out / "results.json").read_text())) == ["dpo"]
    sft = LlmModel.from_pretrained(out / "sft" / "final").state_dict()
    dpo = LlmModel.from_pretrained(out / "dpo" / "final").state_dict()
    # two DPO updates at lr 2e-5 move a weight by ~1e-4; a freshly initialised model would differ by ~1e-1
    assert max(float((sft[k] - dpo[k]).abs().max()) for k in sft) < 1e-2
