"""Logical axis names carried by every parameter.

Each `nnx.Param` is created with a `logical_axes` metadata tuple, one name per array dimension.
`alpamayo_jax.sharding` maps these names to mesh axes with one rule table; nothing else in the
library decides placement.
"""

from __future__ import annotations

# name -> what the dimension is. A parameter dimension must use one of these names.
LOGICAL_AXES: dict[str, str] = {
    "embed": "model width of a decoder (language model or expert)",
    "vocab": "token vocabulary",
    "heads": "query attention heads",
    "kv_heads": "key/value attention heads",
    "head_dim": "width of one attention head",
    "mlp": "hidden width of a feed-forward block",
    "vision_embed": "vision transformer width",
    "vision_qkv": "fused q|k|v output of the vision attention (3 x heads x head_dim)",
    "vision_heads_dim": "vision attention output before its projection (heads x head_dim)",
    "vision_mlp": "vision feed-forward hidden width",
    "vision_patch": "flattened pixel patch (channels x frames x patch x patch)",
    "vision_positions": "rows of the learned vision position table",
    "merger": "2x2-merged vision features (4 x vision width), input of the patch mergers",
    "merger_hidden": "hidden width of the patch mergers",
    "action_features": "Fourier features of an action waypoint and the flow time",
    "action_hidden": "hidden width of the action input MLP",
    "action_dim": "action channels (acceleration, curvature)",
    "fourier": "Fourier frequencies of one encoder",
}


def axes(*names: str | None) -> dict[str, tuple[str | None, ...]]:
    """Metadata for `nnx.Param(..., **axes("embed", "mlp"))` or `kernel_metadata=axes(...)`."""
    unknown = [n for n in names if n is not None and n not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axis name(s) {unknown}; known: {sorted(LOGICAL_AXES)}")
    return {"logical_axes": tuple(names)}
