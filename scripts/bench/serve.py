"""Benchmark: `llm-trainer serve` throughput (requests/s, tokens/s) at 1, 4 and 16 concurrent clients, against
`transformers`' `generate` on the same weights, interleaved in one run.

    python scripts/bench/serve.py [--clients 1 4 16] [--prompt-len 32] [--new-tokens 64] [--repeats 3] [--threads 1]

Builds the random Llama of `scripts/bench/generate.py` (~22M parameters by default) with `transformers`, saves it as
an HF folder (plus a tokenizer trained here), and starts `llm-trainer serve` on it in a subprocess. For each
concurrency c, c client threads each send `--requests-per-client` greedy `/v1/completions` requests over HTTP
(keep-alive; prompts of --prompt-len random token ids, EOS ignored, so every request generates exactly
--new-tokens tokens) — the server batches them continuously. The baseline serves the same requests with
`transformers` `generate` in-process, in static batches of c (what one would do without a server: batch the
requests that are there). Server and baseline alternate per repeat; each line gives the median, the range over
repeats, and the ratio server/transformers. The server's answers are checked against `transformers`' tokens.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import build_hf_model  # noqa: E402  (scripts/bench/generate.py: the same model as that benchmark)


def start_server(folder: str, threads: int, max_batch: int) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "llm_trainer.cli.main", "serve", folder, "--port", "0",
                             "--threads", str(threads), "--max-batch", str(max_batch)],
                            stdout=subprocess.PIPE, text=True, env=env)
    m = re.search(r"http://127\.0\.0\.1:(\d+)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise RuntimeError("the server did not start")
    return proc, int(m.group(1))


def run_clients(port: int, prompts: list[list[int]], clients: int, new_tokens: int) -> tuple[float, list]:
    """``clients`` threads share the prompts (round robin), one request at a time each; returns (seconds, tokens)."""
    out: list = [None] * len(prompts)
    errors: list = []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            for i in range(k, len(prompts), clients):
                body = json.dumps({"prompt": prompts[i], "max_tokens": new_tokens, "temperature": 0,
                                   "ignore_eos": True})
                conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
                r = json.loads(conn.getresponse().read())
                out[i] = r["usage"]["completion_tokens"], r["choices"][0]["text"]
        except Exception as e:  # reported after the run
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0, out


def run_hf(hf, prompts: list[list[int]], batch: int, new_tokens: int) -> tuple[float, list]:
    """Static batches of ``batch`` prompts (all of one length here: no padding) through `hf.generate`."""
    outs = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch])
            seq = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            outs += seq[:, ids.shape[1]:].tolist()
    return time.perf_counter() - t0, outs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server and of transformers")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from llm_trainer.tokenizer import Tokenizer, train_tokenizer

    hf = build_hf_model(args.seed, "llama", hidden=args.hidden, layers=args.layers)
    n_params = sum(p.numel() for p in hf.parameters())
    g = torch.Generator().manual_seed(args.seed + 1)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        corpus = Path(d) / "corpus.txt"
        corpus.write_text("the quick brown fox jumps over the lazy dog 0123456789\n" * 200)
        train_tokenizer([corpus], 512, d, template="chatml", show_progress=False)
        Tokenizer(d)  # loadable
        proc, port = start_server(d, args.threads, max(args.clients))
        try:
            rows = {c: {"server": [], "hf": []} for c in args.clients}
            mismatched = 0
            warm = [torch.randint(1, hf.config.vocab_size, (args.prompt_len,), generator=g).tolist()]
            run_clients(port, warm, 1, args.new_tokens)
            run_hf(hf, warm, 1, args.new_tokens)
            for _ in range(args.repeats):
                for c in args.clients:
                    n = c * args.requests_per_client
                    prompts = [torch.randint(1, hf.config.vocab_size, (args.prompt_len,), generator=g).tolist()
                               for _ in range(n)]
                    ts, served = run_clients(port, prompts, c, args.new_tokens)
                    th, hf_out = run_hf(hf, prompts, c, args.new_tokens)
                    assert all(k == args.new_tokens for k, _ in served)
                    tok = Tokenizer(d)
                    mismatched += sum(text != tok.decode(ids) for (_, text), ids in zip(served, hf_out))
                    rows[c]["server"].append((n / ts, n * args.new_tokens / ts))
                    rows[c]["hf"].append((n / th, n * args.new_tokens / th))
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.1f} on {os.cpu_count()} CPUs; torch {torch.__version__}, {args.threads} thread(s)")
    print(f"model: llama, {n_params / 1e6:.1f}M params, fp32; prompts {args.prompt_len} tokens, {args.new_tokens} "
          f"new tokens each (greedy, EOS ignored); {args.requests_per_client} requests per client; "
          f"{args.repeats} repeats, median [min-max]")
    print(f"{'clients':>7} | {'server req/s':>20} | {'server tok/s':>22} | {'transformers tok/s':>22} | "
          f"{'server/transformers':>26}")
    for c in args.clients:
        s, h = rows[c]["server"], rows[c]["hf"]
        ratios = [a[1] / b[1] for a, b in zip(s, h)]

        def fmt(vals, digits=1):
            return f"{statistics.median(vals):.{digits}f} [{min(vals):.{digits}f}-{max(vals):.{digits}f}]"

        print(f"{c:>7} | {fmt([x[0] for x in s], 2):>20} | {fmt([x[1] for x in s]):>22} | "
              f"{fmt([x[1] for x in h]):>22} | {fmt(ratios, 2) + 'x':>26}")
    total = sum(len(rows[c]["server"]) * c * args.requests_per_client for c in args.clients)
    print(f"server answers differing from transformers' greedy tokens: {mismatched}/{total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
