"""Cost of ``Tokenizer.apply_chat_template(..., tokenize=True)`` (string + ids + assistant mask) per conversation.

    python scripts/bench/chat_template.py                       # needs trl (its chat_templates/*.jinja)
    python scripts/bench/chat_template.py --baseline-checkout /path/to/older/llm_trainer   # also: built-in vs that

Part 1 (one process, interleaved repeats): per conversation, the time of encoding the already rendered string alone
(the baseline: what any tokenization costs) and of ``apply_chat_template`` with

- the built-in ``chatml`` template ({% generation %} blocks: one render),
- Qwen2.5's own template (no generation blocks: the mask comes from rendering prefixes, 1 + 2 per assistant turn),
- Qwen3's own template on multi-turn reasoning (prefix renders + the anchored renders of turns that lose their
  reasoning), and the same with ``reasoning_history="keep"``,
- TRL's ``qwen3_training`` (generation blocks).

Part 2 (``--baseline-checkout``): the built-in ``chatml`` template, this checkout against another one (e.g. the
commit before model templates), each in its own subprocess, alternating.
The tokenizer is a byte-level BPE trained here on the benchmark's own text (vocab 2000) with the templates' tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]

CONVERSATION = [
    {"role": "system", "content": "You are a careful math tutor. Explain briefly."},
    {"role": "user", "content": "What is 17 times 23? Show the steps."},
    {"role": "assistant", "content": "17 x 23 = 17 x 20 + 17 x 3 = 340 + 51 = 391.",
     "reasoning_content": "Split 23 into 20 and 3, multiply each part by 17, then add: 340 and 51 make 391."},
    {"role": "user", "content": "And 391 divided by 17?"},
    {"role": "assistant", "content": "391 / 17 = 23, since 17 x 23 = 391.",
     "reasoning_content": "Division undoes the multiplication above, so the quotient is 23 with no remainder."},
]


def _tokenizer_dir(root: Path) -> Path:
    from tokenizers import AddedToken

    from llm_trainer.tokenizer import train_tokenizer
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for _ in range(200):
            f.write(json.dumps({"messages": CONVERSATION}) + "\n")
    tok = train_tokenizer([corpus], 2000, None, template="chatml", min_frequency=1, show_progress=False)
    tok.backend.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    tok.save(root / "tok")
    return root / "tok"


def _time(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def part1(n: int, repeats: int) -> None:
    import trl

    from llm_trainer.tokenizer import Tokenizer
    templates = Path(trl.__file__).parent / "chat_templates"
    with tempfile.TemporaryDirectory() as tmp:
        d = _tokenizer_dir(Path(tmp))
        builtin = Tokenizer(d)
        model = {name: Tokenizer(d, chat_template=(templates / f"{name}.jinja").read_text())
                 for name in ("qwen2_5", "qwen3", "qwen3_training")}
        text = builtin.apply_chat_template(CONVERSATION, tokenize=False)
        cases = {
            "encode the rendered string (baseline)": lambda: builtin.encode(text),
            "built-in chatml": lambda: builtin.apply_chat_template(CONVERSATION),
            "qwen2_5 (prefix renders)": lambda: model["qwen2_5"].apply_chat_template(CONVERSATION),
            "qwen3 (prefix + anchored renders)": lambda: model["qwen3"].apply_chat_template(CONVERSATION),
            "qwen3, reasoning_history=keep": lambda: model["qwen3"].apply_chat_template(
                CONVERSATION, reasoning_history="keep"),
            "qwen3_training (generation blocks)": lambda: model["qwen3_training"].apply_chat_template(CONVERSATION),
        }
        for fn in cases.values():  # warm up: compile the templates once
            fn()
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(repeats):
            for name, fn in cases.items():
                times[name].append(_time(fn, n))
    base = times["encode the rendered string (baseline)"]
    print(f"{len(text)} characters, 2 assistant turns; {n} calls x {repeats} interleaved repeats; median per call")
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        print(f"{name:40s} {statistics.median(ts):8.1f} us   x{statistics.median(ratios):5.1f} baseline "
              f"(range {min(ratios):.1f}-{max(ratios):.1f})")


def _child(n: int, folder: str) -> None:
    from llm_trainer.tokenizer import Tokenizer
    tok = Tokenizer(folder)
    msgs = [{**m, "think": m["reasoning_content"]} if "reasoning_content" in m else m for m in CONVERSATION]
    msgs = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in msgs]
    tok.apply_chat_template(msgs)
    print(json.dumps(_time(lambda: tok.apply_chat_template(msgs), n)))


def part2(checkout: str, n: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = _tokenizer_dir(Path(tmp))
        runs: dict[str, list[float]] = {"this checkout": [], checkout: []}
        for _ in range(repeats):
            for label, path in (("this checkout", str(HERE)), (checkout, checkout)):
                env = {**os.environ, "PYTHONPATH": path}
                out = subprocess.run([sys.executable, __file__, "--n", str(n), "--child", str(d)], env=env,
                                     capture_output=True, text=True, check=True)
                runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    ratios = [a / b for a, b in zip(runs["this checkout"], runs[checkout])]
    print(f"\nbuilt-in chatml, apply_chat_template(tokenize=True), {n} calls x {repeats} alternating subprocesses")
    for label, ts in runs.items():
        print(f"{label:40s} {statistics.median(ts):8.1f} us per call")
    print(f"ratio this / baseline: {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=300, help="calls per timing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--baseline-checkout", default=None,
                   help="another llm_trainer checkout to compare the built-in template with")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.n, args.child)
        return
    sys.path.insert(0, str(HERE))
    part1(args.n, args.repeats)
    if args.baseline_checkout:
        part2(args.baseline_checkout, args.n, args.repeats)


if __name__ == "__main__":
    main()
