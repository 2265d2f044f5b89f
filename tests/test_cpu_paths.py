"""Every CPU path of engine/cpu/isa.py on whatever CPU runs the tests: the weight-streaming kernels and the
float32 fused kernels of each ISA build this CPU supports (avx512, avx2) against torch references, the
GGUF block matching, the dispatch, and engine-level greedy answers of each path (avx512, avx2 and the
bfloat16 oneDNN `amx` path, which oneDNN runs without AMX too) against float32 transformers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from minisgl.engine.cpu import isa as cpu_isa
from minisgl.engine.cpu.forward import FusedCpuForward
from minisgl.engine.cpu.kernels import CpuKernels, load_cpu_kernels, weight_row_bytes
from minisgl.engine.cpu.linear import can_pack, pack_linears
from minisgl.engine.cpu.weights import (MAX_KERNEL_ROWS, GgufBlocks, find_gguf, make_weight, read_gguf_tensors,
                                        weights_for)
from minisgl.models import load_model
from tests.test_cpu_kernels import _reference_attention
from tests.test_engine import (  # noqa: F401 (fixtures)
    eos, expected, hf, make_engine, model, model_dir, prompts, request, run_all, tok)
from minisgl.models.layers import RotaryEmbedding

VECTOR_ISAS = [isa for isa in ("avx512", "avx2") if isa in cpu_isa.supported()]
QTYPES = {"q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}


@pytest.fixture(scope="module", params=VECTOR_ISAS or [None], ids=VECTOR_ISAS or ["no-x86-vector-isa"])
def kernels(request: pytest.FixtureRequest) -> CpuKernels:
    isa = request.param
    if isa is None:
        assert cpu_isa.kernel_isa() is None
        pytest.skip("this CPU has neither AVX2 nor AVX-512: the torch path is its only one")
    k = load_cpu_kernels(isa)
    assert k is not None, f"the {isa} build of the CPU kernels failed"
    assert k.isa == isa
    return k


def random_blocks(fmt: str, n: int, k: int, g: torch.Generator) -> np.ndarray:
    """n rows of k weights in `fmt` with random payloads and scales of realistic size (fp16 d, m)."""
    nb = k // 32
    if fmt in ("f32", "bf16"):
        w = torch.randn(n, k, generator=g) * 0.05
        w = w if fmt == "f32" else w.bfloat16()
        return w.view(torch.uint8).reshape(n, -1).numpy()
    d = (torch.rand(n, nb, 1, generator=g) * 0.02 + 1e-3).half()
    if fmt == "q4_1":
        m = (-torch.rand(n, nb, 1, generator=g) * 0.1).half()
        qs = torch.randint(0, 256, (n, nb, 16), generator=g, dtype=torch.uint8)
        blocks = torch.cat([d.view(torch.uint8), m.view(torch.uint8), qs], -1)
    else:
        qs = torch.randint(-128, 128, (n, nb, 32), generator=g, dtype=torch.int8).view(torch.uint8)
        blocks = torch.cat([d.view(torch.uint8), qs], -1)
    return blocks.reshape(n, -1).numpy()


def dense_of(fmt: str, blocks: np.ndarray, k: int) -> torch.Tensor:
    """The float32 weights a format stands for: gguf-py's dequantization for the GGUF ones."""
    if fmt == "f32":
        return torch.from_numpy(blocks.copy()).view(torch.float32)
    if fmt == "bf16":
        return torch.from_numpy(blocks.copy()).view(torch.bfloat16).float()
    return torch.from_numpy(dequantize(blocks, QTYPES[fmt]).astype(np.float32)).reshape(-1, k)


