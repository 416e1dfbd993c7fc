"""The benchmark scripts stay runnable: every one answers ``--help``, the shared harness (``scripts/bench/common.py``)
measures what it says, ``scale.py --smoke`` measures ours and trl on a tiny model, and ``gpu.sh`` parses and runs its
CPU fallback to the end. Nothing here asserts on a time: the numbers are the scripts' business, these tests check
that they come out, complete and consistent."""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402

SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ the harness
def test_resident_memory_probes_follow_an_allocation():
    assert common.reset_hwm(), "this kernel refuses /proc/self/clear_refs"
    before = common.hwm_bytes()
    block = bytearray(64 << 20)
    block[::4096] = b"x" * len(block[::4096])          # touch every page
    assert common.rss_bytes() - before > 60 << 20
    assert common.hwm_bytes() - before > 60 << 20
    del block
    common.reset_hwm()                                  # the high-water mark drops back to the live RSS
    assert common.hwm_bytes() < before + (30 << 20)
    assert common.max_rss_bytes() >= before + (60 << 20)   # the lifetime peak does not
    assert common.cpu_seconds() > 0


def test_run_worker_returns_the_result_line_and_reports_failures(tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text("import sys\nsys.path.insert(0, %r)\nfrom common import emit_result\nprint('noise')\n"
                  "emit_result({'a': 1, 'threads': __import__('os').environ['OMP_NUM_THREADS']})\n" % str(BENCH))
    assert common.run_worker([sys.executable, str(ok)], env=common.worker_env(threads=3)) == {"a": 1, "threads": "3"}
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nprint('partial')\nsys.exit('broken on purpose')\n")
    with pytest.raises(common.WorkerError, match="broken on purpose"):
        common.run_worker([sys.executable, str(bad)])
    silent = tmp_path / "silent.py"
    silent.write_text("print('no result line')\n")
    with pytest.raises(common.WorkerError, match="exit 0"):
        common.run_worker([sys.executable, str(silent)])


def test_small_helpers():
    assert common.step_intervals([0.0, 1.0, 3.0, 6.0], warmup=1) == [1.0, 2.0, 3.0]
    assert common.step_intervals([0.0, 1.0, 3.0, 6.0], warmup=2) == [2.0, 3.0]
    assert common.alternate(["a", "b"], 0) == ["a", "b"] and common.alternate(["a", "b"], 1) == ["b", "a"]
    assert common.fmt_range([2.0, 1.0, 3.0]) == "1.00–3.00" and common.fmt_range([1.5]) == "1.50"
    assert common.worker_env()["MALLOC_MMAP_THRESHOLD_"] == "131072"
    env = common.worker_env(static_mmap=False)
    assert env.get("MALLOC_MMAP_THRESHOLD_") == os.environ.get("MALLOC_MMAP_THRESHOLD_")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    calls = []
    walls, cpus, results, peaks = common.timed_rounds([lambda: calls.append("f") or 1, lambda: calls.append("g") or 2],
                                                      repeats=2)
    assert calls == ["f", "g"] * 3 and results == [1, 2] and len(walls[0]) == len(cpus[1]) == 2
    if not torch.cuda.is_available():
        assert peaks == [None, None]


def test_model_folder_loads_in_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from llm_trainer.model import LlmModel
    folder = common.write_model_folder(tmp_path / "tiny", "tiny", dtype="fp32")
    assert common.write_model_folder(folder, "tiny") == folder          # reused, not rewritten
    ours = LlmModel.from_pretrained(folder).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert ours.num_parameters() == common.shape_parameters("tiny") == sum(p.numel() for p in theirs.parameters())
    ids = torch.randint(2, 256, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-4)
    tok = common.word_tokenizer(256)
    assert tok(common.as_words([2, 7, 255]), add_special_tokens=False)["input_ids"] == [2, 7, 255]


# ---------------------------------------------------------------------------------------------- the scripts
@pytest.mark.slow
def test_scale_smoke_measures_both_sides(tmp_path):
    pytest.importorskip("trl")
    plot = tmp_path / "scale.png"
    out = subprocess.run([sys.executable, str(BENCH / "scale.py"), "--smoke", "--dir", str(tmp_path), "--plot",
                          str(plot), "--json", str(tmp_path / "rows.json")], capture_output=True, text=True,
                         env=_env(), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted((r["task"], r["side"]) for r in runs) == sorted((t, s) for t in ("sft", "dpo", "grpo")
                                                                  for s in ("ours", "trl"))
    for r in runs:
        assert "error" not in r, r
        assert r["steps"] == 3 and len(r["step_s"]) == 2 and all(t > 0 for t in r["step_s"])
        assert r["peak_rss"] >= r["train_hwm"] > r["import_rss"] > 0
    tokens = {(r["task"], r["side"]): r.get("tokens_per_step") for r in runs}
    assert tokens[("sft", "ours")] == tokens[("sft", "trl")] == 64          # the same rows reach both models
    assert tokens[("dpo", "ours")] == tokens[("dpo", "trl")] == 2 * 63      # (prompt 32 + response 31) × 2
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {r["task"] for r in rows} == {"sft", "dpo", "grpo"} and all("mem_ratio" in r for r in rows)
    assert "| sft | tiny | 64 | on |" in out.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_sh_parses():
    out = subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback runs only without CUDA")
def test_gpu_sh_cpu_fallback_runs_every_part(tmp_path):
    pytest.importorskip("trl")
    wheels = tmp_path / "no_wheels"
    wheels.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**_env(), "OUT": str(out_dir), "WHEELS": str(wheels), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    out = subprocess.run(["bash", str(BENCH / "gpu.sh")], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    summary = (out_dir / "summary.md").read_text()
    for part in ("a_mfu_tiny: ok", "a_mfu_tiny_trainer: ok", "b_sft_packed: ok", "c_generate: ok",
                 "e_packed_attention: ok"):
        assert part in summary
    assert "(a) pretrain tiny" in summary and "(b) SFT with packing" in summary and "(c) greedy generate" in summary
    results = json.loads((out_dir / "results.json").read_text())
    assert {"a_tiny.json", "a_tiny_trainer.json", "b_sft_packed.json", "c_generate.json"} <= set(results)
    assert results["a_tiny.json"]["mfu"] is None and results["a_tiny.json"]["tokens_per_s"] > 0   # no CPU peak
    assert (out_dir / "log.txt").stat().st_size > 0
