"""The real Wan2.1 family: transformer, LoRA, weight loading (see loading.py)."""
