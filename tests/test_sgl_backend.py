"""The sgl backend's CPU-testable parts: the Triton paged decode kernel (under TRITON_INTERPRET=1 when
there is no GPU), the sgl engine step against the torch engine on a tiny model, CUDA-graph batch padding,
and the clear error without CUDA. The GPU-only parts (CUDA graphs, timings) are in bench/gpu_check.py."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAVE_CUDA = torch.cuda.is_available()
if not HAVE_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated: set it first
HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
DEVICE = "cuda" if HAVE_CUDA else "cpu"


def _interpreter_numpy_shim() -> None:
    """Triton 3.6's interpreter turns scalars into 1-element arrays, and `range(start, end)` over them
    calls int() on those, which numpy >= 2.4 refuses. Index with the single element instead."""
    import triton.runtime.interpreter as interp

    if getattr(interp, "_minisgl_shim", False):
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    interp._minisgl_shim = True


if HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_numpy_shim()


# ---------------------------------------------------------------- no Triton needed


def test_graph_batch_sizes_and_padding() -> None:
    from minisgl.engine.cuda.graph import graph_batch_sizes, pad_decode_inputs, padded_batch_size

    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(10) == [1, 2, 4, 8, 10]
    sizes = graph_batch_sizes(64)
    assert sizes == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_batch_sizes(256)[-3:] == [224, 240, 256]
    assert [padded_batch_size(sizes, b) for b in (1, 3, 8, 9, 17, 64)] == [1, 4, 8, 16, 32, 64]
    assert padded_batch_size(sizes, 65) is None
    flat = pad_decode_inputs([7, 8, 9], [10, 0, 4], [2, 0, 5], 4)
    # ids | positions | rows | seq lens, each padded with the harmless entry
    assert flat == [7, 8, 9, 0, 10, 0, 4, 0, 2, 0, 5, 0, 11, 1, 5, 1]


@pytest.mark.skipif(HAVE_CUDA, reason="this machine has CUDA")
def test_sgl_backend_without_cuda_says_so(tmp_path) -> None:
    from minisgl.backends.base import BackendConfig
    from minisgl.backends.base import create_backend

    with pytest.raises(RuntimeError, match="CUDA"):
        create_backend("sgl", BackendConfig(model_path=str(tmp_path), device="cpu"))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        create_backend("sgl", BackendConfig(model_path=str(tmp_path), device="cuda"))


# ---------------------------------------------------------------- the Triton kernel


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 32), (8, 8, 16), (6, 1, 24)])
def test_decode_kernel_matches_reference(dtype, heads, kv_heads, head_dim) -> None:
    from minisgl.engine.cuda.triton_attention import decode_attention, decode_attention_reference

    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    slots_total = 400
    k_pool = torch.randn(slots_total, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    v_pool = torch.randn(slots_total, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    table = torch.randint(1, slots_total, (6, 300), generator=gen).to(DEVICE)
    rows = torch.tensor([3, 0, 5, 1], device=DEVICE)
    lens = torch.tensor([1, 150, 67, 300], device=DEVICE)
    # q as the model hands it over: a strided view of a wider buffer
    q = torch.randn(4, heads + 2 * kv_heads, head_dim, generator=gen).to(DEVICE, dtype)[:, :heads]
    ref = decode_attention_reference(q, k_pool, v_pool, table, rows, lens)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for splits in (1, 3, 8):
        out = decode_attention(q, k_pool, v_pool, table, rows, lens, splits, block_n=16)
        assert out.dtype == dtype and out.shape == (4, heads, head_dim)
        err = (out.double() - ref).abs().max().item()
        assert err < tol, f"splits={splits}: max abs diff {err}"


@needs_triton
def test_decode_kernel_matches_torch_paged_attention() -> None:
    """Same numbers as the torch backend's PagedAttention on the same pool and table."""
    from minisgl.cache.kv_pool import KVPool
    from minisgl.engine.attention import PagedAttention
    from minisgl.engine.cuda.triton_attention import decode_attention

    torch.manual_seed(0)
    pool = KVPool(1, 2, 32, 500, torch.float32, DEVICE)
    pool.k[0, 1:].normal_()
    pool.v[0, 1:].normal_()
    lens = torch.tensor([5, 130, 41], device=DEVICE)
    table = torch.zeros(3, 200, dtype=torch.int64, device=DEVICE)
    perm = torch.randperm(500, device=DEVICE) + 1
    table[0, :5], table[1, :130], table[2, :41] = perm[:5], perm[5:135], perm[135:176]
    q = torch.randn(3, 4, 32, device=DEVICE)
    ctx = PagedAttention(pool, torch.zeros(0, dtype=torch.int64, device=DEVICE), torch.arange(3), 3,
                         table[:, :130], lens, [])
    want = ctx._decode(pool.k[0], pool.v[0], q)
    got = decode_attention(q, pool.k[0], pool.v[0], table, torch.arange(3, device=DEVICE), lens, 4)
    assert (got - want).abs().max().item() < 1e-5


