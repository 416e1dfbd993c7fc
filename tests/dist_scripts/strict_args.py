"""Launcher test target with a strict argparse parser (unknown arguments such as ``--local_rank=0`` exit 2):
prints one JSON line with its parsed arguments and launch variables; ``--backend`` also builds the backend
(``get_backend()``), which announces the run on rank 0."""
import argparse
import json
import os

parser = argparse.ArgumentParser(allow_abbrev=False)
parser.add_argument("--foo", type=int, required=True)
parser.add_argument("--name", default="")
parser.add_argument("--backend", action="store_true")
args = parser.parse_args()
if args.backend:
    from llm_trainer.parallel import get_backend
    backend = get_backend()
    backend.barrier()
env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LLM_TRAINER_BACKEND")}
line = "ARGS_JSON " + json.dumps({"args": vars(args), "env": env}) + "\n"
os.write(1, line.encode())  # one write: lines of concurrent ranks do not interleave
