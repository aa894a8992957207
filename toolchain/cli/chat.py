"""`edgesmith chat BUNDLE`: talk to a GGUF bundle (+ LoRA adapter GGUF) in the terminal.

Each line read from stdin is a user turn; the reply streams to stdout as llama.cpp generates it,
rendered with the GGUF's own chat template and stopped at its end-of-turn token. The
conversation is kept (the oldest turns are dropped when it outgrows the context). Commands:
``/reset`` forgets the conversation (the ``--system`` prompt stays), ``/exit`` (or end of input)
quits, ``/help`` lists them. Works with piped stdin: ``echo "What is 2+2?" | edgesmith chat out/``.
"""
from __future__ import annotations

import argparse
import sys
from typing import IO, Iterable

COMMANDS = {"/reset": "forget the conversation (the system prompt stays)", "/exit": "quit (also /quit, Ctrl-D)",
            "/help": "this list"}
DEFAULT_MAX_TOKENS = 256


class Conversation:
    """The message history sent with every turn, with an optional fixed system prompt."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.turns: list[dict] = []

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reset(self) -> None:
        self.turns = []

    def drop_oldest_exchange(self) -> bool:
        """Forget the oldest user turn and its reply; False when only the newest user turn is left."""
        if len(self.turns) <= 1:
            return False
        del self.turns[0]
        while len(self.turns) > 1 and self.turns[0]["role"] != "user":
            del self.turns[0]
        return True


def reply(model, convo: Conversation, out: IO[str], err: IO[str], max_tokens: int, temperature: float) -> str:
    """Stream one reply to ``out``; drop the oldest turns while the prompt overflows the context."""
    while True:
        pieces: list[str] = []
        finish = None
        try:
            with model.lock:
                chunks = model.complete(convo.messages(), max_tokens, stream=True, temperature=temperature)
                try:
                    for chunk in chunks:
                        choice = chunk["choices"][0]
                        piece = choice["delta"].get("content")
                        finish = choice.get("finish_reason") or finish
                        if piece:
                            pieces.append(piece)
                            out.write(piece)
                            out.flush()
                finally:
                    chunks.close()
        except ValueError as exc:  # llama-cpp-python: the prompt exceeds the context window
            if not pieces and "context" in str(exc) and convo.drop_oldest_exchange():
                err.write("(conversation outgrew the context: oldest exchange forgotten)\n")
                continue
            raise
        except KeyboardInterrupt:
            finish = "interrupted"
        out.write("\n")
        out.flush()
        if finish == "length":
            err.write(f"(reply cut at {max_tokens} tokens: raise --max-tokens for longer ones)\n")
        return "".join(pieces)


def chat_loop(model, lines: Iterable[str], out: IO[str] = sys.stdout, err: IO[str] = sys.stderr,
              system: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS, temperature: float = 0.0,
              prompt: str = "") -> int:
    """Read user turns from ``lines`` until /exit or end of input; returns the exit code."""
    convo = Conversation(system)
    it = iter(lines)
    while True:
        if prompt:
            out.write(prompt)
            out.flush()
        try:
            line = next(it)
        except (StopIteration, KeyboardInterrupt):
            if prompt:
                out.write("\n")
            return 0
        text = line.rstrip("\r\n")
        command = text.strip().lower()
        if not text.strip():
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            convo.reset()
            err.write("(conversation cleared)\n")
            continue
        if command == "/help" or (command.startswith("/") and " " not in command):
            if command != "/help":
                err.write(f"unknown command {text.strip()!r}\n")
            err.write("".join(f"  {name:<7} {text}\n" for name, text in COMMANDS.items()))
            continue
        convo.turns.append({"role": "user", "content": text})
        try:
            answer = reply(model, convo, out, err, max_tokens, temperature)
        except ValueError as exc:
            convo.turns.pop()
            err.write(f"edgesmith: {exc} (fix: /reset, a shorter message, or a larger --ctx)\n")
            continue
        convo.turns.append({"role": "assistant", "content": answer})


def add_chat_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chat", help="chat with a GGUF bundle in the terminal",
                              description="Chat with a GGUF bundle (a .gguf, or a directory holding one) through "
                              "llama.cpp, using the model's own chat template. Reads lines from stdin (pipe "
                              "works too); /reset forgets the conversation, /exit or Ctrl-D quits.")
    p.add_argument("bundle", help="a .gguf file or a directory holding one model .gguf")
    p.add_argument("--adapter", metavar="ADAPTER.gguf", help="a LoRA adapter GGUF applied over the model")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for llama.cpp (default 2)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"longest reply in tokens (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--system", help="system prompt kept at the head of the conversation")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--ctx", type=int, default=2048, help="context size in tokens (default 2048)")
    return p


def run_chat(args: argparse.Namespace) -> int:
    from runtimes.llamacpp_runtime import ChatModel
    from toolchain.core.errors import EdgesmithError

    if args.max_tokens < 1:
        raise EdgesmithError(f"--max-tokens must be a positive integer, got {args.max_tokens}")
    if args.temperature < 0:
        raise EdgesmithError(f"--temperature must be 0 or more, got {args.temperature}")
    model = ChatModel(args.bundle, lora_path=args.adapter, threads=args.threads, n_ctx=args.ctx)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {model.name}; /reset forgets, /exit quits", file=sys.stderr)
    try:
        return chat_loop(model, sys.stdin, sys.stdout, sys.stderr, system=args.system, max_tokens=args.max_tokens,
                         temperature=args.temperature, prompt="> " if interactive else "")
    finally:
        model.close()
