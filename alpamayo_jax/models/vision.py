"""The Qwen3-VL vision tower: patch embedding, interpolated learned positions, 2-D rotary, pre-LN
transformer blocks with per-image attention, the 2x2 patch merger and the DeepStack mergers.

Images have data-dependent sizes. Everything that depends on them (position-table interpolation,
rotary positions, attention segments) is derived on the host from `image_grid_thw`, which is
therefore a *static* argument: a hashable tuple of (t, h, w) patch grids, one per image. Under
`jax.jit` a model compiles once per distinct grid tuple (one shape bucket per camera/resolution
preset).

Patch order: the processor emits each image's patches grouped by 2x2 merge block (block rows,
block columns, then the 2x2 patches inside a block), so four consecutive rows form one merged
token. Positions and rotary angles below are produced in that same order.

Shapes: I images, P patches of all images (sum of t*h*w), C flattened patch (channels * frames *
patch * patch), E vision width, N heads, H head_dim, M merged tokens (P / 4), D output width (the
language model's), J DeepStack feature sets.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alpamayo_jax.config import VisionConfig
from alpamayo_jax.nn.attention import dot_product_attention
from alpamayo_jax.nn.axes import axes
from alpamayo_jax.nn.linear import Linear
from alpamayo_jax.nn.norms import layer_norm
from alpamayo_jax.nn.precision import gelu
from alpamayo_jax.nn.rotary import apply_rotary, inverse_frequencies
from alpamayo_jax.numerics import torch_linspace_f32

ImageGrid = tuple[tuple[int, int, int], ...]  # ((t, h, w), ...) in patches, one entry per image

VISION_ROPE_THETA = 10_000.0


# ---------------------------------------------------------------------------------------------
# Host-side geometry (numpy, static per image grid)
# ---------------------------------------------------------------------------------------------


def as_image_grid(image_grid_thw) -> ImageGrid:
    """Normalises `image_grid_thw` (array (I, 3), nested lists or tuples) to the hashable tuple
    form used as a static argument."""
    if isinstance(image_grid_thw, jax.core.Tracer):
        raise TypeError("image_grid_thw must be concrete (a static argument), not a traced array")
    grid = np.asarray(image_grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"image_grid_thw must have shape (num_images, 3), got {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer) or (grid <= 0).any():
        raise ValueError(f"image_grid_thw must hold positive integers, got {grid.tolist()}")
    return tuple((int(t), int(h), int(w)) for t, h, w in grid)


def _check_grid(grid: ImageGrid, merge: int) -> None:
    bad = [g for g in grid if g[1] % merge or g[2] % merge]
    if bad:
        raise ValueError(f"image grids {bad} are not divisible by the spatial merge size {merge}")


def num_patches(grid: ImageGrid) -> int:
    """Rows of `pixel_values` for these images: sum of t * h * w."""
    return sum(t * h * w for t, h, w in grid)


def num_visual_tokens(grid: ImageGrid, spatial_merge_size: int) -> int:
    """Merged visual tokens (placeholder tokens in the prompt) for these images."""
    return num_patches(grid) // spatial_merge_size**2


def _block_order(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """(t*h*w,) indices into a row-major (t, h, w) grid, in the processor's 2x2-block patch order."""
    index = np.arange(t * h * w).reshape(t, h // merge, merge, w // merge, merge)
    return index.transpose(0, 1, 3, 2, 4).reshape(-1)


@functools.lru_cache(maxsize=64)
def position_interpolation(
    grid: ImageGrid, *, num_grid_per_side: int, merge_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear interpolation of the square learned position table onto each image's grid.

    Returns table row indices (4, P) int32 and weights (4, P) float32 for the corners
    (floor, floor), (floor, ceil), (ceil, floor), (ceil, ceil), in patch (block) order.
    Fractional table coordinates come from torch's float32 `linspace(0, side - 1, n)`; floor is
    the integer truncation and ceil is floor + 1 clamped to the table; the weights are float32
    products of (1 - d) / d terms, as in the reference.
    """
    _check_grid(grid, merge_size)
    side = num_grid_per_side
    all_indices, all_weights = [], []
    for t, h, w in grid:
        rows, cols = torch_linspace_f32(0, side - 1, h), torch_linspace_f32(0, side - 1, w)
        row_lo, col_lo = rows.astype(np.int64), cols.astype(np.int64)
        row_hi, col_hi = np.minimum(row_lo + 1, side - 1), np.minimum(col_lo + 1, side - 1)
        d_row, d_col = rows - row_lo.astype(np.float32), cols - col_lo.astype(np.float32)
        one = np.float32(1.0)
        corners = [(row_lo, col_lo, one - d_row, one - d_col), (row_lo, col_hi, one - d_row, d_col),
                   (row_hi, col_lo, d_row, one - d_col), (row_hi, col_hi, d_row, d_col)]
        order = _block_order(t, h, w, merge_size)
        indices = [np.tile((r[:, None] * side + c[None, :]).reshape(-1), t)[order]
                   for r, c, _, _ in corners]
        weights = [np.tile((wr[:, None] * wc[None, :]).astype(np.float32).reshape(-1), t)[order]
                   for _, _, wr, wc in corners]
        all_indices.append(np.stack(indices))
        all_weights.append(np.stack(weights))
    return _frozen(np.concatenate(all_indices, axis=1).astype(np.int32)), _frozen(
        np.concatenate(all_weights, axis=1).astype(np.float32))


@functools.lru_cache(maxsize=64)
def rotary_positions(grid: ImageGrid, *, merge_size: int) -> np.ndarray:
    """(P, 2) int32 full-resolution (row, column) of every patch, in patch (block) order."""
    _check_grid(grid, merge_size)
    result = []
    for t, h, w in grid:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        coords = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)
        result.append(np.tile(coords, (t, 1))[_block_order(t, h, w, merge_size)])
    return _frozen(np.concatenate(result).astype(np.int32))


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False  # shared through the lru_caches above
    return array


def rotary_angles(grid: ImageGrid, *, head_dim: int, merge_size: int) -> np.ndarray:
    """(P, H/2) float32 2-D rotary angles: [row * inv_freq, column * inv_freq], with
    H/4 frequencies `1 / 10000 ** (2j / (H/2))` per axis; each angle is one float32 product."""
    inv_freq = inverse_frequencies(head_dim // 2, VISION_ROPE_THETA)  # (H/4,)
    positions = rotary_positions(grid, merge_size=merge_size).astype(np.float32)  # (P, 2)
    return (positions[:, :, None] * inv_freq[None, None, :]).reshape(len(positions), -1)


def attention_segments(grid: ImageGrid) -> tuple[tuple[int, int, int], ...]:
    """Runs of equal-length attention segments: ((start_row, count, length), ...).

    Attention is bidirectional within each frame of each image (the reference's `cu_seqlens`:
    one segment of h*w patches per temporal frame) and never across. Consecutive segments of one
    length are batched together, so 16 same-size camera images take one attention call.
    """
    runs: list[list[int]] = []
    start = 0
    for t, h, w in grid:
        for _ in range(t):
            if runs and runs[-1][2] == h * w:
                runs[-1][1] += 1
            else:
                runs.append([start, 1, h * w])
            start += h * w
    return tuple(tuple(run) for run in runs)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


def _layer_norm(dim: int, axis_name: str, config: VisionConfig, param_dtype, rngs) -> nnx.LayerNorm:
    return layer_norm(dim, eps=config.layer_norm_eps, axis_name=axis_name, param_dtype=param_dtype, rngs=rngs)


def _linear(n_in: int, n_out: int, names: tuple[str, str], param_dtype, rngs) -> Linear:
    return Linear(n_in, n_out, param_dtype=param_dtype, kernel_metadata=axes(*names),
                  bias_metadata=axes(names[1]), rngs=rngs)


class PatchEmbed(nnx.Module):
    """The reference's Conv3d with kernel = stride = (frames, patch, patch), as a dense layer on
    the processor's flattened patches (rows laid out [channel][frame][row][column])."""

    def __init__(self, config: VisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        # The Conv3d kernel shape travels as metadata so export can restore the checkpoint layout.
        conv_shape = (config.hidden_size, config.in_channels, config.temporal_patch_size,
                      config.patch_size, config.patch_size)
        self.proj = Linear(config.patch_dim, config.hidden_size, param_dtype=param_dtype,
                           kernel_metadata={**axes("vision_patch", "vision_embed"), "conv_shape": conv_shape},
                           bias_metadata=axes("vision_embed"), rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """(P, C) -> (P, E); pixels are cast to the parameter dtype first (`Linear`)."""
        return self.proj(pixel_values)


class VisionAttention(nnx.Module):
    """Fused qkv (split [3][heads][head_dim]), 2-D rotary in float32, attention within segments."""

    def __init__(self, config: VisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        e = config.hidden_size
        self.qkv = _linear(e, 3 * e, ("vision_embed", "vision_qkv"), param_dtype, rngs)
        self.proj = _linear(e, e, ("vision_heads_dim", "vision_embed"), param_dtype, rngs)

    def __call__(
        self,
        x: jax.Array,  # (P, E)
        cos: jax.Array,  # (P, H) float32
        sin: jax.Array,  # (P, H) float32
        segments: tuple[tuple[int, int, int], ...],  # from `attention_segments`
    ) -> jax.Array:
        num_rows = x.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(num_rows, 3, self.num_heads, self.head_dim), 1, 0)
        q, k = (apply_rotary(y.astype(jnp.float32)[None], cos[None], sin[None])[0].astype(y.dtype)
                for y in (q, k))
        outputs = []
        for start, count, length in segments:
            def segment(y, start=start, count=count, length=length):
                return y[start:start + count * length].reshape(count, length, self.num_heads, self.head_dim)

            out = dot_product_attention(segment(q), segment(k), segment(v), None)
            outputs.append(out.reshape(count * length, self.num_heads * self.head_dim))
        out = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=0)
        return self.proj(out)


class VisionMLP(nnx.Module):
    """linear_fc2(gelu_tanh(linear_fc1(x)))."""

    def __init__(self, config: VisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        e, m = config.hidden_size, config.intermediate_size
        self.linear_fc1 = _linear(e, m, ("vision_embed", "vision_mlp"), param_dtype, rngs)
        self.linear_fc2 = _linear(m, e, ("vision_mlp", "vision_embed"), param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_fc2(gelu(self.linear_fc1(x), approximate=True))


class VisionBlock(nnx.Module):
    """Pre-LN block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, config: VisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = _layer_norm(config.hidden_size, "vision_embed", config, param_dtype, rngs)
        self.attn = VisionAttention(config, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = _layer_norm(config.hidden_size, "vision_embed", config, param_dtype, rngs)
        self.mlp = VisionMLP(config, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Concatenates each 2x2 block of patches (4 consecutive rows) and projects it to the
    language model's width: LayerNorm, linear_fc1, exact (erf) GELU, linear_fc2.

    The main merger normalises each patch before concatenating; the DeepStack mergers
    ("postshuffle") normalise the concatenated vector.
    """

    def __init__(self, config: VisionConfig, *, postshuffle_norm: bool, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.postshuffle_norm = postshuffle_norm
        self.merged_dim = merged = config.merged_dim
        if postshuffle_norm:
            self.norm = _layer_norm(merged, "merger", config, param_dtype, rngs)
        else:
            self.norm = _layer_norm(config.hidden_size, "vision_embed", config, param_dtype, rngs)
        self.linear_fc1 = _linear(merged, merged, ("merger", "merger_hidden"), param_dtype, rngs)
        self.linear_fc2 = _linear(merged, config.out_hidden_size, ("merger_hidden", "embed"),
                                  param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(P, E) -> (P/4, D)."""
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_dim))
        else:
            x = self.norm(x).reshape(-1, self.merged_dim)
        return self.linear_fc2(gelu(self.linear_fc1(x), approximate=False))


class VisionIntermediates(NamedTuple):
    patch_embeds: jax.Array  # (P, E) patch embedding, before positions are added
    position_embeds: jax.Array  # (P, E) interpolated learned position embeddings
    rotary_angles: jax.Array  # (P, H/2) float32 2-D rotary angles (row, column)
    block_outputs: tuple[jax.Array, ...]  # depth x (P, E)


class VisionOutput(NamedTuple):
    image_embeds: jax.Array  # (M, D) merged visual tokens of all images, in image order
    deepstack_embeds: jax.Array  # (J, M, D) DeepStack feature sets
    intermediates: VisionIntermediates | None


class VisionModel(nnx.Module):
    """The Qwen3-VL vision transformer with its patch merger and DeepStack mergers.

    Parameter names follow the reference (`patch_embed.proj`, `pos_embed`, `blocks.{i}`, `merger`,
    `deepstack_merger_list.{j}`), so `alpamayo_jax.io.weight_map.vision_rules()` loads it.
    """

    def __init__(self, config: VisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.patch_embed = PatchEmbed(config, param_dtype=param_dtype, rngs=rngs)
        self.pos_embed = nnx.Embed(config.num_position_embeddings, config.hidden_size,
                                   param_dtype=param_dtype,
                                   embedding_metadata=axes("vision_positions", "vision_embed"), rngs=rngs)
        self.blocks = nnx.List([VisionBlock(config, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.depth)])
        self.merger = PatchMerger(config, postshuffle_norm=False, param_dtype=param_dtype, rngs=rngs)
        self.deepstack_merger_list = nnx.List([
            PatchMerger(config, postshuffle_norm=True, param_dtype=param_dtype, rngs=rngs)
            for _ in config.deepstack_visual_indexes
        ])

    def embed_patches(self, pixel_values: jax.Array) -> jax.Array:
        """(P, C) flattened patches -> (P, E) patch embeddings (no positions)."""
        return self.patch_embed(pixel_values)

    def interpolate_position_embeddings(self, image_grid_thw: ImageGrid) -> jax.Array:
        """(P, E) learned position embeddings bilinearly resampled to each image's grid.

        The float32 weights are cast to the table's dtype before weighting (so they are rounded
        in bfloat16), and the four weighted corners are summed left to right in that dtype.
        """
        c = self.config
        indices, weights = position_interpolation(as_image_grid(image_grid_thw),
                                                  num_grid_per_side=c.num_grid_per_side,
                                                  merge_size=c.spatial_merge_size)
        corners = self.pos_embed(jnp.asarray(indices))  # (4, P, E)
        weighted = corners * jnp.asarray(weights).astype(corners.dtype)[:, :, None]
        return ((weighted[0] + weighted[1]) + weighted[2]) + weighted[3]

    def rotary_angles(self, image_grid_thw: ImageGrid) -> np.ndarray:
        """(P, H/2) float32 2-D rotary angles of every patch (a host-side constant)."""
        c = self.config
        return rotary_angles(as_image_grid(image_grid_thw), head_dim=c.head_dim,
                             merge_size=c.spatial_merge_size)

    def __call__(
        self,
        pixel_values: jax.Array,  # (P, C) as produced by the image processor
        image_grid_thw: ImageGrid | Sequence[Sequence[int]] | np.ndarray,  # static, (I, 3)
        *,
        return_intermediates: bool = False,
    ) -> VisionOutput:
        """Encodes all images of a batch at once; attention never crosses image boundaries."""
        c = self.config
        grid = as_image_grid(image_grid_thw)
        _check_grid(grid, c.spatial_merge_size)
        if pixel_values.shape != (num_patches(grid), c.patch_dim):
            raise ValueError(
                f"pixel_values must be (sum of t*h*w = {num_patches(grid)}, {c.patch_dim}) for "
                f"image_grid_thw {grid}, got {pixel_values.shape}"
            )
        patch_embeds = self.embed_patches(pixel_values)
        position_embeds = self.interpolate_position_embeddings(grid)
        x = patch_embeds + position_embeds.astype(patch_embeds.dtype)

        angles = jnp.asarray(self.rotary_angles(grid))
        emb = jnp.concatenate([angles, angles], axis=-1)  # (P, H)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        segments = attention_segments(grid)

        block_outputs, deepstack = [], []
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, segments)
            block_outputs.append(x)
            if index in c.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[c.deepstack_visual_indexes.index(index)]
                deepstack.append(merger(x))
        image_embeds = self.merger(x)
        deepstack_embeds = (jnp.stack(deepstack) if deepstack
                            else jnp.zeros((0, *image_embeds.shape), image_embeds.dtype))
        intermediates = None
        if return_intermediates:
            intermediates = VisionIntermediates(patch_embeds, position_embeds, angles, tuple(block_outputs))
        return VisionOutput(image_embeds, deepstack_embeds, intermediates)
