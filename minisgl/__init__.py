"""mini-sglang: a small, streaming-first, SGLang-style LLM serving stack."""

__version__ = "0.1.0"
