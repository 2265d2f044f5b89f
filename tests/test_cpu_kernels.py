"""The fused CPU kernels (minisgl/engine/cpu/kernels.c) against torch references, and the fused forward
(FusedCpuForward: decode, prefill and mixed steps) against the model's own forward and float32, for
every family and the real model."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers

from minisgl.assets.checkpoint import eos_token_ids
from minisgl.engine.attention import PagedAttention
from minisgl.engine.cpu.forward import FusedCpuForward
from minisgl.engine.cpu.kernels import CpuKernels, attention_scratch_size, load_cpu_kernels
from minisgl.engine.cpu.linear import can_pack, pack_linears
from minisgl.models import load_model
from minisgl.models.layers import RotaryEmbedding, apply_rope
from tests.test_engine import Collector, make_engine, request, run_all
from tests.test_models import FAMILIES, TINY, _randomize_norms_and_biases

BF16_ULP = 2.0**-7  # relative spacing of bfloat16 values


@pytest.fixture(scope="module")
def kernels() -> CpuKernels:
    k = load_cpu_kernels()
    if k is None:
        # Only a machine without a C compiler may lack them; a failed build here is a failure.
        assert shutil.which("cc") is None and shutil.which("gcc") is None, "the CPU kernels failed to build"
        pytest.skip("no C compiler on this machine")
    return k


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor, ulps: float = 1.0) -> None:
    """Within `ulps` bfloat16 roundings of a float32 reference (elementwise, relative to the row scale)."""
    assert got.dtype == torch.bfloat16
    scale = want.float().abs().amax(dim=-1, keepdim=True) + 1e-6
    err = ((got.float() - want.float()).abs() / scale).max().item()
    assert err <= ulps * BF16_ULP, err


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rmsnorm(kernels: CpuKernels, with_delta: bool) -> None:
    g = torch.Generator().manual_seed(0)
    residual = torch.randn(5, 96, generator=g) * 3
    delta = torch.randn(5, 96, generator=g).bfloat16() if with_delta else None
    weight = 1 + 0.1 * torch.randn(96, generator=g)
    want_residual = residual + (delta.float() if delta is not None else 0)
    want = F.rms_norm(want_residual, (96,), weight, 1e-5)
    out = torch.empty(5, 96, dtype=torch.bfloat16)
    kernels.add_rmsnorm(residual, delta, weight, out, 1e-5)
    assert torch.equal(residual, want_residual)  # updated in place, exactly as the float32 add
    assert_bf16_close(out, want)


def test_silu_mul(kernels: CpuKernels) -> None:
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(3, 2 * 200, generator=g) * 4).bfloat16()
    gate, up = gate_up.float().chunk(2, dim=-1)
    out = torch.empty(3, 200, dtype=torch.bfloat16)
    kernels.silu_mul(gate_up, out)
    assert_bf16_close(out, F.silu(gate) * up)


def _reference_attention(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                         rope: RotaryEmbedding, positions: torch.Tensor, k_pool: torch.Tensor,
                         v_pool: torch.Tensor, write: torch.Tensor, table: torch.Tensor, lens: torch.Tensor,
                         heads: int) -> torch.Tensor:
    """The model's ops: norms, RoPE, index_copy into the pool, SDPA over each sequence's slots."""
    b, (_, kv_heads, d) = qkv.shape[0], k_pool.shape
    q, k, v = qkv.float().split([heads * d, kv_heads * d, kv_heads * d], dim=1)
    q, k, v = q.view(b, heads, d), k.reshape(b, kv_heads, d), v.reshape(b, kv_heads, d)
    if q_norm is not None and k_norm is not None:
        q, k = F.rms_norm(q, (d,), q_norm, 1e-6), F.rms_norm(k, (d,), k_norm, 1e-6)
    cos, sin = rope(positions)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_pool.index_copy_(0, write, k)
    v_pool.index_copy_(0, write, v)
    outs = []
    for i in range(b):
        slots = table[i, : lens[i]]
        outs.append(F.scaled_dot_product_attention(
            q[i][:, None], k_pool[slots].transpose(0, 1), v_pool[slots].transpose(0, 1),
            enable_gqa=True).reshape(heads * d))
    return torch.stack(outs)


@pytest.mark.parametrize("heads,kv_heads,head_dim,qk_norm", [
    (4, 2, 16, False), (9, 3, 64, False), (8, 8, 128, True), (16, 2, 32, True), (16, 2, 256, False)])
def test_decode_attention(kernels: CpuKernels, heads: int, kv_heads: int, head_dim: int, qk_norm: bool) -> None:
    g = torch.Generator().manual_seed(heads * head_dim)
    slots, lens_list = 200, [1, 7, 45, 130]
    b = len(lens_list)
    lens = torch.tensor(lens_list)
    k_pool = torch.randn(slots, kv_heads, head_dim, generator=g)
    v_pool = torch.randn(slots, kv_heads, head_dim, generator=g)
    # each sequence's tokens in scattered, distinct slots; the table is wider than the longest one
    table = torch.zeros(b, 140, dtype=torch.int64)
    perm = torch.randperm(slots - 1, generator=g) + 1
    start = 0
    for i, n in enumerate(lens_list):
        table[i, :n] = perm[start:start + n]
        start += n
    write = table[torch.arange(b), lens - 1].contiguous()
    positions = lens - 1 + 3  # positions need not equal lengths (a shared prefix may start later)
    qkv = (torch.randn(b, (heads + 2 * kv_heads) * head_dim, generator=g) * 2).bfloat16()
    q_norm = (1 + 0.1 * torch.randn(head_dim, generator=g)) if qk_norm else None
    k_norm = (1 + 0.1 * torch.randn(head_dim, generator=g)) if qk_norm else None
    rope = RotaryEmbedding(head_dim, 256, 10000.0, None)

    ref_k, ref_v = k_pool.clone(), v_pool.clone()
    want = _reference_attention(qkv, q_norm, k_norm, rope, positions, ref_k, ref_v, write, table, lens, heads)
    out = torch.empty(b, heads * head_dim, dtype=torch.bfloat16)
    scratch = torch.empty(attention_scratch_size(b, heads, head_dim, table.shape[1]))
    kernels.decode_attention(qkv, q_norm, k_norm, 1e-6, rope.cos_sin, positions, k_pool, v_pool, write, table,
                             lens, out, scratch, heads)
    torch.testing.assert_close(k_pool, ref_k, rtol=1e-5, atol=1e-5)  # the new keys, rotated
    assert torch.equal(v_pool, ref_v)
    assert_bf16_close(out, want, ulps=1.5)


def test_decode_attention_rejects_bad_indices(kernels: CpuKernels) -> None:
    """The C code trusts its indices, so the checked entry point refuses anything out of bounds."""
    k_pool = v_pool = torch.zeros(10, 1, 16)
    rope = RotaryEmbedding(16, 32, 10000.0, None)
    qkv = torch.zeros(1, 3 * 16, dtype=torch.bfloat16)
    out = torch.empty(1, 16, dtype=torch.bfloat16)
    scratch = torch.empty(1000)
    ok = dict(positions=torch.tensor([2]), write=torch.tensor([3]), table=torch.tensor([[1, 2, 3]]),
              lens=torch.tensor([3]))

    def call(**kw: Any) -> None:
        a = {**ok, **kw}
        kernels.decode_attention(qkv, None, None, 1e-6, rope.cos_sin, a["positions"], k_pool, v_pool, a["write"],
                                 a["table"], a["lens"], out, scratch, 1)

    call()
    for bad in (dict(table=torch.tensor([[1, 2, 10]])), dict(write=torch.tensor([-1])),
                dict(lens=torch.tensor([4])), dict(positions=torch.tensor([32])),
                dict(table=torch.tensor([[1, 2, 3]], dtype=torch.int32))):
        with pytest.raises(ValueError):
            call(**bad)
    with pytest.raises(ValueError):
        kernels.add_rmsnorm(torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.bfloat16), torch.ones(8), torch.empty(2, 8),
                            1e-6)  # a bfloat16 delta with a float32 out


# ---------------------------------------------------------------- the fused decode step


class CompareSteps(torch.nn.Module):
    """Runs every engine step three ways on the same context: the packed model's forward (bfloat16
    matmuls, torch ops), the fused forward on that model, and an unpacked float32 copy (the reference,
    run last so the pool's history is float32). Records, for each fast path, the error of its logits and
    of the k/v it wrote into the pool, against the reference, relative to the reference's largest value,
    and the kinds of step seen; the engine goes on with the reference's logits."""

    def __init__(self, reference: torch.nn.Module, packed: torch.nn.Module, kernels: CpuKernels) -> None:
        super().__init__()
        self.reference = reference
        self.packed = packed
        self.fused = FusedCpuForward(packed, kernels)
        self.config = reference.config
        self.errors: dict[str, list[float]] = {"packed": [], "fused": [], "packed_kv": [], "fused_kv": []}
        self.kinds: set[str] = set()

    @staticmethod
    def _written_kv(ctx: PagedAttention) -> torch.Tensor:
        """This step's k/v as they now sit in the pool, every layer: [2, layers, tokens, kv heads, dim]."""
        return torch.stack([ctx.pool.k[:, ctx.write_slots], ctx.pool.v[:, ctx.write_slots]])

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx: PagedAttention) -> torch.Tensor:
        b, t = ctx.num_decode, ids.shape[0]
        self.kinds.add("decode" if b == t else "mixed" if b else "prefill")
        packed = self.packed(ids, positions, ctx)  # each path writes this step's k/v itself
        packed_kv = self._written_kv(ctx)
        fused = self.fused(ids, positions, ctx)
        fused_kv = self._written_kv(ctx)
        want = self.reference(ids, positions, ctx)
        want_kv = self._written_kv(ctx)
        for name, got, ref in (("packed", packed, want), ("fused", fused, want),
                               ("packed_kv", packed_kv, want_kv), ("fused_kv", fused_kv, want_kv)):
            self.errors[name].append(((got - ref).abs().max() / ref.abs().max()).item())
        return want

    def assert_fused_as_accurate(self, steps: int) -> None:
        """The fused path rounds to bfloat16 where the packed forward does (once fewer in silu * up), so
        its logits and its k/v must be as close to float32 as the packed forward's, step for step."""
        e = self.errors
        assert self.fused.steps == len(e["fused"]) >= steps
        for what in ("", "_kv"):
            fused, packed = e["fused" + what], e["packed" + what]
            assert max(fused) <= 1.5 * max(packed) + 1e-3, (what, fused, packed)
            assert sum(fused) <= 1.5 * sum(packed) + 1e-3 * len(packed), (what, fused, packed)


