"""PyTorch-side tooling for conversion checks (installed as `alpamayo_reference`).

Nothing here is imported by `alpamayo_jax`; it needs the `test` extra (torch, transformers).
"""
