"""What each backend computes beyond plain sampling, for the gateway to refuse by name what it cannot.

Kept free of heavy imports: the gateway reads it and never loads a backend. The torch and sgl backends
share our engine (minisgl/engine), where log-probabilities, prompt scoring (echo), penalties and
logit_bias live. The hf baseline runs generate() with a streamer, and mlx runs mlx-lm's generator:
neither exposes them here, so requests that need them get a 400 naming the field.
"""

from __future__ import annotations

ENGINE_FEATURES = frozenset({"logprobs", "prompt_logprobs", "penalties", "logit_bias"})

FEATURES: dict[str, frozenset[str]] = {
    "torch": ENGINE_FEATURES,
    "sgl": ENGINE_FEATURES,
    "hf": frozenset(),
    "mlx": frozenset(),
}


def backend_supports(backend: str, feature: str) -> bool:
    return feature in FEATURES.get(backend, frozenset())