# ---------------------------------------------------------------- the weight-streaming kernels


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "bf16", "f32"])
def test_gemm_matches_float64(kernels: CpuKernels, fmt: str) -> None:
    """Every batch size up to past the register tile (and a row count that is no multiple of the
    panel), with and without a bias, against float64 on the dequantized weights."""
    g = torch.Generator().manual_seed(7)
    n, k = 70, 96
    blocks = random_blocks(fmt, n, k, g)
    assert blocks.shape == (n, weight_row_bytes(fmt, k))
    w = dense_of(fmt, blocks, k)
    data = torch.from_numpy(blocks.copy())
    bias = torch.randn(n, generator=g)
    for b in (1, 2, 3, 4, 5, 6, 7, 13, 16, 20):
        x = torch.randn(b, k, generator=g)
        for with_bias in (False, True):
            out = torch.full((b, n), float("nan"))
            kernels.gemm(fmt, data, x, out, n, bias if with_bias else None)
            want = x.double() @ w.double().T + (bias.double() if with_bias else 0)
            err = ((out.double() - want).abs().max() / want.abs().max()).item()
            assert err < 1e-5, (b, with_bias, err)


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "bf16"])
def test_gemm_widens_to_exactly_the_dequantized_weights(kernels: CpuKernels, fmt: str) -> None:
    """x = rows of the identity: each output is one weight times 1, so any difference from gguf-py's
    float32 weights (e.g. a fused multiply-add in Q4_1's d * q + m) shows up exactly."""
    g = torch.Generator().manual_seed(8)
    n, k = 12, 64
    blocks = random_blocks(fmt, n, k, g)
    out = torch.empty(k, n)
    kernels.gemm(fmt, torch.from_numpy(blocks.copy()), torch.eye(k), out, n)
    assert torch.equal(out.T, dense_of(fmt, blocks, k))


def _panel_case(kernels: CpuKernels, fmt: str, seed: int):  # type: ignore[no-untyped-def]
    """70 random rows of 96 weights in `fmt` (no multiple of a 16-row panel), their float32 weights,
    the panels and a bias; the generator goes on to make the inputs."""
    g = torch.Generator().manual_seed(seed)
    n, k = 70, 96
    blocks = random_blocks(fmt, n, k, g)
    packed = kernels.pack_panels(fmt, torch.from_numpy(blocks.copy()), k)
    return g, n, k, dense_of(fmt, blocks, k), packed, torch.randn(n, generator=g)


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "bf16"])
def test_fma_gemm_matches_float64(kernels: CpuKernels, fmt: str) -> None:
    """The float32 FMA kernels over the panels (every AVX2 / AVX-512 build): float32 inputs, the
    weights exact, float32 sums. Every batch size past the tile (6 rows with AVX-512, 4 with AVX2), a
    row count that is no multiple of the 16-row panel (nor of AVX2's 8-row half), with and without bias."""
    g, n, k, w, packed, bias = _panel_case(kernels, fmt, 11)
    for b in (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 20):
        x = torch.randn(b, k, generator=g)
        for with_bias in (False, True):
            out = torch.full((b, n), float("nan"))
            kernels.gemm_panels(fmt, packed, x, out, n, bias if with_bias else None)
            want = x.double() @ w.double().T + (bias.double() if with_bias else 0)
            err = ((out.double() - want).abs().max() / want.abs().max()).item()
            assert err < 2e-6, (b, with_bias, err)  # float32 sums of float32 products, not bfloat16 inputs


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "bf16"])
def test_fma_gemm_keeps_the_weights(kernels: CpuKernels, fmt: str) -> None:
    """x = rows of the identity: each output is one weight, exactly gguf-py's float32 one (Q4_1: d * q
    is exact and + m rounds once, as the dequantization does)."""
    g = torch.Generator().manual_seed(12)
    n, k = 20, 64
    blocks = random_blocks(fmt, n, k, g)
    out = torch.empty(k, n)
    kernels.gemm_panels(fmt, kernels.pack_panels(fmt, torch.from_numpy(blocks.copy()), k), torch.eye(k), out, n)
    assert torch.equal(out.T, dense_of(fmt, blocks, k))


