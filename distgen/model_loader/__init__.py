"""Checkpoint loaders: safetensors (per-rank slices) and GGUF."""
