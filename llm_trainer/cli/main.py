"""``llm-trainer``: ``quickstart`` (the whole pipeline on self-generated data), ``run pipeline.toml`` (multi-stage),
``{pretrain,sft,dpo,reward,grpo,ppo,distill} --config FILE [key=value ...]`` (one stage from a config file,
``docs/cli.md``), ``env`` (a report for bug reports), ``chat MODEL_DIR`` and ``serve MODEL_DIR``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import env, train_cmd


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llm-trainer", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="generate a synthetic arithmetic task and train on it end to end: "
                                          "tokenizer → pretrain → SFT → DPO → GRPO (or --vlm: a tiny VLM)")
    q.add_argument("--output", default=None, help="run folder (default runs/quickstart or runs/quickstart_vlm)")
    q.add_argument("--size", choices=("full", "tiny"), default="full",
                   help="'tiny' finishes in seconds (a smoke run); 'full' is the few-minute run with real accuracy")
    q.add_argument("--stages", default=None, help="comma-separated subset, e.g. pretrain,sft")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--vlm", action="store_true", help="train a tiny vision-language model on drawn shapes instead")

    r = sub.add_parser("run", help="run (or resume) a multi-stage TOML pipeline")
    r.add_argument("pipeline", help="pipeline .toml file")
    r.add_argument("--only", nargs="+", default=None, help="run only these stage names")
    train_cmd.add_parsers(sub)
    env.add_parser(sub)

    from . import chat, serve
    chat.add_arguments(sub.add_parser("chat", help="chat with a model folder in the terminal (streamed answers)",
                                      description=chat.__doc__))
    serve.add_arguments(sub.add_parser("serve", help="OpenAI-compatible HTTP server (+ web chat, reward scoring)",
                                       description=serve.__doc__))

    args = ap.parse_args(argv)
    if args.command in train_cmd.METHODS:
        return train_cmd.run_method(args.command, args.config, args.overrides, print_config=args.print_config)
    if args.command == "env":
        return env.run_env(as_json=args.json)
    if args.command in ("chat", "serve"):
        return (chat if args.command == "chat" else serve).run(args)
    if args.command == "quickstart":
        if args.vlm:
            from ..quickstart.vlm import run_vlm_quickstart
            run_vlm_quickstart(args.output or "runs/quickstart_vlm", size=args.size, seed=args.seed)
            return 0
        from ..quickstart.run import STAGES, run_quickstart
        stages = tuple(s.strip() for s in args.stages.split(",")) if args.stages else STAGES
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            ap.error(f"--stages: unknown {unknown}; choose from {list(STAGES)}")
        run_quickstart(args.output or "runs/quickstart", size=args.size, stages=stages, seed=args.seed)
        return 0
    from ..pipeline import PipelineError, run_pipeline
    try:
        run_pipeline(args.pipeline, only=args.only)
    except PipelineError as e:
        print(f"llm-trainer run: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
