"""The benchmark scripts stay runnable: every one answers ``--help``, the shared harness (``scripts/bench/common.py``)
measures what it says, ``scale.py --smoke`` measures ours and trl on a tiny model, and ``gpu.sh`` parses and runs its
CPU fallback to the end. Nothing here asserts on a time: the numbers are the scripts' business, these tests check
that they come out, complete and consistent."""
from __future__ import annotations

import json
import os
import re
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


# ------------------------------------------------------------------------------------- scale.py and gpu_report.py
def _run(task="sft", side="ours", cpu=1.0, step=2.0, peak=100 << 20, imports=10 << 20, tokens=64, **kw) -> dict:
    """One results.jsonl record as vs_trl.py + scale.py write it."""
    return dict(task=task, size="tiny", seq=64, batch=1, gc=True, dtype="fp32", side=side, step_s=[step, step + 1],
                step_cpu_s=[cpu, cpu], peak_rss=peak, import_rss=imports, cuda_peak=None, tokens_per_step=tokens, **kw)


def test_scale_schedule_alternates_the_sides_and_resumes():
    import scale
    pts = [("sft", "tiny", 64, True), ("dpo", "tiny", 64, False)]
    todo = scale.schedule(pts, 3, [], batch=1, dtype="fp32")
    assert [(t, rep, side) for t, _, _, _, rep, side in todo] == [
        ("sft", 0, "ours"), ("sft", 0, "trl"), ("sft", 1, "trl"), ("sft", 1, "ours"), ("sft", 2, "ours"),
        ("sft", 2, "trl"), ("dpo", 0, "ours"), ("dpo", 0, "trl"), ("dpo", 1, "trl"), ("dpo", 1, "ours"),
        ("dpo", 2, "ours"), ("dpo", 2, "trl")]
    done = [_run(side="ours"), _run(side="trl"), _run(side="trl", error="boom")]   # a failed run is measured again
    left = scale.schedule(pts[:1], 2, done, batch=1, dtype="fp32")
    assert [(rep, side) for *_, rep, side in left] == [(1, "trl"), (1, "ours")]
    assert len(scale.schedule(pts[:1], 2, done, batch=2, dtype="fp32")) == 4      # another batch: another point


def test_scale_summary_ratios_are_ratios_of_the_medians():
    import scale
    recs = [_run(side="ours", cpu=c, step=c, peak=p << 20) for c, p in ((1.0, 100), (3.0, 300), (2.0, 200))]
    recs += [_run(side="trl", cpu=c, step=2 * c, peak=p << 20) for c, p in ((4.0, 400), (8.0, 500))]
    recs += [_run(task="dpo", side="ours"), _run(task="dpo", side="trl", error="Traceback\nValueError: bad\n")]
    recs += [_run(task="grpo", side="trl")]
    rows = scale.summarize(recs)
    assert [r["task"] for r in rows] == ["sft", "dpo", "grpo"]                     # vs_trl.TASKS order
    sft = rows[0]
    assert sft["ours"]["runs"] == 3 and sft["trl"]["runs"] == 2
    assert sft["cpu_ratio"] == pytest.approx(2.0 / 6.0)                          # median 2 / median(4, 8)
    assert sft["time_ratio"] == pytest.approx(2.5 / 12.5)                        # median of the runs' medians
    assert sft["mem_ratio"] == pytest.approx(200 / 450)
    assert sft["above_ratio"] == pytest.approx((200 - 10) / (450 - 10))
    assert "cpu_ratio" not in rows[1] and rows[1]["errors"] == ["trl: ValueError: bad"]
    table = scale.markdown(rows).splitlines()
    assert len({line.count("|") for line in table}) == 1                         # every row has every column
    assert table[2].startswith("| sft | tiny | 64 | on | 1.00–3.00 | 4.00–8.00 | **0.33×** | 0.20× | 100–300 | "
                               "400–500 | **0.44×** | 0.43× | 3+2 |")
    assert "failed: trl: ValueError: bad" in table[3] and "incomplete (one side only)" in table[4]