def _block_parts(fmt: str, blocks: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """d * q and the minimum m (Q4_1; zeros for Q8_0) of each weight of GGUF blocks, float64 [n, k] each."""
    b = blocks.reshape(n, k // 32, 20 if fmt == "q4_1" else 34)
    d = torch.from_numpy(b[:, :, 0:2].copy()).view(torch.float16).double()  # [n, blocks, 1]
    if fmt == "q8_0":
        q = torch.from_numpy(b[:, :, 2:].copy().view(np.int8).astype(np.float64))
        return (d * q).reshape(n, k), torch.zeros(n, k, dtype=torch.float64)
    m = torch.from_numpy(b[:, :, 2:4].copy()).view(torch.float16).double()
    qs = torch.from_numpy(b[:, :, 4:].astype(np.int64))
    q = torch.cat([qs & 15, qs >> 4], dim=-1).double()  # low nibbles are weights 0..15, high 16..31
    return (d * q).reshape(n, k), m.expand(n, k // 32, 32).reshape(n, k)


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("vnni", [False, True], ids=["madd", "vnni"])
def test_i16_gemm_matches_float64_on_int16_rows(kernels: CpuKernels, vnni: bool, fmt: str) -> None:
    """The int16 kernels over Q4_1 panels and int16-packed Q8_0 ones: each input row as int16 with one
    scale (max |x| / 32767), the integers exact, exact integer sums; Q4_1's minimum term from the
    float32 inputs. Both copies (vpmaddwd + vpaddd, and VNNI's vpdpwssd where this CPU has it) give the
    same bits."""
    from minisgl.engine.cpu.kernels import VNNI_FLAG

    if vnni and VNNI_FLAG[kernels.isa] not in cpu_isa.cpu_flags():
        pytest.skip(f"this CPU has no {VNNI_FLAG[kernels.isa]} for the {kernels.isa} build's VNNI copy")
    g = torch.Generator().manual_seed(13)
    n, k = 70, 96
    blocks = random_blocks(fmt, n, k, g)
    dq, m = _block_parts(fmt, blocks, n, k)
    assert torch.equal((dq + m).float(), dense_of(fmt, blocks, k))  # the parts are the weights
    packed = kernels.pack_panels(fmt, torch.from_numpy(blocks.copy()), k, int16=fmt == "q8_0")
    bias = torch.randn(n, generator=g)
    fn = getattr(kernels.raw, f"gemm_i16{'v' if vnni else ''}_{fmt}p")
    for b in (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 20):
        x = torch.randn(b, k, generator=g) * torch.linspace(0.1, 3, k)
        # as the kernel rounds, in float32: the scale, its inverse, the product, to even, within +-32767
        scale = x.abs().amax(dim=1, keepdim=True) * torch.tensor(1 / 32767, dtype=torch.float32)
        x16 = torch.round(x * (1 / scale)).clamp(-32767, 32767).double() * scale.double()
        for with_bias in (False, True):
            out = torch.full((b, n), float("nan"))
            fn(packed.data_ptr(), x.data_ptr(), out.data_ptr(), bias.data_ptr() if with_bias else None, b, k, n)
            want = x16 @ dq.T + x.double() @ m.T + (bias.double() if with_bias else 0)
            # float32 sums, plus at most one int16 step where an input sits on a rounding tie (the
            # compiler's float32 1 / scale may differ from torch's in the last bit)
            tol = 2e-6 * want.abs().max() + scale.double() * dq.abs().max()
            assert ((out.double() - want).abs() <= tol).all(), (b, with_bias)
            if not vnni:
                api = torch.empty(b, n)
                kernels.gemm_panels(fmt, packed, x, api, n, bias if with_bias else None, inputs="i16")
                ref = torch.empty(b, n)  # the entry the wrapper picks: this copy or the VNNI one, same bits
                fn(packed.data_ptr(), x.data_ptr(), ref.data_ptr(), bias.data_ptr() if with_bias else None, b, k, n)
                assert torch.equal(api, ref)
    with pytest.raises(ValueError):  # the int16 kernels read the GGUF blocks, not bfloat16 weights
        kernels.gemm_panels("bf16", kernels.pack_panels("bf16", torch.zeros(8, 128, dtype=torch.uint8), 64),
                            torch.zeros(2, 64), torch.empty(2, 8), 8, inputs="i16")
    with pytest.raises(ValueError):  # int16 packing is for Q8_0 panels
        kernels.pack_panels("q4_1", torch.from_numpy(blocks.copy()), k, int16=True)


@pytest.fixture()
def dot_kernels(kernels: CpuKernels) -> CpuKernels:
    if not kernels.can_dot:
        assert kernels.isa != "avx512" or "avx512_bf16" not in cpu_isa.cpu_flags()
        pytest.skip(f"the bfloat16 dot kernels need the avx512 build on a CPU with AVX512_BF16 ({kernels.isa} build)")
    return kernels


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "bf16"])
def test_dot_gemm_matches_float64_on_bf16_inputs(dot_kernels: CpuKernels, fmt: str) -> None:
    """The panel kernels: x rounded to bfloat16, the weights exact, float32 sums. Every batch size
    past the 8-row tile, a row count that is no multiple of the 16-row panel, with and without bias."""
    g, n, k, w, packed, bias = _panel_case(dot_kernels, fmt, 9)
    for b in (1, 2, 3, 5, 7, 8, 9, 13, 16, 20):
        x = torch.randn(b, k, generator=g)
        for with_bias in (False, True):
            out = torch.full((b, n), float("nan"))
            dot_kernels.gemm_dot(fmt, packed, x, out, n, bias if with_bias else None)
            want = x.bfloat16().double() @ w.double().T + (bias.double() if with_bias else 0)
            err = ((out.double() - want).abs().max() / want.abs().max()).item()
            assert err < 1e-5, (b, with_bias, err)
            # the input really is rounded (not a float32 product that happens to pass)
            exact = x.double() @ w.double().T + (bias.double() if with_bias else 0)
            assert ((out.double() - exact).abs().max() / exact.abs().max()).item() > 1e-4


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "bf16"])
def test_dot_gemm_keeps_the_weights(dot_kernels: CpuKernels, fmt: str) -> None:
    """x = rows of the identity (bfloat16 as they are): each output is one weight, gguf-py's float32
    one up to a float32 rounding of Q4_1's folded minimum (m - 128 d, see cpu_kernels.c)."""
    g = torch.Generator().manual_seed(10)
    n, k = 20, 64
    blocks = random_blocks(fmt, n, k, g)
    want = dense_of(fmt, blocks, k)
    out = torch.empty(k, n)
    dot_kernels.gemm_dot(fmt, dot_kernels.pack_panels(fmt, torch.from_numpy(blocks.copy()), k), torch.eye(k), out, n)
    if fmt == "q4_1":
        torch.testing.assert_close(out.T, want, rtol=0, atol=2.0**-20 * want.abs().max().item())
    else:
        assert torch.equal(out.T, want)


