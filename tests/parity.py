"""Parity-test helpers: error measures whose assertions print the errors they saw, and the
reference fixture's tensors in this project's layouts."""

from __future__ import annotations

import numpy as np


def max_errors(actual, expected) -> tuple[float, float]:
    """(max absolute error, max absolute error / max |expected|)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {actual.shape} != expected {expected.shape}")
    abs_err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return abs_err, abs_err / max(scale, np.finfo(np.float32).tiny)


def assert_close(actual, expected, rel: float, name: str) -> float:
    """Asserts max|a - e| / max|e| <= rel; returns the relative error. Prints both errors."""
    abs_err, rel_err = max_errors(actual, expected)
    message = f"{name}: max abs error {abs_err:.3e}, relative {rel_err:.3e} (tolerance {rel:.0e})"
    print(message)
    assert rel_err <= rel, message
    return rel_err


def fixture_cache(golden, kind: str, length: int) -> np.ndarray:
    """The fixture's post-generation keys or values (`kind` "k" or "v") in this project's
    (L, B, K, S, H) cache layout, first `length` positions; the fixture stores (B, K, S, H) per layer."""
    layers = sorted(int(key.rsplit(".", 1)[1]) for key in golden if key.startswith(f"gen.kv_cache.{kind}."))
    return np.stack([golden[f"gen.kv_cache.{kind}.{layer}"] for layer in layers])[:, :, :, :length]
