"""``llm-trainer chat MODEL_DIR``: chat with a language model or VLM folder in the terminal. Answers stream as they
are generated, the conversation is kept across turns (rendered with the model's chat template), and these
commands are understood: ``/reset`` (forget the conversation), ``/image PATH`` (attach an image to the next
message, VLM), ``/system TEXT`` (set the system prompt and reset), ``/help``, ``/exit``. Ctrl-C stops an answer;
Ctrl-C or Ctrl-D at the prompt quits."""
from __future__ import annotations

import argparse
import os
import sys

from .serve import add_model_arguments, load_from_args

_HELP = ("/reset  forget the conversation    /image PATH  attach an image to the next message (VLM)\n"
         "/system TEXT  set the system prompt (and reset)    /help    /exit  (or Ctrl-D)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible chats)")
    p.add_argument("--image", action="append", default=[], help="image(s) for the first message (VLM)")


def _say(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    from ..generation import GenerateConfig
    from ..serve.chat import ChatSession

    try:
        config = GenerateConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                                do_sample=not args.greedy)
        served = load_from_args(args)
        session = ChatSession(served, config, system=args.system, seed=args.seed)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"llm-trainer chat: {e}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    images = list(args.image)
    print(f"chatting with {served.kind} model '{served.name}' — /help for commands", file=sys.stderr, flush=True)
    while True:
        try:
            if interactive:
                _say("> ")
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            _say("\n")
            return 0
        if not line:
            return 0
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        command, _, rest = line.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/help":
            print(_HELP, file=sys.stderr, flush=True)
            continue
        if command == "/reset":
            session.reset()
            images = []
            print("[conversation cleared]", file=sys.stderr, flush=True)
            continue
        if command == "/system":
            session.system = rest or None
            session.reset()
            print("[system prompt set; conversation cleared]", file=sys.stderr, flush=True)
            continue
        if command == "/image":
            if served.kind != "vlm":
                print(f"[{served.name} is a text model; it does not take images]", file=sys.stderr, flush=True)
            elif not os.path.isfile(rest):
                print(f"[no such image file: {rest}]", file=sys.stderr, flush=True)
            else:
                images.append(rest)
                print(f"[image attached to your next message: {rest}]", file=sys.stderr, flush=True)
            continue
        try:
            session.reply(line, images, write=_say)
        except ValueError as e:
            print(f"[{e}]", file=sys.stderr, flush=True)
            continue
        images = []
        _say("\n")
        if session.interrupted:
            print("[interrupted]", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llm-trainer chat", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
