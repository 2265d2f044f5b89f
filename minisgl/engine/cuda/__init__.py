"""The sgl backend's CUDA engine (its room in the engine): `engine.py` (SGLEngine: overlap scheduling,
its batch layout, graph replay or eager as its forward step), `graph.py` (decode CUDA graphs per batch
size), and the Triton kernels: `triton_attention.py` (paged decode attention), `triton_fused.py`
(paged extend attention, fused norms / RoPE / KV write), `triton_gemv.py` (batch-1 GEMVs). Nothing here
is imported unless CUDA (or, in tests, the Triton interpreter) is there."""