# ---------------------------------------------------------------- the sgl engine step


TINY_QWEN3 = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  initializer_range=0.2)


def save_tiny_qwen3(transformers, path) -> None:
    """A random tiny Qwen3 (TINY_QWEN3, seed 0) saved as a checkpoint folder at path."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(**TINY_QWEN3)
    cfg.architectures = ["Qwen3ForCausalLM"]
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)


def engine_config(mc, **sizes):
    """An EngineConfig for a loaded model's shape with the test's sizes."""
    from minisgl.engine import EngineConfig

    return EngineConfig(num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, **sizes)


@needs_triton
@pytest.mark.parametrize("fused", [True, False], ids=["fused+extend+overlap", "plain+sdpa+sync"])
def test_sgl_engine_matches_torch_engine(tmp_path, fused) -> None:
    """Eager sgl steps (Triton decode, prefill through the paged extend kernel or SDPA, fused kernels or
    torch ops between the matmuls, its own batch layout) give the torch engine's greedy tokens through
    chunked prefill, mixed steps, prefix reuse and preemption."""
    transformers = pytest.importorskip("transformers")
    from minisgl.engine.cuda.engine import SGLEngine
    from minisgl.engine import Engine
    from minisgl.messages import SamplingParams, TokenizedReq
    from minisgl.models import load_model

    save_tiny_qwen3(transformers, tmp_path)
    model = load_model(tmp_path, device=DEVICE, dtype=torch.float32)
    mc = model.config
    ecfg = engine_config(mc, kv_tokens=90, max_model_len=64, max_running=4, chunk_size=16)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (3, 17, 40, 9)]

    def run(engine) -> dict[str, list[int]]:
        for i, p in enumerate(prompts + [prompts[2]]):
            engine.add_request(TokenizedReq(rid=str(i), input_ids=p, arrival=0.0,
                                            params=SamplingParams(max_new_tokens=10, ignore_eos=True)))
        tokens: dict[str, list[int]] = {}
        steps = 0
        while engine.has_work():
            for item in engine.step().outputs:
                tokens.setdefault(item.rid, []).extend(item.token_ids)
            steps += 1
            assert steps < 500
        return tokens

    want = run(Engine(model, ecfg, torch.device(DEVICE), torch.float32))
    sgl = SGLEngine(model, ecfg, torch.device(DEVICE), torch.float32, cuda_graph_max_bs=0, warm_kernels=False,
                    fused=fused, extend_kernel=fused, overlap=fused)
    assert (sgl.fused_modules > 0) == fused
    got = run(sgl)
    assert got == want
    assert all(len(t) == 10 for t in got.values())
    assert sgl.preemptions > 0


class _ReplayByRerun:
    """A stand-in CUDA graph for the CPU: replay runs the captured call again into the same output."""

    def __init__(self, fn, out: torch.Tensor) -> None:
        self.fn, self.out = fn, out

    def replay(self) -> None:
        self.out.copy_(self.fn())

    def pool(self) -> None:
        return None


@needs_triton
def test_graph_decode_path_matches_torch_engine(tmp_path) -> None:
    """The graph path's bookkeeping (static buffers, padding to a captured size, table writes, mixed steps
    split into a graph replay plus an eager prefill forward) with a graph that re-runs the model: same
    greedy tokens as the torch engine. Batches of 3 pad to 4; batches of 5 and 6 are larger than the
    largest 'graph' and run eagerly; chunks of 8 tokens make mixed steps."""
    transformers = pytest.importorskip("transformers")
    from minisgl.engine.cuda.engine import SGLEngine
    from minisgl.engine.cuda.graph import DecodeGraphs
    from minisgl.engine import Engine
    from minisgl.messages import SamplingParams, TokenizedReq
    from minisgl.models import load_model

    class RerunGraphs(DecodeGraphs):
        replays: dict[tuple[int, int], int] = {}

        def _capture_one(self, ids, positions, ctx, mempool):
            logits = self.model(ids, positions, ctx)
            return _ReplayByRerun(lambda: self.model(ids, positions, ctx), logits), logits

        def replay(self, step):
            self.replays[(step.bs, step.b)] = self.replays.get((step.bs, step.b), 0) + 1
            return super().replay(step)

    save_tiny_qwen3(transformers, tmp_path)
    model = load_model(tmp_path, device=DEVICE, dtype=torch.float32)
    mc = model.config
    ecfg = engine_config(mc, kv_tokens=400, max_model_len=64, max_running=6, chunk_size=8)
    gen = torch.Generator().manual_seed(2)
    lens = (3, 9, 20, 5, 12, 7)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in lens]
    max_new = (12, 4, 8, 6, 10, 3)  # the batch shrinks 6 -> 5 -> 4 -> 3 -> 2 -> 1 as requests finish

    def run(engine) -> dict[str, list[int]]:
        for i, p in enumerate(prompts):
            engine.add_request(TokenizedReq(rid=str(i), input_ids=p, arrival=0.0,
                                            params=SamplingParams(max_new_tokens=max_new[i], ignore_eos=True)))
        tokens: dict[str, list[int]] = {}
        while engine.has_work():
            for item in engine.step().outputs:
                tokens.setdefault(item.rid, []).extend(item.token_ids)
        return tokens

    want = run(Engine(model, ecfg, torch.device(DEVICE), torch.float32))
    sgl = SGLEngine(model, ecfg, torch.device(DEVICE), torch.float32, cuda_graph_max_bs=0, warm_kernels=False)
    sgl.graphs = RerunGraphs(model, sgl.pool, sgl.table, 4, mc.num_heads, mc.num_kv_heads, sgl.device, num_sms=4)
    sgl.graphs.capture()
    assert sorted(sgl.graphs.graphs) == [1, 2, 4]
    got = run(sgl)
    assert got == want
    assert [len(got[str(i)]) for i in range(6)] == list(max_new)
    assert (4, 3) in RerunGraphs.replays and (1, 1) in RerunGraphs.replays  # padded and exact replays
    kinds = sgl.step_kinds  # decode-only, mixed (split) and eager steps; no prefill graphs captured here
    assert kinds["graph"] and kinds["graph+eager"] and kinds["eager"], kinds


@needs_triton
def test_prefill_graph_path_matches_torch_engine(tmp_path) -> None:
    """Prompt chunks through prefill 'graphs' (re-run models, as above) padded to their token bucket,
    with the extend kernel's grid fixed per bucket and unused blocks sent to the empty segment: alone and
    after a decode graph in mixed steps, with cached prefixes (a repeated prompt) and chunks too big for
    any bucket (eager): the torch engine's greedy tokens."""
    transformers = pytest.importorskip("transformers")
    from minisgl.engine.cuda.engine import SGLEngine
    from minisgl.engine.cuda.graph import DecodeGraphs, PrefillGraphs
    from minisgl.engine import Engine
    from minisgl.messages import SamplingParams, TokenizedReq
    from minisgl.models import load_model

    class RerunDecode(DecodeGraphs):
        def _capture_one(self, ids, positions, ctx, mempool):
            logits = self.model(ids, positions, ctx)
            return _ReplayByRerun(lambda: self.model(ids, positions, ctx), logits), logits

    class RerunPrefill(PrefillGraphs):
        replays: dict[int, int] = {}

        def _capture_one(self, ids, positions, ctx, mempool):
            logits = self.model(ids, positions, ctx)
            return _ReplayByRerun(lambda: self.model(ids, positions, ctx), logits), logits

        def replay(self, step):
            self.replays[step.tokens] = self.replays.get(step.tokens, 0) + 1
            return super().replay(step)

    save_tiny_qwen3(transformers, tmp_path)
    model = load_model(tmp_path, device=DEVICE, dtype=torch.float32)
    mc = model.config
    ecfg = engine_config(mc, kv_tokens=400, max_model_len=96, max_running=4, chunk_size=40)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 23, 70, 11)]
    prompts.append(prompts[2][:50] + prompts[1])  # a cached 50-token prefix, then new tokens

    def run(engine) -> dict[str, list[int]]:
        tokens: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            engine.add_request(TokenizedReq(rid=str(i), input_ids=p, arrival=0.0,
                                            params=SamplingParams(max_new_tokens=6 + i, ignore_eos=True)))
            if i == 0:  # the first prompt alone: a step of prefill only
                for item in engine.step().outputs:
                    tokens.setdefault(item.rid, []).extend(item.token_ids)
        while engine.has_work():
            for item in engine.step().outputs:
                tokens.setdefault(item.rid, []).extend(item.token_ids)
        return tokens

    want = run(Engine(model, ecfg, torch.device(DEVICE), torch.float32))
    sgl = SGLEngine(model, ecfg, torch.device(DEVICE), torch.float32, cuda_graph_max_bs=0, warm_kernels=False)
    sgl.graphs = RerunDecode(model, sgl.pool, sgl.table, 4, mc.num_heads, mc.num_kv_heads, sgl.device, num_sms=4)
    sgl.graphs.capture()
    # buckets 16 and 32 only: a 40-token chunk is eager; at most 2 chunks a graph
    sgl.prefill_graphs = RerunPrefill(model, sgl.pool, sgl.table, mc.num_heads, sgl.device, max_tokens=32,
                                      max_segments=2)
    sgl.prefill_graphs.capture()
    assert sorted(sgl.prefill_graphs.graphs) == [16, 32]
    got = run(sgl)
    assert got == want
    assert [len(got[str(i)]) for i in range(5)] == [6 + i for i in range(5)]
    kinds = sgl.step_kinds
    assert kinds["prefill graph"] and kinds["graph+prefill graph"] and kinds["graph+eager"], kinds
    assert set(RerunPrefill.replays) == {16, 32}, RerunPrefill.replays


