"""Streaming chat in the terminal, narrated.

    python tools/cli_demo.py                          # starts its own server (launch.py --narrate)
    python tools/cli_demo.py --url http://127.0.0.1:8000 --multi-turn
    printf 'Hi\\nTell me more\\n' | python -m tools.cli_demo --multi-turn

Type a line, watch the reply stream in. `/exit` or end of input (Ctrl-D) quits, `/reset` forgets the
conversation. With --multi-turn every request carries the earlier turns (a `messages` list through the
chat template); without it each line is a fresh conversation. Narration (on stderr, off with --quiet)
says what happens: the request sent, the first token's latency, tokens/s at the end. A server started
here runs with --narrate; its log (each prefill and decode step) goes to a file, or inline with
--server-log -.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file: make `tools`, `bench` and `minisgl` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.client import StreamResult, generate_payload, stream_generate
from tools.common import narrator, server_log_path, start_server, tail

EXIT_COMMANDS = ("/exit", "/quit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="chat with this running server instead of starting one")
    p.add_argument("--multi-turn", action="store_true", help="keep earlier turns in the context")
    p.add_argument("--system", default=None, help="a system message at the start of every conversation")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no narration")
    p.add_argument("--backend", default=None, help="backend of the server we start (default: launch.py's)")
    p.add_argument("--server-args", default="", help="more launch.py flags for the server we start")
    p.add_argument("--server-log", default=None, help="file for the started server's log, '-' for inline")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one reply may take")
    return p.parse_args(argv)


class Chat:
    """The conversation so far, and how to send the next line of it."""

    def __init__(self, url: str, args: argparse.Namespace, say: Callable[[str], None]) -> None:
        self.url, self.args, self.say = url, args, say
        self.history: list[dict[str, str]] = []
        self.client = httpx.Client(timeout=httpx.Timeout(args.timeout, connect=10.0))
        self.failures = 0

    def reset(self) -> None:
        self.history.clear()
        self.say("conversation forgotten")

    def messages_for(self, line: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.args.system}] if self.args.system else []
        earlier = self.history if self.args.multi_turn else []
        return [*system, *earlier, {"role": "user", "content": line}]

    def send(self, line: str) -> StreamResult:
        messages = self.messages_for(line)
        a = self.args
        payload = generate_payload(messages=messages, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                   top_p=a.top_p, seed=a.seed)
        self.say(f"request sent: {len(messages)} message(s), {sum(len(m['content']) for m in messages)} chars, "
                 f"max_new_tokens={a.max_new_tokens}")
        t0 = time.perf_counter()
        started = False

        def on_delta(text: str) -> None:
            nonlocal started
            if not started:
                started = True
                self.say(f"first token after {1000 * (time.perf_counter() - t0):.0f} ms")
                sys.stdout.write("assistant> ")
            sys.stdout.write(text)
            sys.stdout.flush()

        res = stream_generate(self.url, payload, on_delta=on_delta, client=self.client)
        if started:
            print(flush=True)
        self.after(line, res)
        return res

    def after(self, line: str, res: StreamResult) -> None:
        if not res.ok:
            self.failures += 1
            print(f"error: {res.error}", file=sys.stderr, flush=True)
            return
        if self.args.multi_turn:
            self.history += [{"role": "user", "content": line}, {"role": "assistant", "content": res.text}]
        rate = res.decode_tok_s()
        self.say(f"{res.completion_tokens} tokens in {res.e2e_s:.2f} s"
                 + (f", {rate:.1f} tokens/s after the first" if rate else "")
                 + f"; finish: {res.finish_reason}; prompt {res.prompt_tokens} tokens, {res.cached_tokens} cached")

    def close(self) -> None:
        self.client.close()


def read_line(interactive: bool) -> str | None:
    """The next input line, or None at end of input. The prompt is shown only on a terminal."""
    if interactive:
        sys.stdout.write("you> ")
        sys.stdout.flush()
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def chat_loop(chat: Chat) -> None:
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = read_line(interactive)
        except KeyboardInterrupt:
            print(file=sys.stdout)
            return
        if line is None or line.strip() in EXIT_COMMANDS:
            return
        if not line.strip():
            continue
        if line.strip() == "/reset":
            chat.reset()
            continue
        try:
            chat.send(line)
        except KeyboardInterrupt:  # stop this reply (closing the stream aborts it on the server), keep going
            print("\n[interrupted]", flush=True)


def run(url: str, args: argparse.Namespace, say: Callable[[str], None]) -> int:
    mode = "multi-turn: earlier turns stay in context" if args.multi_turn else "single-turn"
    say(f"chatting with {url} ({mode}); /exit or Ctrl-D quits, /reset forgets")
    chat = Chat(url, args, say)
    try:
        chat_loop(chat)
    finally:
        chat.close()
    say("bye")
    return 1 if chat.failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = narrator("demo", not args.quiet)
    if args.url:
        return run(args.url, args, say)
    log_path = server_log_path(args.server_log, "demo")
    server_args = (["--backend", args.backend] if args.backend else []) + shlex.split(args.server_args)
    try:
        server = start_server(server_args, log_path, say, args.startup_timeout)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"could not start a server: {exc}", file=sys.stderr)
        if log := tail(log_path):
            print(f"last lines of {log_path}:\n{log}", file=sys.stderr)
        return 2
    try:
        if log_path:
            say(f"the server narrates each prefill and decode step in {log_path} (tail -f it to watch)")
        return run(server.url, args, say)
    finally:
        server.stop()  # already started: `with server` would start a second one


if __name__ == "__main__":
    sys.exit(main())
