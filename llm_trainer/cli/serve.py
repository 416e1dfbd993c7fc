"""``llm-trainer serve MODEL_DIR``: an OpenAI-compatible HTTP server for a language model, VLM or reward model
folder (``docs/serve.md``). The first line printed is ``... on http://HOST:PORT ...`` (with ``--port 0`` the
system picks a free port)."""
from __future__ import annotations

import argparse
import signal
import sys

_DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``serve`` and ``chat``: where the model and tokenizer are, and how to load them."""
    p.add_argument("model_dir", help="a saved model folder: LlmModel, VlmModel or RewardModel (with tokenizer.json)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or folder (default: the model folder)")
    p.add_argument("--chat-template", default=None, help="override the tokenizer's chat template (chatml, llama3, "
                                                         "plain)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="default: torch's default (float32)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens per sequence (default: the model's max_position_embeddings)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def load_from_args(args: argparse.Namespace, name: str | None = None):
    import torch

    from ..serve.loading import load_served_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_served_model(args.model_dir, tokenizer=args.tokenizer, device=device,
                             dtype=getattr(torch, args.dtype) if args.dtype else None,
                             max_model_len=args.max_model_len, name=name, chat_template=args.chat_template)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded (or scored) together at most")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued sequences before answering 503")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="when idle, wait this long for more requests before starting a batch")
    p.add_argument("--image-dir", default=None, help="VLM: image file paths in requests may name files under this "
                                                     "folder (default: base64 data URLs only)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body accepted")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")


def run(args: argparse.Namespace) -> int:
    from ..serve.server import make_server

    try:
        served = load_from_args(args, name=args.name)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"llm-trainer serve: {e}", file=sys.stderr)
        return 2
    try:
        server = make_server(served, host=args.host, port=args.port, max_batch=args.max_batch,
                             max_waiting=args.max_waiting, batch_wait_s=args.batch_wait_ms / 1000.0,
                             max_body=int(args.max_body_mb * 2 ** 20), image_dir=args.image_dir,
                             verbose=args.verbose)
    except (OSError, ValueError) as e:  # address in use, bad --max-batch, ...
        print(f"llm-trainer serve: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"llm-trainer serve: {served.kind} model '{served.name}' on http://{host}:{port} "
          f"(max batch {args.max_batch}, context {served.max_model_len} tokens)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llm-trainer serve", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