# ---------------------------------------------------------------- the fused kernels (engine/cuda/triton_fused.py)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_and_silu_match_torch(dtype) -> None:
    import torch.nn.functional as F

    from minisgl.engine.cuda.triton_fused import add_rmsnorm, rmsnorm, silu_mul

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 48, generator=gen).to(DEVICE, dtype)
    res = torch.randn(7, 48, generator=gen).to(DEVICE, dtype)
    w = (torch.rand(48, generator=gen) + 0.5).to(DEVICE, dtype)
    # bf16: the interpreter truncates where a GPU rounds, so allow 2 ulp
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2 ** -6)
    want_sum = x + res
    out, got_sum = add_rmsnorm(x, res, w, 1e-6)
    # the residual is rounded once, as `x + residual` is (the interpreter truncates to bf16: 1 ulp)
    exact = dtype == torch.float32
    torch.testing.assert_close(got_sum.float(), want_sum.float(), rtol=0 if exact else 2 ** -7, atol=0)
    torch.testing.assert_close(out.float(), F.rms_norm(want_sum, (48,), w, 1e-6).float(), **tol)
    wide = torch.randn(7, 3 * 48, generator=gen).to(DEVICE, dtype)[:, 48:96]  # strided rows
    torch.testing.assert_close(rmsnorm(wide, w, 1e-6).float(), F.rms_norm(wide, (48,), w, 1e-6).float(), **tol)
    gu = torch.randn(5, 2 * 40, generator=gen).to(DEVICE, dtype)
    want = F.silu(gu[:, :40].float()) * gu[:, 40:].float()
    torch.testing.assert_close(silu_mul(gu).float(), want, **tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pro", ["plain", "norm", "norm+res", "silu"])
def test_batch1_gemv_matches_torch(dtype, pro) -> None:
    """The batch-1 GEMV (engine/cuda/triton_gemv.py) with each prologue == the torch ops it replaces, at sizes
    that leave partial tiles in N and K (and a bias)."""
    from minisgl.engine.cuda.triton_gemv import PRO_NORM, PRO_PLAIN, PRO_SILU, gemv, gemv_reference

    gen = torch.Generator().manual_seed(11)
    n, k = 37, 200
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(DEVICE, dtype)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype)
    kw: dict = {}
    x = torch.randn(1, 2 * k if pro == "silu" else k, generator=gen).to(DEVICE, dtype)
    if pro.startswith("norm"):
        kw = dict(pro=PRO_NORM, norm_weight=(torch.rand(k, generator=gen) + 0.5).to(DEVICE, dtype), eps=1e-6)
        if pro == "norm+res":
            kw["residual"] = torch.randn(1, k, generator=gen).to(DEVICE, dtype)
    elif pro == "silu":
        kw = dict(pro=PRO_SILU)
    else:
        kw = dict(pro=PRO_PLAIN)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2 ** -6)
    for config in ((8, 128, 4), (4, 64, 2), (4, 256, 4), None):  # partial tiles: 37 outputs, 200 inputs;
        # (4, 256, 4) and the default take a norm in one pass over K
        y, res = gemv(x, w, bias, config=config, **kw)
        want, want_res = gemv_reference(x, w, bias, **kw)
        torch.testing.assert_close(y.float(), want.float(), **tol)
        if pro == "norm+res":
            torch.testing.assert_close(res.float(), want_res.float(), rtol=0 if dtype == torch.float32 else 2 ** -7, atol=0)
        else:
            assert res is None


