"""`prepare_data`: jsonl → memory-mapped token files for every training stage.

    prepare_data --stage sft --tokenizer tok/ --input chats.jsonl more.jsonl --output data/sft \
        [--template NAME|FILE.jinja] [--template-kwargs '{"enable_thinking": false}'] \
        [--reasoning-history {template,keep,drop}] [--max-length 2048] [--workers 4] [--skip-bad] [--image-field images]

pretrain writes one flat ``.npy`` (EOS between documents); sft/dpo/reward/rl/classify write an indexed folder
(classify: ``--labels`` fixes the class names and ids). The record
fields each stage reads, and the output layout, are in ``docs/data.md``. A progress line (docs/s, tokens/s) goes to
stderr, the summary (documents, tokens, truncated, skipped, dropped) to stdout.
Exit status: 0 on success, 2 on bad arguments or bad input (the message names file, line, field and reason).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _template_kwargs(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from llm_trainer.chat import REASONING_HISTORY, TEMPLATES
    from llm_trainer.data.prepare import STAGES

    p = argparse.ArgumentParser(prog="prepare_data",
                                description="Tokenise jsonl files into memory-mapped token files for training.")
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, or a folder holding it")
    p.add_argument("--input", required=True, nargs="+", help="one or more .jsonl files (one JSON object per line)")
    p.add_argument("--output", required=True,
                   help="pretrain: the .npy file to write; other stages: the dataset folder to write")
    p.add_argument("--template", default=None,
                   help="chat template: one of the tokenizer's named templates, a built-in "
                        f"({', '.join(sorted(TEMPLATES))}), or a .jinja file (default: the tokenizer's own)")
    p.add_argument("--template-kwargs", type=_template_kwargs, default=None, metavar="JSON",
                   help="template variables as a JSON object, e.g. '{\"enable_thinking\": false}'")
    p.add_argument("--reasoning-history", default="template", choices=REASONING_HISTORY,
                   help="earlier assistant turns' reasoning: as the template renders it (default), keep every "
                        "turn's reasoning (trained), or drop it")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate samples longer than this many tokens (counted in the summary)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="tokenising processes (default: min(4, CPUs)); 1 = no subprocesses")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (counted and listed) instead of stopping")
    p.add_argument("--image-field", nargs="?", const="images", default=None, metavar="FIELD",
                   help="store image paths from this record field (default name when given alone: images)")
    p.add_argument("--text-field", default="text",
                   help="pretrain/classify: the field holding the text (default: text)")
    p.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                   help="classify: the class names in id order, or one prepared classify folder to take them from "
                        "(default: the sorted string labels of the input, or its int labels)")
    p.add_argument("--chunk-lines", type=int, default=256, help="lines per work unit (default 256)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def _labels(values: list[str] | None):
    """``--labels``: one existing folder → that folder, else the names."""
    return values[0] if values and len(values) == 1 and os.path.isdir(values[0]) else values


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llm_trainer.data.formats import DataError
    from llm_trainer.data.prepare import prepare

    template = args.template
    if template is not None and template.endswith(".jinja"):
        try:
            template = open(template, encoding="utf-8").read()
        except OSError as e:
            print(f"prepare_data: error: cannot read the template file: {e}", file=sys.stderr)
            return 2
    try:
        stats = prepare(args.stage, args.tokenizer, args.input, args.output, template=template,
                        template_kwargs=args.template_kwargs, reasoning_history=args.reasoning_history,
                        max_length=args.max_length, workers=args.workers, skip_bad=args.skip_bad,
                        image_field=args.image_field, text_field=args.text_field, progress=not args.quiet,
                        chunk_lines=args.chunk_lines, labels=_labels(args.labels))
    except (DataError, ValueError, FileNotFoundError, OSError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare_data: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"prepare_data: {stats.summary()}")
    if stats.skipped:
        shown = stats.skipped_examples
        print(f"prepare_data: skipped {stats.skipped} bad record(s); first {len(shown)}:", file=sys.stderr)
        for s in shown:
            print(f"  {s}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