def test_dot_gemm_rejects_bad_shapes(dot_kernels: CpuKernels) -> None:
    data = torch.zeros(8, weight_row_bytes("q4_1", 64), dtype=torch.uint8)
    packed = dot_kernels.pack_panels("q4_1", data, 64)
    with pytest.raises(ValueError):
        dot_kernels.pack_panels("f32", torch.zeros(8, 256, dtype=torch.uint8), 64)
    with pytest.raises(ValueError):
        dot_kernels.gemm_dot("q4_1", packed, torch.zeros(2, 64), torch.empty(2, 40), 40)  # more rows than packed
    with pytest.raises(ValueError):
        dot_kernels.gemm_dot("q8_0", packed, torch.zeros(2, 64), torch.empty(2, 8), 8)  # packed as another format
    with pytest.raises(ValueError):
        dot_kernels.gemm_dot("q4_1", packed, torch.zeros(2, 64, dtype=torch.bfloat16), torch.empty(2, 8), 8)


def test_gemm_rejects_bad_shapes(kernels: CpuKernels) -> None:
    data = torch.zeros(8, weight_row_bytes("q4_1", 64), dtype=torch.uint8)
    with pytest.raises(ValueError):
        kernels.gemm("q4_1", data, torch.zeros(2, 64), torch.empty(2, 7), 7)  # rows of W != n
    with pytest.raises(ValueError):
        kernels.gemm("q4_1", data[:, :-1], torch.zeros(2, 64), torch.empty(2, 8), 8)  # short rows
    with pytest.raises(ValueError):
        kernels.gemm("q4_0", data, torch.zeros(2, 64), torch.empty(2, 8), 8)
    with pytest.raises(ValueError):
        kernels.gemm("f32", torch.zeros(8, 40 * 4, dtype=torch.uint8), torch.zeros(2, 40), torch.empty(2, 8), 8)


# ---------------------------------------------------------------- the float32 fused kernels


def test_add_rmsnorm_f32(kernels: CpuKernels) -> None:
    g = torch.Generator().manual_seed(0)
    residual = torch.randn(5, 96, generator=g) * 3
    delta = torch.randn(5, 96, generator=g)
    weight = 1 + 0.1 * torch.randn(96, generator=g)
    want_residual = residual + delta
    out = torch.empty(5, 96)
    kernels.add_rmsnorm(residual, delta, weight, out, 1e-5)
    assert torch.equal(residual, want_residual)
    torch.testing.assert_close(out, F.rms_norm(want_residual, (96,), weight, 1e-5), rtol=2e-6, atol=2e-6)
    kernels.add_rmsnorm(residual, None, weight, out, 1e-5)
    assert torch.equal(residual, want_residual)
    torch.testing.assert_close(out, F.rms_norm(want_residual, (96,), weight, 1e-5), rtol=2e-6, atol=2e-6)
    with pytest.raises(ValueError):  # a bfloat16 delta with a float32 output
        kernels.add_rmsnorm(residual, delta.bfloat16(), weight, out, 1e-5)


