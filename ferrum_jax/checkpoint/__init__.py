"""Checkpoint loaders and savers: HF safetensors, GGUF, orbax; tokenizers."""
