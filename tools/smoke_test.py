"""Smoke test: one prompt through the whole server (gateway, tokenizer, scheduler, worker), narrated.

    python tools/smoke_test.py --max-new-tokens 32 "Hello from mini-sglang"
    python -m tools.smoke_test --url http://127.0.0.1:8000 --chat "What is a radix tree?"

Without --url it starts a server of its own (launch.py --narrate; its log, which narrates every prefill
and decode step, goes to a file whose path is printed, or inline with --server-log -). The generated
text streams to stdout, then a summary: prompt, cached and completion tokens, TTFT, tokens/s, finish
reason. Exit 0 on success; 1 when the request failed or its result is wrong; 2 when there is no server.
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

EXIT_OK, EXIT_BAD_RESULT, EXIT_NO_SERVER = 0, 1, 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default="Hello from mini-sglang", help="the prompt to send")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="decode exactly --max-new-tokens tokens")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message (messages list)")
    p.add_argument("--raw", action="store_true", help="plain text completion: no chat template around the prompt")
    p.add_argument("--url", default=None, help="use this running server instead of starting one")
    p.add_argument("--backend", default=None, help="backend of the server we start (default: launch.py's)")
    p.add_argument("--server-args", default="", help="more launch.py flags for the server we start")
    p.add_argument("--server-log", default=None, help="file for the started server's log, '-' for inline")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds the request may take")
    return p.parse_args(argv)


def check_health(url: str) -> str | None:
    """None when /health answers 200, else why not."""
    try:
        resp = httpx.get(url.rstrip("/") + "/health", timeout=10.0)
    except httpx.HTTPError as exc:
        return f"cannot reach {url}: {type(exc).__name__}: {exc}"
    return None if resp.status_code == 200 else f"{url}/health answered HTTP {resp.status_code}"


def problems(res: StreamResult, args: argparse.Namespace) -> list[str]:
    """What is wrong with the result, if anything."""
    if not res.ok:
        return [res.error or "request failed"]
    out = []
    if res.finish_reason not in ("stop", "length"):
        out.append(f"unexpected finish reason {res.finish_reason!r}")
    if res.completion_tokens < 1:
        out.append("no tokens were generated")
    if res.prompt_tokens < 1:
        out.append("usage reports no prompt tokens")
    if args.ignore_eos and res.completion_tokens != args.max_new_tokens:
        out.append(f"ignore_eos asked for {args.max_new_tokens} tokens, got {res.completion_tokens}")
    if res.completion_tokens > args.max_new_tokens:
        out.append(f"{res.completion_tokens} tokens exceed max_new_tokens={args.max_new_tokens}")
    return out


def summary(res: StreamResult) -> str:
    ttft = f"{1000 * res.ttft_s:.0f} ms" if res.ttft_s is not None else "n/a (no text)"
    overall = res.completion_tokens / res.e2e_s if res.e2e_s > 0 else 0.0
    rate = res.decode_tok_s()
    decode = f", {rate:.1f} tokens/s after the first" if rate else ""
    return (f"prompt tokens {res.prompt_tokens} ({res.cached_tokens} from the prefix cache), "
            f"completion tokens {res.completion_tokens}, finish reason {res.finish_reason}; "
            f"first token after {ttft}, {res.e2e_s:.2f} s in all, {overall:.1f} tokens/s overall{decode}")


def run(url: str, args: argparse.Namespace, say: Callable[[str], None]) -> int:
    if (why := check_health(url)) is not None:
        print(f"smoke test FAILED: {why}", file=sys.stderr)
        return EXIT_NO_SERVER
    messages = [{"role": "user", "content": args.prompt}] if args.chat else None
    payload = generate_payload(None if messages else args.prompt, messages, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, seed=args.seed, ignore_eos=args.ignore_eos or None,
                               raw=args.raw or None)
    kind = "chat message" if messages else "raw prompt" if args.raw else "prompt"
    say(f"POST {url}/generate: {kind} of {len(args.prompt)} chars, max_new_tokens={args.max_new_tokens}; "
        "the server prefills the prompt, then decodes token by token")
    seen_first = False

    def on_delta(text: str) -> None:
        nonlocal seen_first
        if not seen_first:
            seen_first = True
            say(f"first token after {1000 * (time.perf_counter() - t0):.0f} ms (prefill done); streaming:")
        sys.stdout.write(text)
        sys.stdout.flush()

    t0 = time.perf_counter()
    res = stream_generate(url, payload, on_delta=on_delta, timeout=args.timeout)
    print(flush=True)
    if bad := problems(res, args):
        print(f"smoke test FAILED: {'; '.join(bad)} ({summary(res)})", file=sys.stderr)
        return EXIT_BAD_RESULT
    print(f"smoke test passed: {summary(res)}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = narrator("smoke")
    if args.url:
        return run(args.url, args, say)
    log_path = server_log_path(args.server_log, "smoke")
    server_args = (["--backend", args.backend] if args.backend else []) + shlex.split(args.server_args)
    try:
        server = start_server(server_args, log_path, say, args.startup_timeout)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"smoke test FAILED: the server did not start: {exc}", file=sys.stderr)
        if log := tail(log_path):
            print(f"last lines of {log_path}:\n{log}", file=sys.stderr)
        return EXIT_NO_SERVER
    try:
        code = run(server.url, args, say)
    finally:
        server.stop()  # already started: `with server` would start a second one
    if code != EXIT_OK and (log := tail(log_path)):
        print(f"last lines of the server log {log_path}:\n{log}", file=sys.stderr)
    elif log_path:
        say(f"the server's narrated log (each prefill and decode step): {log_path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