def test_silu_mul_f32(kernels: CpuKernels) -> None:
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(3, 2 * 200, generator=g) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    out = torch.empty(3, 200)
    kernels.silu_mul(gate_up, out)
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads,kv_heads,head_dim,qk_norm", [(9, 3, 64, False), (16, 2, 32, True), (8, 8, 128, True),
                                                        (8, 2, 64, True), (16, 2, 128, False)])  # groups 1-8, D 64 / 128
def test_decode_attention_f32(kernels: CpuKernels, heads: int, kv_heads: int, head_dim: int, qk_norm: bool) -> None:
    g = torch.Generator().manual_seed(heads + head_dim)
    slots, lens_list = 200, [1, 7, 45, 130]
    b = len(lens_list)
    lens = torch.tensor(lens_list)
    k_pool = torch.randn(slots, kv_heads, head_dim, generator=g)
    v_pool = torch.randn(slots, kv_heads, head_dim, generator=g)
    table = torch.zeros(b, 140, dtype=torch.int64)
    perm = torch.randperm(slots - 1, generator=g) + 1
    start = 0
    for i, n in enumerate(lens_list):
        table[i, :n] = perm[start:start + n]
        start += n
    write = table[torch.arange(b), lens - 1].contiguous()
    positions = lens - 1 + 3
    qkv = torch.randn(b, (heads + 2 * kv_heads) * head_dim, generator=g) * 2
    q_norm = (1 + 0.1 * torch.randn(head_dim, generator=g)) if qk_norm else None
    k_norm = (1 + 0.1 * torch.randn(head_dim, generator=g)) if qk_norm else None
    rope = RotaryEmbedding(head_dim, 256, 10000.0, None)
    ref_k, ref_v = k_pool.clone(), v_pool.clone()
    want = _reference_attention(qkv, q_norm, k_norm, rope, positions, ref_k, ref_v, write, table, lens, heads)
    out = torch.empty(b, heads * head_dim)
    scratch = torch.empty(b * heads * (head_dim + table.shape[1]))
    kernels.decode_attention(qkv, q_norm, k_norm, 1e-6, rope.cos_sin, positions, k_pool, v_pool, write, table,
                             lens, out, scratch, heads)
    torch.testing.assert_close(k_pool, ref_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(v_pool, ref_v)  # float32 in, float32 out: v is copied as it is
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- weights and the GGUF's blocks


@pytest.fixture(scope="module")
def gguf_path(model_dir: Path) -> Path:
    path = find_gguf(model_dir)
    if path is None:
        pytest.skip("no .gguf file next to the default model")
    return path


@pytest.fixture(scope="module")
def gguf_blocks(gguf_path: Path, kernels: CpuKernels) -> GgufBlocks:
    return GgufBlocks(gguf_path, kernels)


def test_gguf_tensors_and_their_weights_as_gguf_py_reads_them(gguf_path: Path, kernels: CpuKernels) -> None:
    """Our GGUF tensor reader and the kernels' widening against gguf-py (transformers' GGUF loader)."""
    from gguf import GGUFReader

    ref = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    ours = read_gguf_tensors(gguf_path)
    assert {name for name, _, _ in ours} == {n for n, t in ref.items() if t.tensor_type.name in ("Q4_1", "Q8_0")}
    for name, fmt, raw in ours[:4] + ours[-4:]:
        t = ref[name]
        assert np.array_equal(raw, np.asarray(t.data)), name
        want = torch.from_numpy(dequantize(t.data, t.tensor_type))
        assert torch.equal(kernels.widen(fmt, torch.from_numpy(raw), want.shape[1]), want), name


def test_every_linear_of_the_default_model_is_its_gguf_blocks(model, model_dir: Path, kernels: CpuKernels) -> None:
    weights = weights_for(model, kernels, model_dir, lossy_bf16=False)
    fmts = {name: w.fmt for name, w in weights.items()}
    # the GGUF's blocks, repacked into the panels the FMA kernels read (lossy_bf16=False: no bfloat16 inputs)
    assert fmts.pop("logits") == "q8_0p"  # the tied embedding
    assert set(fmts.values()) == {"q4_1p"} and len(fmts) == 4 * model.config.num_layers
    assert {w.inputs for w in weights.values()} == {"f32"}
    # 66 MB of Q4_1 layers and the Q8_0 head's integers as bfloat16 (57 MB), vs 540 MB of float32
    assert sum(w.nbytes() for w in weights.values()) < 130e6


def test_gguf_match_is_exact_or_nothing(model, gguf_blocks: GgufBlocks) -> None:
    w = model.model.layers[3].self_attn.qkv_proj.weight.detach()
    found = gguf_blocks.find(w)
    assert found is not None and found[0] == "q4_1"
    rows = torch.tensor([5, 0, 900, 1])  # any rows, in any order: matched by content
    found = gguf_blocks.find(w[rows].contiguous())
    assert found is not None and torch.equal(dense_of("q4_1", found[1].numpy(), w.shape[1]), w[rows])
    nudged = w.clone()
    nudged[7, 100] = torch.nextafter(nudged[7, 100], torch.tensor(1.0))
    assert gguf_blocks.find(nudged) is None
    assert make_weight(nudged, None, gguf_blocks, lossy_bf16=False).fmt == "f32"  # dtype float32: exact
    assert make_weight(nudged, None, gguf_blocks, lossy_bf16=True).fmt == "bf16"
    assert make_weight(nudged.bfloat16().float(), None, gguf_blocks, lossy_bf16=False).fmt == "bf16"  # exact


def test_gguf_key_collisions_never_give_wrong_blocks(model, gguf_blocks: GgufBlocks,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Row keys only propose a match; the exact comparison decides. With every key colliding each
    lookup proposes the wrong rows, and find must then say no rather than return them."""
    import minisgl.engine.cpu.weights as cw

    w = model.model.layers[2].mlp.down_proj.weight.detach()
    assert gguf_blocks.find(w) is not None
    monkeypatch.setattr(cw, "_row_keys", lambda dense: [0] * dense.shape[0])
    colliding = GgufBlocks(gguf_blocks.path, gguf_blocks.kernels)
    assert colliding.find(w) is None


def test_prompt_chunks_take_the_gemm(kernels: CpuKernels, model) -> None:
    """Rows above MAX_KERNEL_ROWS go to torch's float32 GEMM on the model's weight: same answer."""
    lin = model.model.layers[0].mlp.down_proj
    w = make_weight(lin.weight, None, None, lossy_bf16=False).bind(kernels)
    assert w.fmt == "f32"
    w.pack_for_gemm()
    assert w.packed is not None or not torch.backends.mkldnn.is_available()
    for rows in (MAX_KERNEL_ROWS, MAX_KERNEL_ROWS + 1, 300):
        x = torch.randn(rows, lin.in_features)
        torch.testing.assert_close(w(x), lin(x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- dispatch


def test_dispatch_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for isa in cpu_isa.supported():
        cpu_isa.choose.cache_clear()
        assert cpu_isa.choose(isa) == isa
    cpu_isa.choose.cache_clear()
    monkeypatch.setenv("MINISGL_CPU_ISA", "torch")
    with caplog.at_level(logging.INFO, logger="minisgl.engine"):
        assert cpu_isa.choose() == "torch"
    assert "CPU path: torch (forced by MINISGL_CPU_ISA" in caplog.text
    cpu_isa.choose.cache_clear()
    monkeypatch.setenv("MINISGL_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="MINISGL_CPU_ISA"):
        cpu_isa.choose()
    # a CPU without AVX2 (an old x86, or ARM: no flags): every vector path falls back to torch ops
    monkeypatch.delenv("MINISGL_CPU_ISA")
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: frozenset({"sse2", "avx"}))
    for want in ("avx512", "avx2", "amx", "auto"):
        cpu_isa.choose.cache_clear()
        assert cpu_isa.choose(want) == "torch"
    cpu_isa.choose.cache_clear()


def test_backend_runs_the_path_it_is_given(model_dir: Path) -> None:
    from minisgl.backends.base import BackendConfig
    from minisgl.backends.base import create_backend

    for isa in [*cpu_isa.supported(), "amx"]:
        cpu_isa.choose.cache_clear()
        backend = create_backend("torch", BackendConfig(model_path=str(model_dir), device="cpu", kv_cache_tokens=512,
                                                        extra={"cpu_isa": isa}))
        try:
            want = isa if cpu_isa._can_force(isa) else cpu_isa.supported()[0]
            assert backend.cpu_path == want  # type: ignore[attr-defined]
            fused = backend.fused  # type: ignore[attr-defined]
            if want == "torch":
                assert fused is None
            else:
                assert fused is not None and backend.engine.model is fused  # type: ignore[attr-defined]
                assert fused.act == (torch.bfloat16 if want == "amx" else torch.float32)
                assert fused.kernels.isa == (cpu_isa.kernel_isa() if want == "amx" else want)
        finally:
            backend.shutdown()
    cpu_isa.choose.cache_clear()


# ---------------------------------------------------------------- engine-level answers


def _vector_forward(model_dir: Path, isa: str, force: str = "auto", dot: str = "f32") -> FusedCpuForward:
    model = load_model(model_dir)
    kernels = load_cpu_kernels(isa)
    assert kernels is not None
    if dot == "bf16" and not kernels.can_dot:
        pytest.skip(f"no AVX512_BF16 dot kernels in the {isa} build on this CPU")
    return FusedCpuForward(model, kernels, weights_for(model, kernels, model_dir, lossy_bf16=True, force=force,
                                                       dot=dot))


# the paths' matmul inputs: float32 (f32) everywhere, bfloat16 through the dot kernels where the CPU has them
VECTOR_RUNS = [(isa, dot) for isa in VECTOR_ISAS for dot in ("f32", "bf16", "i16") if dot != "bf16" or isa == "avx512"]


@pytest.mark.parametrize("isa,dot", VECTOR_RUNS)
def test_gguf_blocks_path_greedy_equals_transformers(model_dir: Path, eos, prompts, expected, isa: str,
                                                     dot: str) -> None:
    """The avx512 / avx2 paths on the embedded model compute with its own float32 weights: greedy
    answers equal float32 transformers' on every prompt, in one batch with prefill and decode; with
    the bfloat16 dot kernels too (only the matmul inputs are rounded; on these prompts no token moves)."""
    fused = _vector_forward(model_dir, isa, dot=dot)
    weights = fused.weights.values()  # type: ignore[union-attr]
    assert {w.fmt for w in weights} == {"q4_1p", "q8_0p"}  # the GGUF's blocks, in panels
    # float32 FMA, bfloat16 dot-product or int16 kernels
    assert {(w.fmt, w.inputs) for w in weights} == {("q4_1p", dot), ("q8_0p", dot)}
    col = run_all(make_engine(fused), [request(str(i), p, eos) for i, p in enumerate(prompts)])
    for i, want in enumerate(expected):
        assert col.tokens[str(i)] == want, f"prompt {i}"
    assert fused.steps >= len(expected[0])


@pytest.mark.parametrize("isa", VECTOR_ISAS)
def test_vector_logits_match_float32_every_step(model_dir: Path, model, prompts, isa: str) -> None:
    """Decode, prefill and mixed steps: the kernel path's logits against the float32 model's on the
    same context, within float32 rounding-order noise (GGUF blocks), bfloat16 rounding (bf16 weights;
    bfloat16 matmul inputs through the dot kernels, where this CPU has them) and int16 inputs."""
    runs = [("auto", "f32", 1e-4), ("bf16", "f32", 3e-2), ("auto", "i16", I16_LOGITS_BOUND)]
    if isa == "avx512" and load_cpu_kernels(isa).can_dot:  # type: ignore[union-attr]
        runs += [("auto", "bf16", DOT_LOGITS_BOUND)]
    for force, dot, bound in runs:
        fused = _vector_forward(model_dir, isa, force, dot)
        compare = _Compare(model, fused)
        engine = make_engine(compare, chunk_size=8)
        reqs = [request(str(i), p, [], max_new_tokens=6, ignore_eos=True) for i, p in enumerate(prompts[:3])]
        engine.add_request(reqs[0])
        engine.step()
        for r in reqs[1:]:
            engine.add_request(r)
        run_all(engine, [])
        assert compare.kinds == {"decode", "mixed", "prefill"}, compare.kinds
        print(f"[logits] {isa} weights={force} inputs={dot}: max relative error {max(compare.errors):.2e}")
        assert max(compare.errors) < bound, (force, max(compare.errors))
        assert len(compare.errors) >= 8


# max |logit - float32 logit| / max |float32 logit| of the dot kernels' path on the prompts above
DOT_LOGITS_BOUND = 2e-2  # measured 8e-3 (bfloat16 weights alone: 5e-3)
I16_LOGITS_BOUND = 1e-2  # the int16 kernels' path: measured 4.1e-3 (rows scaled by their largest, outliers included)


class _Compare(torch.nn.Module):
    """Runs the fast path, then the float32 model on the same step (the reference writes the pool last)."""

    def __init__(self, reference: torch.nn.Module, fast: FusedCpuForward) -> None:
        super().__init__()
        self.reference, self.fast, self.config = reference, fast, reference.config
        self.errors: list[float] = []
        self.kinds: set[str] = set()

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:  # type: ignore[no-untyped-def]
        b, t = ctx.num_decode, ids.shape[0]
        self.kinds.add("decode" if b == t else "mixed" if b else "prefill")
        got = self.fast(ids, positions, ctx)
        want = self.reference(ids, positions, ctx)
        self.errors.append(((got - want).abs().max() / want.abs().max()).item())
        return want


def test_amx_path_answers(model_dir: Path, eos, prompts, expected, tok) -> None:
    """The bfloat16 oneDNN path (AMX or not): bfloat16 matmul inputs change some greedy tokens at
    near-ties, so this asks for the answers to agree mostly and for Paris."""
    if cpu_isa.kernel_isa() is None:
        pytest.skip("no kernel build for this CPU")
    model = load_model(model_dir)
    if not can_pack(model):
        pytest.skip("no oneDNN in this torch build")
    pack_linears(model)
    kernels = load_cpu_kernels(cpu_isa.kernel_isa())
    assert kernels is not None
    fused = FusedCpuForward(model, kernels)
    col = run_all(make_engine(fused), [request(str(i), p, eos) for i, p in enumerate(prompts)])
    same = sum(col.tokens[str(i)] == want for i, want in enumerate(expected))
    assert same >= len(expected) - 2, [(col.tokens[str(i)], want) for i, want in enumerate(expected)]
    assert "Paris" in tok.decode(col.tokens["0"])


@pytest.mark.parametrize("isa,dot", VECTOR_RUNS)
def test_whole_decode_steps_equal_the_kernel_per_op_loop(model_dir: Path, eos, prompts, isa: str, dot: str) -> None:
    """decode_layers (a decode step's layers in one C call) against the same kernels called one by one
    from Python: the same logits to the bit, on every decode step of a batch (the KV pool restored
    between the two)."""
    fused = _vector_forward(model_dir, isa, dot=dot)
    both = _BothWays(fused)
    run_all(make_engine(both), [request(str(i), p, eos, max_new_tokens=6) for i, p in enumerate(prompts)])
    assert len(both.diffs) >= 5 and fused.layer_steps == len(both.diffs)
    assert max(both.diffs) == 0.0


class _BothWays(torch.nn.Module):
    def __init__(self, fused: FusedCpuForward) -> None:
        super().__init__()
        self.fused, self.config = fused, fused.config
        self.diffs: list[float] = []

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if ctx.num_decode != ids.shape[0]:
            return self.fused(ids, positions, ctx)
        k, v = ctx.pool.k.clone(), ctx.pool.v.clone()
        self.fused.whole_steps = False
        per_op = self.fused(ids, positions, ctx)
        ctx.pool.k.copy_(k)
        ctx.pool.v.copy_(v)
        self.fused.whole_steps = True
        whole = self.fused(ids, positions, ctx)
        self.diffs.append((whole - per_op).abs().max().item())
        return whole


@pytest.mark.parametrize("isa,can_dot,vnni,lossy,want", [
    ("avx512", True, True, True, "bf16"),    # Zen 4 / 5, Sapphire Rapids without AMX in use
    ("avx512", False, True, True, "i16"),    # Ice Lake, Cascade Lake: AVX-512 with VNNI, no BF16
    ("avx512", False, False, True, "f32"),   # Skylake-SP: int16 without VNNI loses to 512-bit FMAs
    ("avx2", False, False, True, "i16"),     # Zen 3, older Intel: int16 beats 256-bit FMAs
    ("avx2", False, True, True, "i16"),      # AVX-VNNI (Alder Lake, Zen 5 in AVX2 mode)
    ("avx512", True, True, False, "f32"),    # dtype float32: the float32 model's products
])
def test_auto_matmul_inputs_follow_the_cpu(isa: str, can_dot: bool, vnni: bool, lossy: bool, want: str) -> None:
    from types import SimpleNamespace

    from minisgl.engine.cpu.weights import matmul_inputs

    fake = SimpleNamespace(isa=isa, can_dot=can_dot, i16_vnni=vnni, has_panels=True)
    assert matmul_inputs(fake, lossy, "auto") == want  # type: ignore[arg-type]
    assert matmul_inputs(fake, lossy, "f32") == "f32"
    assert matmul_inputs(fake, lossy, "i16") == "i16"
    assert matmul_inputs(fake, lossy, "bf16") == ("bf16" if can_dot else "i16")  # warned, not crashed
    with pytest.raises(ValueError, match="MINISGL_CPU_DOT"):
        matmul_inputs(fake, lossy, "fp8")
