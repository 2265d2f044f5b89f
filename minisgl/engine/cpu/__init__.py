"""The torch backend's CPU forward (its room in the engine): `isa.py` picks the path from the CPU's
features (amx, avx512, avx2 or torch ops), `kernels.c` / `kernels.py` are the fused C kernels (built with
the system compiler on first use, loaded through ctypes), `linear.py` packs linears as bfloat16 oneDNN
matmuls, `weights.py` streams compact weights (the GGUF's own blocks, or bfloat16), and `forward.py` runs
a whole step through them in place of the model's torch ops."""