@needs_triton
def test_batch1_gemv_layer_path_matches_torch_engine(tmp_path, monkeypatch) -> None:
    """One request alone decodes through FusedDecoderLayer's batch-1 GEMVs (every decode step has one
    token): the same greedy tokens as the torch engine and as the sgl engine with gemv off."""
    transformers = pytest.importorskip("transformers")
    from minisgl.engine.cuda.engine import SGLEngine
    from minisgl.engine import Engine, EngineConfig
    from minisgl.engine.cuda import triton_gemv
    from minisgl.engine.cuda.triton_fused import FusedDecoderLayer
    from minisgl.messages import SamplingParams, TokenizedReq
    from minisgl.models import load_model

    calls = []
    real = triton_gemv.gemv
    monkeypatch.setattr(triton_gemv, "gemv", lambda *a, **k: calls.append(k.get("pro", 0)) or real(*a, **k))
    save_tiny_qwen3(transformers, tmp_path)
    ecfg = EngineConfig(num_layers=2, num_kv_heads=2, head_dim=16, kv_tokens=64, max_model_len=64, max_running=2,
                        chunk_size=16)
    prompt = torch.randint(0, 512, (21,), generator=torch.Generator().manual_seed(3)).tolist()

    def run(engine) -> list[int]:
        engine.add_request(TokenizedReq(rid="a", input_ids=prompt, arrival=0.0,
                                        params=SamplingParams(max_new_tokens=12, ignore_eos=True)))
        out: list[int] = []
        while engine.has_work():
            for item in engine.step().outputs:
                out.extend(item.token_ids)
        return out

    want = run(Engine(load_model(tmp_path, device=DEVICE, dtype=torch.float32), ecfg, torch.device(DEVICE), torch.float32))
    for gemv in (True, False):
        model = load_model(tmp_path, device=DEVICE, dtype=torch.float32)
        sgl = SGLEngine(model, ecfg, torch.device(DEVICE), torch.float32, cuda_graph_max_bs=0, warm_kernels=False,
                        gemv=gemv)
        assert all(isinstance(layer, FusedDecoderLayer) == gemv for layer in model.model.layers)
        calls.clear()
        assert run(sgl) == want, f"gemv={gemv}"
        # 11 one-token decode steps x 2 layers x 4 GEMVs (norm+qkv, o, norm+gate_up, silu+down)
        assert len(calls) == (11 * 2 * 4 if gemv else 0)
        assert len(want) == 12


