"""Helpers shared by the benchmarks: summary statistics, deterministic prompts, machine facts."""

from __future__ import annotations

import math
import os
import platform
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"


# ---------------------------------------------------------------- statistics


def percentile(values: Iterable[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Iterable[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99, min, max of `values`, each multiplied by `scale` (e.g. 1000 for ms)."""
    xs = [v * scale for v in values]
    if not xs:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "min": None, "max": None}
    return {
        "count": len(xs),
        "mean": sum(xs) / len(xs),
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        "min": min(xs),
        "max": max(xs),
    }


# ---------------------------------------------------------------- prompts

# A fixed vocabulary, so prompts are the same on every machine and every run (no datasets offline).
_TOPICS = [
    "the history of lighthouses", "how bread rises", "a city built on water", "the life of honeybees",
    "why the sky is blue", "a journey across a desert", "the first steam engines", "an old library",
    "the migration of whales", "a mountain village in winter", "how rivers shape valleys",
    "a robot learning to paint", "the night market", "a lost letter", "the tides and the moon",
    "a garden through four seasons", "the invention of the printing press", "a train at midnight",
]
_SUBJECTS = [
    "the old captain", "a curious child", "the baker", "our neighbour", "the engineer", "a quiet student",
    "the river", "the wind", "a small dog", "the teacher", "the farmer", "an astronomer", "the city",
    "a traveller", "the musician", "the forest", "the market", "the machine", "a young doctor", "the crew",
]
_VERBS = [
    "watched", "carried", "remembered", "built", "followed", "painted", "measured", "found", "opened",
    "repaired", "described", "crossed", "counted", "heard", "explained", "planted", "studied", "shared",
]
_OBJECTS = [
    "the long road", "a wooden boat", "the morning light", "a box of letters", "the stone bridge",
    "the distant hills", "a cup of tea", "the harbour", "an empty room", "the bright stars", "a map",
    "the tall grass", "a silver key", "the broken clock", "the warm bread", "a field of wheat",
    "the narrow street", "the cold water", "a new song", "the last train",
]
_ENDINGS = [
    "before the sun went down", "while the rain kept falling", "without saying a word", "for many years",
    "with great care", "as the bells rang", "after a long winter", "in the early morning",
    "under the grey clouds", "because nobody else would", "and smiled", "once again",
]
_ASKS = [
    "Write a short story about {t}.", "Explain {t} to a ten year old.", "Give three facts about {t}.",
    "Describe {t} in a few sentences.", "Write a poem about {t}.", "Summarize what you know about {t}.",
]


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
    return s[0].upper() + s[1:]


def make_text(rng: random.Random, words: int) -> str:
    """Natural-ish filler text of about `words` words (whole sentences, so never fewer than one)."""
    out: list[str] = []
    count = 0
    while count < words:
        s = _sentence(rng)
        out.append(s)
        count += len(s.split())
    return " ".join(out)


def make_prompt(key: str, words: int) -> str:
    """A deterministic prompt of about `words` words: context text, then one instruction.

    `key` is a string on purpose: random.Random(-1) and random.Random(1) are the same generator, so
    integer seeds built by arithmetic can collide; string keys (hashed with SHA-512) do not."""
    rng = random.Random(key)
    ask = rng.choice(_ASKS).format(t=rng.choice(_TOPICS))
    ask_words = len(ask.split())
    if words <= ask_words:
        return ask
    return f"{make_text(rng, words - ask_words)} {ask}"


# ---------------------------------------------------------------- env and machine


def env_str(name: str, default: str) -> str:
    value = os.environ.get(name, "")
    return value if value.strip() else default


def parse_int_list(value: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; also accepts spaces."""
    out = [int(x) for x in value.replace(" ", ",").split(",") if x.strip()]
    if not out or any(x < 1 for x in out):
        raise ValueError(f"expected positive integers like '1,4,16', got {value!r}")
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_names() -> list[str]:
    """GPU names from nvidia-smi (no torch import needed); empty when there is none."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpus": gpu_names(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "hostname": platform.node(),
    }


def command_line() -> str:
    """The exact command that produced a result, as one would type it again."""
    import shlex

    return shlex.join([Path(sys.executable).name, *sys.argv])
