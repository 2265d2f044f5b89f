"""The continuous-batching engine: request state, scheduling, paged attention, sampling.

The portable engine is here (`engine.py`, `config.py`, `request.py`, `sampler.py`, `attention.py`,
`logprobs.py`, `output.py`); the two device-specific paths have rooms of their own:

  - `cpu/`: the CPU forward of the torch backend (fused C kernels, packed AMX linears, weight-streaming
    GGUF kernels; the path chosen by CPU features in `cpu/isa.py`);
  - `cuda/`: the sgl backend's CUDA engine (`cuda/engine.py`: SGLEngine, overlap scheduling, CUDA graph
    replay as its forward step), its Triton kernels and decode graphs. Imported only where CUDA (or the
    Triton interpreter, in tests) is there.
"""

from minisgl.engine.config import EngineConfig
from minisgl.engine.engine import Engine
from minisgl.engine.output import StepOutput

__all__ = ["Engine", "EngineConfig", "StepOutput"]
