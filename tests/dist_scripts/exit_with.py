"""Launcher test target: prints its argv (and rank) as one JSON line and exits with the status named by its
last argument."""
import json
import os
import sys

line = "ARGV_JSON " + json.dumps({"argv": sys.argv[1:], "rank": os.environ.get("RANK"),
                                 "world_size": os.environ.get("WORLD_SIZE"),
                                 "backend": os.environ.get("LLM_TRAINER_BACKEND")}) + "\n"
os.write(1, line.encode())  # one write: lines of concurrent ranks do not interleave
sys.exit(int(sys.argv[-1]))