def _packed_pair(path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    reference, packed = load_model(path), load_model(path)
    if not can_pack(packed):
        pytest.skip("no oneDNN in this torch build")
    assert pack_linears(packed) == 4 * packed.config.num_layers + 1
    assert FusedCpuForward.supports(packed) and not FusedCpuForward.supports(reference)
    return reference, packed


@pytest.mark.parametrize("name,config_cls,extra", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_fused_decode_matches_the_model(kernels: CpuKernels, tmp_path: Path, name: str, config_cls: type,
                                        extra: dict[str, Any]) -> None:
    torch.manual_seed(0)
    hf_config = config_cls(**TINY, **extra)
    hf_config.architectures = [config_cls.__name__.replace("Config", "ForCausalLM")]
    hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    _randomize_norms_and_biases(hf)
    hf.save_pretrained(tmp_path)
    compare = CompareSteps(*_packed_pair(tmp_path), kernels)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 30)]
    # small chunks and staggered arrivals: prompt chunks share steps with decode rows, some with a
    # cached prefix
    engine = make_engine(compare, kv_tokens=512, max_model_len=128, chunk_size=8)
    reqs = [request(str(i), p, [], max_new_tokens=12, ignore_eos=True) for i, p in enumerate(prompts)]
    reqs.append(request("again", prompts[2] + prompts[0], [], max_new_tokens=4, ignore_eos=True))
    engine.add_request(reqs[0])
    col = Collector(engine)
    col.step()
    for r in reqs[1:]:
        engine.add_request(r)
        col.step()
    col.run()
    assert col.final["again"].cached_tokens >= 24
    assert compare.kinds == {"decode", "mixed", "prefill"}
    compare.assert_fused_as_accurate(steps=15)
    assert max(compare.errors["fused"]) < 2e-2


