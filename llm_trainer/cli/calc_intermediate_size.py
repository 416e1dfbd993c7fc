"""`calc_intermediate_size HIDDEN [--multiple-of 64]`: the SwiGLU MLP width for a hidden size.

SwiGLU has three matrices instead of two, so LLaMA uses 2/3 of the usual 4·h to keep the parameter count:
``multiple_of · ceil(int(8·h/3) / multiple_of)`` — the same formula as ``ModelConfig`` uses when
``intermediate_size`` is None. Prints ``intermediate_size=N``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["swiglu_intermediate_size", "main"]


def swiglu_intermediate_size(hidden_size: int, multiple_of: int = 64) -> int:
    if hidden_size < 1 or multiple_of < 1:
        raise ValueError(f"hidden_size and multiple_of must be >= 1, got {hidden_size}, {multiple_of}")
    base = (8 * hidden_size) // 3
    return multiple_of * -(-base // multiple_of)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="calc_intermediate_size",
                                 description="Print the SwiGLU intermediate size for a hidden size.")
    ap.add_argument("hidden_size", type=int, help="model hidden size")
    ap.add_argument("multiple_of_pos", nargs="?", type=int, default=None, metavar="MULTIPLE_OF",
                    help="(positional form of --multiple-of, as in the original tool)")
    ap.add_argument("--multiple-of", type=int, default=None, help="round up to a multiple of this (default 64)")
    args = ap.parse_args(argv)
    if args.multiple_of is not None and args.multiple_of_pos is not None:
        ap.error("give MULTIPLE_OF either positionally or with --multiple-of, not both")
    multiple_of = next((m for m in (args.multiple_of, args.multiple_of_pos) if m is not None), 64)
    if args.hidden_size < 1:
        ap.error(f"HIDDEN must be >= 1, got {args.hidden_size}")
    if multiple_of < 1:
        ap.error(f"--multiple-of must be >= 1, got {multiple_of}")
    print(f"intermediate_size={swiglu_intermediate_size(args.hidden_size, multiple_of)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
