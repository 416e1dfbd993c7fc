"""`train_tokenizer`: train a byte-level BPE tokenizer from .txt / .jsonl files.

    train_tokenizer corpus/*.txt chats.jsonl --vocab-size 32000 --output my_tokenizer [--template chatml]

Writes ``tokenizer.json`` and ``tokenizer_config.json`` (Hugging Face layout) to ``--output``.
Exit status: 0 on success, 2 on bad arguments or unreadable/invalid input (the message names the file and line).
"""
from __future__ import annotations

import argparse
import sys

from llm_trainer.chat import TEMPLATES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_tokenizer",
        description="Train a byte-level BPE tokenizer from .txt files (newlines kept) and .jsonl files "
                    "(a 'text' field per line, or a chat 'messages' list).")
    p.add_argument("files", nargs="+", help=".txt / .jsonl files, or folders searched for them")
    p.add_argument("-o", "--output", required=True, help="output folder for tokenizer.json + tokenizer_config.json")
    p.add_argument("--vocab-size", type=int, required=True, help="total vocabulary size, special tokens included")
    p.add_argument("--template", default="chatml", choices=sorted(TEMPLATES),
                   help="chat template stored with the tokenizer; picks the default special tokens (default: chatml)")
    p.add_argument("--special-tokens", nargs="*", default=None,
                   help="special tokens replacing the template's defaults (the first is the eos unless --eos-token)")
    p.add_argument("--added-tokens", nargs="*", default=None,
                   help="extra non-special single tokens (default: <think> </think>)")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair frequency for a merge (default 2)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    p.add_argument("--eos-token", default=None)
    p.add_argument("--pad-token", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from llm_trainer.tokenizer import train_tokenizer

    try:
        tok = train_tokenizer(args.files, args.vocab_size, args.output, template=args.template,
                              special_tokens=args.special_tokens, added_tokens=args.added_tokens,
                              min_frequency=args.min_frequency, text_field=args.text_field,
                              eos_token=args.eos_token, pad_token=args.pad_token, show_progress=not args.quiet)
    except (FileNotFoundError, ValueError, UnicodeDecodeError, OSError) as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"train_tokenizer: done: {tok!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