@needs_triton
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_rope_store_matches_torch(qk_norm) -> None:
    """q/k norms, RoPE and the KV write in one kernel == the model's project_heads + index_copy."""
    import torch.nn.functional as F

    from minisgl.engine.cuda.triton_fused import qk_norm_rope_store
    from minisgl.models.layers import RotaryEmbedding, apply_rope

    gen = torch.Generator().manual_seed(6)
    heads, kv_heads, d, t = 4, 2, 16, 9
    rope = RotaryEmbedding(d, 64, 10000.0, None).to(DEVICE)
    positions = torch.randint(0, 64, (t,), generator=gen).to(DEVICE)
    cos, sin = rope(positions)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=gen).to(DEVICE)
    qw = torch.rand(d, generator=gen).to(DEVICE) + 0.5 if qk_norm else None
    kw = torch.rand(d, generator=gen).to(DEVICE) + 0.5 if qk_norm else None
    k_pool = torch.full((40, kv_heads, d), float("nan"), device=DEVICE)
    v_pool = torch.full((40, kv_heads, d), float("nan"), device=DEVICE)
    slots = torch.randperm(40, generator=gen)[:t].to(DEVICE)
    q = qk_norm_rope_store(qkv, cos, sin, qw, kw, 1e-6, k_pool, v_pool, slots, heads, kv_heads, d)
    q_ref = qkv[:, :heads * d].view(t, heads, d)
    k_ref = qkv[:, heads * d:(heads + kv_heads) * d].view(t, kv_heads, d)
    v_ref = qkv[:, (heads + kv_heads) * d:].view(t, kv_heads, d)
    if qk_norm:
        q_ref, k_ref = F.rms_norm(q_ref, (d,), qw, 1e-6), F.rms_norm(k_ref, (d,), kw, 1e-6)
    q_ref, k_ref = apply_rope(q_ref, cos, sin), apply_rope(k_ref, cos, sin)
    assert (q - q_ref).abs().max().item() < 1e-5
    assert (k_pool[slots] - k_ref).abs().max().item() < 1e-5
    assert torch.equal(v_pool[slots], v_ref)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert k_pool[untouched.to(DEVICE)].isnan().all()  # nothing written outside the step's slots


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extend_attention_matches_reference(dtype) -> None:
    """Every prompt chunk of a step in one launch, cached prefix read in place, causal with an offset;
    chunks longer than a query block, no prefix, a one-token chunk, GQA."""
    from minisgl.engine.cuda.triton_fused import extend_attention, extend_attention_reference, extend_meta

    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, d = 4, 2, 24
    k_pool = torch.randn(300, kv_heads, d, generator=gen).to(DEVICE, dtype)
    v_pool = torch.randn(300, kv_heads, d, generator=gen).to(DEVICE, dtype)
    table = torch.randint(0, 300, (5, 120), generator=gen).to(DEVICE)
    # (first token, chunk length, table row, cached prefix); tokens 0..2 stand for decode rows
    segments = [(3, 37, 2, 0), (40, 1, 0, 50), (41, 20, 4, 33), (61, 16, 1, 100)]
    t = 77
    q = torch.randn(t, heads, d, generator=gen).to(DEVICE, dtype)
    flat, blocks, segs = extend_meta(segments, block_m=16)
    assert blocks == 3 + 1 + 2 + 1 and segs == 4
    meta = torch.tensor(flat, dtype=torch.int64, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    extend_attention(q, k_pool, v_pool, table, meta, blocks, segs, out, block_m=16, block_n=16)
    ref = extend_attention_reference(q, k_pool, v_pool, table, segments)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for start, n, _, _ in segments:
        err = (out[start:start + n].double() - ref[start]).abs().max().item()
        assert err < tol, (start, err)
    assert out[:3].isnan().all()  # rows outside every chunk are left alone


@needs_triton
def test_overlap_scheduling_stops_aborts_and_preemption(tmp_path) -> None:
    """Overlap scheduling (step N+1 launched before step N's tokens are read): requests that stop on a
    stop id or at max_new_tokens while already in the next step drop that extra token and cache the right
    KV (a later request reusing the prefix gets the torch engine's tokens); an abort with a token in
    flight reports only delivered tokens; a small pool forces preemption."""
    transformers = pytest.importorskip("transformers")
    from minisgl.engine.cuda.engine import SGLEngine
    from minisgl.engine import Engine
    from minisgl.messages import SamplingParams, TokenizedReq
    from minisgl.models import load_model

    save_tiny_qwen3(transformers, tmp_path)
    model = load_model(tmp_path, device=DEVICE, dtype=torch.float32)
    mc = model.config
    ecfg = engine_config(mc, kv_tokens=48, max_model_len=40, max_running=4, chunk_size=16)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (4, 13, 22, 7)]

    def run(engine, stops: dict[int, list[int]], abort_at: int | None = None):
        tokens: dict[str, list[int]] = {}
        finals: dict[str, object] = {}

        def add(i: int, p: list[int]) -> None:
            engine.add_request(TokenizedReq(rid=str(i), input_ids=p, arrival=0.0, params=SamplingParams(
                max_new_tokens=12, ignore_eos=True, stop_token_ids=stops.get(i, []))))

        for i, p in enumerate(prompts):
            add(i, p)
        steps = 0
        while engine.has_work():
            for item in engine.step().outputs:
                tokens.setdefault(item.rid, []).extend(item.token_ids)
                if item.finish_reason:
                    finals[item.rid] = item
            steps += 1
            if steps == 3:  # the first prompt again, plus what it generated: a cached prefix to reuse
                add(4, prompts[0] + tokens.get("0", [])[:2])
            if abort_at is not None and steps == abort_at:
                engine.abort("3")
            assert steps < 400
        return tokens, finals

    ref, _ = run(Engine(model, ecfg, torch.device(DEVICE), torch.float32), {})
    stops = {0: [ref["0"][3]], 2: [ref["2"][5]]}  # stop on a token each will produce
    want, want_finals = run(Engine(model, ecfg, torch.device(DEVICE), torch.float32), stops)
    sgl = SGLEngine(model, ecfg, torch.device(DEVICE), torch.float32, cuda_graph_max_bs=0, warm_kernels=False,
                    overlap=True)
    got, finals = run(sgl, stops)
    assert got == want
    assert finals["0"].finish_reason == "stop" and len(got["0"]) == want_finals["0"].completion_tokens
    assert all(f.completion_tokens == len(got[rid]) for rid, f in finals.items())
    assert sgl.preemptions > 0 and not sgl._unresolved and sgl._inflight is None
    sgl2 = SGLEngine(model, ecfg, torch.device(DEVICE), torch.float32, cuda_graph_max_bs=0, warm_kernels=False,
                     overlap=True)
    got2, finals2 = run(sgl2, stops, abort_at=6)
    assert finals2["3"].finish_reason == "abort"
    assert finals2["3"].completion_tokens == len(got2.get("3", [])) < 12
    assert got2["3"] == want["3"][:len(got2["3"])]
    assert {k: v for k, v in got2.items() if k != "3"} == {k: v for k, v in want.items() if k != "3"}


