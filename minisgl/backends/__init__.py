"""Worker backends: `base.py` (what each implements, and create_backend, which reads the registry in
minisgl/backend_registry.py: every backend by name, imported lazily), one module per backend
(`torch_backend.py`, `sgl_backend.py`, `mlx_backend.py`, `hf.py`), and the tensor-parallel pieces that
drive one: `tp_sync.py` (N ranks in lockstep) and `tp_checks.py` (start-up checks)."""