def test_fused_forward_on_the_default_model(kernels: CpuKernels, default_model_dir: Path) -> None:
    """The torch backend's CPU default. Its logits are as close to float32 as the packed forward's at
    every step of a batch (greedy tokens of two bfloat16-rounded paths part ways at near-ties, so they
    are not compared), and it still answers."""
    reference, packed = _packed_pair(default_model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Count from 1 to 10."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in questions]
    compare = CompareSteps(reference, packed, kernels)
    run_all(make_engine(compare), [request(str(i), p, [], max_new_tokens=24, ignore_eos=True)
                                   for i, p in enumerate(prompts)])
    compare.assert_fused_as_accurate(steps=24)
    fused = FusedCpuForward(packed, kernels)
    eos = eos_token_ids(default_model_dir)
    answer = run_all(make_engine(fused), [request("q", prompts[0], eos, max_new_tokens=12)]).tokens["q"]
    assert "Paris" in tok.decode(answer) and fused.steps >= 2


def test_torch_backend_uses_the_kernels(kernels: CpuKernels, default_model_dir: Path) -> None:
    """By default on any x86 CPU with AVX2 (engine/cpu/isa.py); tests/test_cpu_paths.py forces each path."""
    from minisgl.backends.base import BackendConfig
    from minisgl.backends.base import create_backend
    from minisgl.engine.cpu import isa as cpu_isa

    if cpu_isa.choose() == "torch":
        pytest.skip("neither AVX2 nor AVX-512 nor AMX here (or MINISGL_CPU_ISA=torch): the model's own ops")
    backend = create_backend("torch", BackendConfig(model_path=str(default_model_dir), device="cpu",
                                                    kv_cache_tokens=1024))
    try:
        assert backend.fused is not None  # type: ignore[attr-defined]
        assert backend.engine.model is backend.fused  # type: ignore[attr-defined]
    finally:
        backend.shutdown()
    off = create_backend("torch", BackendConfig(model_path=str(default_model_dir), device="cpu",
                                                kv_cache_tokens=1024, extra={"cpu_kernels": "0"}))
    try:
        assert off.fused is None  # type: ignore[attr-defined]
    finally:
        off.shutdown()
