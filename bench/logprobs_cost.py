"""What the OpenAI extras cost per decode step, in process on the `torch` backend (no HTTP).

A batch of B requests (~100-token prompts) decoding, each variant in alternating rounds so that the
machine's drift hits all alike:

  plain       no extras: the path every ordinary request takes (must cost nothing extra)
  logprobs    every row asks logprobs with 5 alternatives (one log_softmax + topk per step)
  penalties   every row has presence/frequency penalties and a 3-token logit_bias

    python bench/logprobs_cost.py                  # B = 16
    python bench/logprobs_cost.py --batch 4 --rounds 6

Prints a table of median step times and saves JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `bench` and `minisgl` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, command_line, machine_info

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "logprobs": {"logprobs": 5},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {11: 1.0, 12: -1.0, 13: 2.0}},
}


def round_ms(backend: Any, variant: dict[str, Any], batch: int, steps: int, rng: random.Random, tag: str) -> float:
    from minisgl.messages import SamplingParams, TokenizedReq

    rids = [f"{tag}-{i}" for i in range(batch)]
    for rid in rids:
        ids = [rng.randrange(100, 40000) for _ in range(100)]
        params = SamplingParams(max_new_tokens=steps + 8, ignore_eos=True, **variant)
        backend.add_request(TokenizedReq(rid=rid, input_ids=ids, params=params, arrival=time.time()))
    while backend.stats().waiting or any(r.pending > 1 for r in backend.engine.running):
        backend.step()  # prefill everything first: only decode steps are timed
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        backend.step()
        times.append((time.perf_counter() - t) * 1e3)
    for rid in rids:
        backend.abort(rid)
    while backend.has_work():
        backend.step()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    import torch

    from minisgl.backends.base import BackendConfig
    from minisgl.backends.base import create_backend
    from minisgl.assets.embedded import ensure_default_model

    backend = create_backend("torch", BackendConfig(model_path=str(ensure_default_model(quiet=True)), device="cpu"))
    rng = random.Random(0)
    round_ms(backend, {}, args.batch, 4, rng, "warm")
    chosen = [v for v in args.variants.split(",") if v]
    per: dict[str, list[float]] = {name: [] for name in chosen}
    for r in range(args.rounds):
        for name in chosen:
            per[name].append(round_ms(backend, VARIANTS[name], args.batch, args.steps, rng, f"{name}-{r}"))
    med = {name: statistics.median(v) for name, v in per.items()}
    print(f"decode step, batch {args.batch}, threads {torch.get_num_threads()}; medians of {args.rounds} rounds, ms")
    print("| variant | step ms | vs plain |\n| --- | --- | --- |")
    for name, ms in med.items():
        print(f"| {name} | {ms:.1f} | {ms / med['plain']:.2f}x |")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"logprobs_cost_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"command": command_line(), "machine": machine_info(), "batch": args.batch,
                                "median_step_ms": med, "rounds_ms": per}, indent=2))
    print(f"[logprobs_cost] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