def test_gpu_report_renders_every_part(tmp_path):
    import gpu_report
    (tmp_path / "a_tiny.json").write_text(json.dumps(dict(
        size="125M", params=121.9e6, seq=2048, batch=16, mode="loop", compile=False, dtype="bf16", step_s=[0.5],
        tokens_per_s=65536.0, flops_per_token=1e9, peak_flops=989e12, mfu=0.4123, peak_memory=3 << 30)))
    (tmp_path / "scale").mkdir()
    runs = [_run("sft_packed", "ours", step=1.0, tokens=1000, peak=1 << 30),
            _run("sft_packed", "trl", step=2.0, tokens=1000, peak=2 << 30), _run("sft", "ours")]
    (tmp_path / "scale" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    var = dict(tokens_per_s=300.0, peak_above_weights=1 << 30)
    (tmp_path / "c_generate.json").write_text(json.dumps(dict(
        params=20e6, batch=8, new_tokens=16, dtype="bf16",
        variants={"default": var, "static": {**var, "tokens_per_s": 600.0}, "transformers.generate": var})))
    (tmp_path / "c_rollout.json").write_text(json.dumps(dict(
        prompts=2, group=2, prompt_len=16, new_tokens=8, variants={"shared": var, "repeat": var})))   # hf failed
    (tmp_path / "status.txt").write_text("a_tiny: ok (3s)\nc_rollout: FAILED, exit 1 (2s)\n")
    (tmp_path / "device.txt").write_text("device: NVIDIA H200\n")
    assert gpu_report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "summary.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert text.startswith("device: NVIDIA H200") and len({line.count("|") for line in table}) == 1
    assert len(table) == 2 + 1 + 2 + 2 + 2          # head, (a), (b) ×2, (c) generate ×2, (c) rollout ×2
    assert "MFU **41.2 %**" in text and "3.00 GiB" in text
    assert "| (b) SFT with packing, tiny, rows of 64, batch 1, fp32 (1+1 runs) | 667 tok/s | trl 400 tok/s | " \
           "**1.67×** | 1.00 GiB vs trl 2.00 GiB |" in text             # tokens / median step ([1, 2] vs [2, 3])
    assert "(b) SFT, tiny, rows of 64, batch 1, fp32 | incomplete: one side only" in text
    assert ": static | 600 tok/s | transformers 300 tok/s | **2.00×** |" in text
    assert "ours (shared prefill) | 300 tok/s | transformers: missing |" in text
    assert "c_rollout: FAILED" in text
    merged = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(merged) == {"a_tiny.json", "c_generate.json", "c_rollout.json", "scale_runs"}
    assert len(merged["scale_runs"]) == 3


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
    assert out.stdout.count("ours/trl so far: CPU time") == 3                    # once per point, after both sides
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_sh_parses():
    out = subprocess.run(["bash", "-n", str(BENCH / "gpu.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _gpu_sh_parts() -> list[tuple[str, str, list[str]]]:
    """(part name, script, its options) of every ``part`` line of gpu.sh, both branches, arrays expanded."""
    text = (BENCH / "gpu.sh").read_text().replace("\\\n", " ")
    arrays = {m.group(1): m.group(2).split() for m in re.finditer(r"^\s*(\w+)=\((.*)\)$", text, re.M)}
    parts = []
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["part"]:
            arr = [re.fullmatch(r'"\$\{(\w+)\[@\]\}"', w) for w in words]
            words = [w for x, a in zip(words, arr) for w in (arrays[a.group(1)] if a else [x])]
            script = next(w.split("/")[-1] for w in words if w.endswith(".py"))
            parts.append((words[1], script, [w for w in words if w.startswith("--")]))
    return parts


def test_gpu_sh_parts_pass_only_options_their_scripts_have(monkeypatch, capsys):
    """Both branches, the CUDA one included (it cannot run here): a misspelt option would end a part at once."""
    parts = _gpu_sh_parts()
    names = {name for name, _, _ in parts}
    assert {"a_mfu_125M_2k", "b_sft_packed", "c_generate_b8", "c_rollout", "e_packed_attention_flex",
            "a_mfu_tiny", "b_sft_packed", "c_generate", "e_packed_attention"} <= names
    assert [n for n, _, _ in parts][:4] == ["a_mfu_125M_2k", "b_sft_packed", "c_generate_b8", "c_rollout"]
    helps = {}
    for name, script, options in parts:
        if script not in helps:
            monkeypatch.setattr(sys, "argv", [script, "--help"])
            with pytest.raises(SystemExit):
                runpy.run_path(str(BENCH / script), run_name="__main__")
            helps[script] = set(re.findall(r"--[\w-]+", capsys.readouterr().out))
        assert set(options) <= helps[script], (name, set(options) - helps[script])


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
    for part in ("a_mfu_tiny: ok", "a_mfu_tiny_trainer: ok", "b_sft_packed: ok", "c_generate: ok", "c_rollout: ok",
                 "e_packed_attention: ok"):
        assert part in summary
    assert summary.startswith("device: no CUDA")
    for row in ("(a) pretrain tiny", "(b) SFT with packing, tiny, rows of 128, batch 2, fp32 (1+1 runs)",
                "(c) greedy generate", "(c) GRPO rollout"):
        assert row in summary
    results = json.loads((out_dir / "results.json").read_text())
    assert {"a_tiny.json", "a_tiny_trainer.json", "c_generate.json", "c_rollout.json"} <= set(results)
    assert sorted(r["side"] for r in results["scale_runs"]) == ["ours", "trl"]
    assert results["a_tiny.json"]["mfu"] is None and results["a_tiny.json"]["tokens_per_s"] > 0   # no CPU peak
    assert (out_dir / "log.txt").stat().st_size > 0
