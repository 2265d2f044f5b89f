"""CPU speed-up for the `torch` backend: linears as bfloat16 AMX matmuls with pre-packed weights.

Measured on a 2-core Sapphire Rapids (AMX) box with SmolLM2-135M, for the 30 layers' linears of one
decode step: float32 costs 17 ms for 1 token but 31 ms for 4 and 44 ms for 16 (MKL's small-batch GEMM
is far from bandwidth-bound), while bfloat16 on AMX tiles costs about 14 ms for 1 to 16 tokens once
each weight is packed for oneDNN at load time (plain `F.linear` re-lays the weight out on every call:
20 ms). Prefill is 2-3x faster too.

A whole-bfloat16 model is the fastest but hurts a model this small (greedy "What is the capital of
France?" stops answering "Paris"), so the default, `mixed`, keeps the model in float32 (residual
stream, norms, attention, KV cache, sampling) and runs only the matmuls (the linears and the logits
projection) in bfloat16; their outputs go back to float32 wherever the next op needs it (BF16_OUT lists
the ones that need not). Answers match float32 on our checks at nearly bfloat16 speed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("minisgl.engine")


def cpu_has_amx() -> bool:
    """True where bfloat16 matmuls run on AMX tiles: there they beat float32 at every batch size."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe and probe()) and torch.backends.mkldnn.is_available()
    except RuntimeError:
        return False


class PackedLinear(nn.Module):
    """Stands in for an nn.Linear on CPU: a bfloat16 weight packed once for oneDNN. The input is cast to
    bfloat16 for the matmul and the output back to the input's dtype (a no-op for bfloat16 models),
    unless `bf16_out`: then the bfloat16 result goes on as it is (see BF16_OUT)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, bf16_out: bool = False) -> None:
        super().__init__()
        self.bf16_out = bf16_out
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16))
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    @classmethod
    def of(cls, linear: nn.Linear, bf16_out: bool = False) -> PackedLinear:
        return cls(linear.weight, linear.bias, bf16_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed,
                                                 self.bias, "none", [], "")
        if not self.bf16_out:
            out = out.to(x.dtype)
        return out.view(*shape[:-1], self.out_features)


# Linears whose bfloat16 output needs no cast back: o_proj and down_proj feed the residual add, which
# promotes to float32 by itself; gate_up feeds silu(gate) * up, whose result down_proj casts to bfloat16
# anyway. On a small CPU model each skipped cast is a whole kernel per layer (decode is op-bound).
BF16_OUT = ("o_proj", "down_proj", "gate_up_proj")


def can_pack(model: nn.Module) -> bool:
    param = next(model.parameters())
    return (param.device.type == "cpu" and param.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Swap the nn.Linear modules of a CPU model for PackedLinear (not those named in `skip`: the model
    reads lm_head's weight directly) and, where the model has a `logits_proj` hook (CausalLM), pack
    the logits projection too: 49152 x 576 for SmolLM2, a quarter of a float32 decode step at batch 4.
    Returns how many matmuls were packed; 0 where it does not apply. Checks one layer against F.linear
    first and leaves the model alone on a mismatch."""
    if not can_pack(model):
        return 0
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children()
             if isinstance(child, nn.Linear) and name not in skip]
    if not swaps:
        return 0
    try:
        probe = swaps[0][2]
        x = torch.randn(3, probe.in_features, dtype=probe.weight.dtype)
        with torch.inference_mode():
            want = probe(x).float()
            got = PackedLinear.of(probe)(x).float()
        scale = want.abs().max().item() + 1e-6
        if (got - want).abs().max().item() > 2e-2 * scale:
            raise RuntimeError("the packed linear disagrees with F.linear")
    except RuntimeError as exc:  # an op missing or broken in this torch build
        log.warning("not packing linears for oneDNN: %s", exc)
        return 0
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear.of(child, bf16_out=name in BF16_OUT))
    if hasattr(model, "logits_proj") and hasattr(model, "lm_head_weight"):
        model.logits_proj = PackedLinear(model.lm_head_weight())
        return len(swaps) + 1
    return len(swaps)
