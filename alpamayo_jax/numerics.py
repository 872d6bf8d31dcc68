"""Host-side numerics that must reproduce the reference bit for bit."""

from __future__ import annotations

import numpy as np


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """(steps,) float32, bit-identical to `torch.linspace(start, end, steps)` on CPU.

    torch fills the first half from the start and the second half from the end,
    `start + step * i` and `end - step * (steps - 1 - i)` with a float32 `step`, and its CPU
    kernels evaluate both as fused multiply-adds (one rounding). float64 evaluates these products
    and sums exactly for the small grids used here, so a single cast to float32 reproduces it.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    from_start = np.float64(start32) + step * i
    from_end = np.float64(end32) - step * (steps - 1 - i)
    return np.where(np.arange(steps) < steps // 2, from_start, from_end).astype(np.float32)