@needs_triton
def test_sgl_engine_logprobs_echo_and_penalties_match_torch_engine(tmp_path) -> None:
    """The sgl step lays out its own batch: echo rows, sampled-token logprobs, penalties and logit_bias
    come out as in the torch engine, through chunked prompts and preemption (a tiny pool)."""
    transformers = pytest.importorskip("transformers")
    from minisgl.engine.cuda.engine import SGLEngine
    from minisgl.engine import Engine
    from minisgl.messages import SamplingParams, TokenizedReq
    from minisgl.models import load_model

    save_tiny_qwen3(transformers, tmp_path)
    model = load_model(tmp_path, device=DEVICE, dtype=torch.float32)
    mc = model.config
    ecfg = engine_config(mc, kv_tokens=90, max_model_len=64, max_running=4, chunk_size=16)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (3, 17, 40, 9)]
    params = [SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=2),
              SamplingParams(max_new_tokens=8, ignore_eos=True, prompt_logprobs=1, logprobs=0),
              SamplingParams(max_new_tokens=8, ignore_eos=True, prompt_logprobs=0),
              SamplingParams(max_new_tokens=8, ignore_eos=True, frequency_penalty=1.0, logit_bias={5: 3.0})]

    def run(engine) -> dict[str, dict]:
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(TokenizedReq(rid=str(i), input_ids=p, arrival=0.0, params=sp))
        out: dict[str, dict] = {}
        while engine.has_work():
            for item in engine.step().outputs:
                o = out.setdefault(item.rid, {"tokens": [], "lp": [], "top": [], "prompt": None})
                o["tokens"] += item.token_ids
                if item.logprobs is not None:
                    o["lp"] += item.logprobs.logprobs
                    o["top"] += item.logprobs.top_ids
                if item.prompt_logprobs is not None:
                    assert o["prompt"] is None, "prompt scores come once"
                    o["prompt"] = item.prompt_logprobs
        return out

    want = run(Engine(model, ecfg, torch.device(DEVICE), torch.float32))
    got = run(SGLEngine(model, ecfg, torch.device(DEVICE), torch.float32, cuda_graph_max_bs=0, warm_kernels=False))
    for rid in want:
        assert got[rid]["tokens"] == want[rid]["tokens"], rid
        assert got[rid]["lp"] == pytest.approx(want[rid]["lp"], abs=1e-4)
        assert got[rid]["top"] == want[rid]["top"]
    assert len(want["0"]["lp"]) == 8 and all(len(t) == 2 for t in want["0"]["top"])
    for rid, n in (("1", 17), ("2", 40)):
        w, g = want[rid]["prompt"], got[rid]["prompt"]
        assert len(w.logprobs) == n - 1 and g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
