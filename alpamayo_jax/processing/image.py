"""Image preprocessing for the Qwen3-VL vision tower: raw uint8 RGB frames in, patch rows out.

Reproduces what `Qwen2VLImageProcessorFast` does to uint8 RGB images on CPU:

1. `smart_resize` picks an output size divisible by patch_size * spatial_merge_size within the
   pixel budget (on the host);
2. the image is resized with torchvision's antialiased bicubic filter. For uint8 tensors on CPU
   torchvision hands the tensor to PyTorch's native uint8 kernel, which the resize here
   reproduces bit for bit: PIL's antialiased Keys cubic (a = -0.5) with weights quantised to
   int16, a width pass then a height pass, each accumulated in int32, rounded and clamped to uint8;
3. values are mapped to float32 as (u8 - mean * 255) / (std * 255);
4. the single frame is repeated to temporal_patch_size frames and cut into patches.

The reference's training processor takes another route (`float_resize=True`): it scales the
uint8 frames to float32 x / 255 first and calls the processor with `do_rescale=False`, so the
resize runs PyTorch's float kernel (the same taps with float32 weights, no rounding or
clamping) and the normalisation is (x - mean) / std.

Where the work happens. Steps 2-4 run on the default JAX device, fed the raw uint8 frames, as
one jitted program (`_program`) for all images of a call: the frames of one size and layout
(every camera of a rig, usually) go through it together, each pass's result materialised
row-major as separate programs would (see `_row_major`). A clip's ego-history tokens can be
computed in the same program (`preprocess_clip`). Only the filter taps are made on the host, by
numpy: per axis an (out, K) table of source indices and weights, K the taps of the widest
output pixel, so O(out * K) host work whatever the input size. Each pass gathers its K taps per
output pixel along one axis, or, for the uint8 path's width pass at a scale that is a ratio of
integers, reads them as strided slices (`_filter_axis`). The uint8 path multiplies them by the
int16 weights and sums in int32, the reference's own integer arithmetic, exact on every
backend; the float path sums tap by tap in float32 in the reference's order, each product and
sum rounded. The uint8-to-float maps are lookups in tables numpy made, never divisions on the
device. On the CPU backend a frame array that XLA would copy (`_readable_in_place`) is copied
once by numpy instead, about four times faster, and separate frames of one size (a server's
decoded images) are stacked by numpy into one such array; frames in an `aligned_host_array`
(the PhysicalAI-AV loader's) are not copied at all.

Compilation. The program is specialised to the number of frames of each size and layout, their
size and layout (channels first or last), the output size, which `smart_resize` fixes from the
input size, and the history length: a rig of fixed cameras compiles it once per resolution, on
its first call (`jax.jit`'s cache).

Shapes: C channels (3), H x W input pixels, h x w resized pixels, T temporal_patch_size,
P patch_size, m spatial_merge_size, N images, n frames of one size in one program,
S = sum over images of (h / P) * (w / P) patches, K taps of one axis.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Layout, with_layout_constraint

from alpamayo_jax.action.tokenizers import encode_history
from alpamayo_jax.config import HistoryTokenizerConfig, VisionConfig

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
RESCALE_FACTOR = 1.0 / 255.0
MAX_ASPECT_RATIO = 200


def check_aspect_ratio(height: int, width: int) -> None:
    """Raises ValueError when a `height` x `width` image (both positive) is more than
    `MAX_ASPECT_RATIO` times longer than wide or wider than long, the reference processor's limit.
    `smart_resize` applies it; clip checks call it to reject such images before the model loads."""
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of a {height}x{width} image exceeds {MAX_ASPECT_RATIO} ({ratio:.1f})")


def smart_resize(
    height: int, width: int, *, factor: int = 32, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """(h, w) closest to (height, width) with both divisible by `factor` and h * w within
    [min_pixels, max_pixels] (up to the rounding of the two sides to multiples of `factor`).

    Rounds with Python's `round` (half to even), as the reference does.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    check_aspect_ratio(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ---------------------------------------------------------------------------------------------
# Filter taps of one axis (host, numpy: O(out * K))
# ---------------------------------------------------------------------------------------------


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5, in the reference's operation order."""
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    outer = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


def _fused_multiply_add(a, b, c) -> np.ndarray:
    """float32 a * b + c with an exact product (float64 holds the product of two float32 values)
    and no float32 rounding before the sum: a fused multiply-add, up to the rare double rounding of
    the float64 sum."""
    product = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    return (product + np.asarray(c, np.float64)).astype(np.float32)


def _keys_cubic_float32(x: np.ndarray) -> np.ndarray:
    """`_keys_cubic` of float32 `x` as PyTorch's x86 builds evaluate it: in float32, each
    `p * x + q` of the polynomials contracted to one fused multiply-add."""
    a = np.float32(-0.5)
    x = np.abs(x)
    inner = _fused_multiply_add(_fused_multiply_add(a + 2, x, -(a + 3)) * x, x, np.float32(1.0))
    outer = _fused_multiply_add(_fused_multiply_add(_fused_multiply_add(a, x, -5 * a), x, 8 * a), x, -4 * a)
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, np.float32(0.0)))


def _filter_weights(in_size: int, out_size: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Antialiased Keys-cubic filter of one axis: source indices (out, K) (not yet clamped to the
    input) and normalised weights (out, K), 0 beyond a row's support.

    PyTorch computes these in the kernel's scalar type: float64 for its uint8 kernel, float32 for
    float32 images. `dtype` selects which; the intermediate promotions to float64 (the +0.5 terms
    and the products with Python doubles) are reproduced for both.
    """
    real = np.dtype(dtype).type
    scale = real(in_size) / real(out_size)
    # When shrinking, the kernel is stretched by the scale: that is the antialiasing.
    support = real(2.0 * float(scale)) if scale >= 1.0 else real(2.0)
    invscale = real(1.0 / float(scale)) if scale >= 1.0 else real(1.0)
    num_taps = math.ceil(support) * 2 + 1

    center = (float(scale) * (np.arange(out_size) + 0.5)).astype(real)
    # astype(int64) truncates toward zero like the reference's C casts.
    first = np.maximum(((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
    count = np.minimum(((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size) - first
    count = np.clip(count, 0, num_taps)
    tap = np.arange(num_taps)
    source = first[:, None] + tap
    offset = source.astype(real) - center[:, None]
    argument = ((offset.astype(np.float64) + 0.5) * float(invscale)).astype(real)
    kernel = _keys_cubic_float32 if real is np.float32 else _keys_cubic
    weights = np.where(tap < count[:, None], kernel(argument), real(0.0))

    # Sequential sum: numpy's pairwise reduction could round differently from the reference.
    total = np.zeros(out_size, real)
    for k in range(num_taps):
        total = total + weights[:, k]
    normalized = total != 0.0
    weights[normalized] /= total[normalized, None]
    return source, weights


@functools.lru_cache(maxsize=64)
def _fixed_point_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Fixed-point filter taps of one axis (PyTorch's uint8 kernel): source indices (out, K)
    clamped to the input, int16-range weights (out, K) as int32 and their precision in bits.
    Weights beyond a row's support are 0."""
    source, weights = _filter_weights(in_size, out_size, np.float64)
    wt_max = float(weights.max(initial=0.0))

    # Largest precision at which the biggest weight still fits in int16.
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    used = _used_taps(fixed)
    return np.minimum(source[:, :used], in_size - 1).astype(np.int32), fixed[:, :used], precision


@functools.lru_cache(maxsize=64)
def _float_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Float32 filter taps of one axis (PyTorch's float kernel): source indices (out, K) clamped
    to the input and float32 weights (out, K), 0 beyond a row's support."""
    source, weights = _filter_weights(in_size, out_size, np.float32)
    used = _used_taps(weights)
    return np.minimum(source[:, :used], in_size - 1).astype(np.int32), weights[:, :used]


def _used_taps(weights: np.ndarray) -> int:
    """Taps up to the last one that weighs something in some row: the tap count is sized for the
    widest support, which no row may reach, and every gathered tap costs a pass over the output."""
    nonzero = np.flatnonzero(np.any(weights != 0, axis=0))
    return int(nonzero[-1]) + 1 if nonzero.size else 1


# ---------------------------------------------------------------------------------------------
# Resampling passes (traced JAX)
# ---------------------------------------------------------------------------------------------
# A pass filters one axis: output row j sums taps k of x at source[j, k] times weights[j, k].
# Gathering each tap is fast for the height pass, which gathers whole rows, and XLA's CPU
# backend's slowest step for the width pass, which gathers single pixels. When the scale is a
# ratio of integers, in / out = in_period / out_period, the rows repeat: row j + out_period
# reads the sources of row j shifted by in_period, with the same weights. Those rows split into
# out_period phases, and tap k of phase p reads x at start + in_period * b for block b: a
# strided slice instead of a gather. The uint8 path's width pass reads its repeating rows so
# (`strided`), about twice as fast on 1080p frames in either layout. The height pass keeps its
# gathers (slightly faster there), and so does the float path, where strided slices feeding its
# level lookups are two to three times slower than gathers. The host checks the repetition row
# by row: rows that do not repeat exactly (the borders, where the support is cut and the weights
# renormalised, or a centre rounded differently) are gathered, so the result is the same either
# way.


class _Periodic(NamedTuple):
    """Output blocks `first` to `first + count` of an axis's filter repeat with period
    (in_period, out_period) (static)."""

    in_period: int
    out_period: int
    first: int
    count: int


def _periodic_rows(source: np.ndarray, weights: np.ndarray, in_size: int) -> _Periodic | None:
    """The longest run of repeating output blocks around the middle of a filter with taps
    `source`, `weights` (out, K), or None when fewer than two blocks repeat."""
    out_size = source.shape[0]
    blocks = math.gcd(in_size, out_size)
    in_period, out_period = in_size // blocks, out_size // blocks
    if blocks < 2:
        return None
    source_blocks = source.reshape(blocks, out_period, -1)
    weight_blocks = weights.reshape(blocks, out_period, -1)
    middle = blocks // 2
    shift = (np.arange(blocks) - middle) * in_period
    repeats = np.all(source_blocks == source_blocks[middle] + shift[:, None, None], axis=(1, 2)) & np.all(
        weight_blocks == weight_blocks[middle], axis=(1, 2)
    )
    first, stop = middle, middle + 1
    while first > 0 and repeats[first - 1]:
        first -= 1
    while stop < blocks and repeats[stop]:
        stop += 1
    return _Periodic(in_period, out_period, first, stop - first) if stop - first >= 2 else None


_Combine = Callable[[list[jax.Array], np.ndarray, list[int]], jax.Array]


def _filter_axis(
    x: jax.Array, source: np.ndarray, weights: np.ndarray, axis: int, combine: _Combine, *, strided: bool
) -> list[jax.Array]:
    """x filtered along `axis` by the taps `source`, `weights` (out, K), as pieces along `axis`
    that concatenate to the out rows (one piece, or the gathered first rows, the strided ones and
    the gathered last rows); with `strided`, repeating rows read strided slices (see above). The
    caller joins the pieces as late as it can (`_resize`).

    `combine(samples, weights, shape)` makes the output rows of one piece: `samples[k]` holds x
    at tap k of those rows (the axis as long as the piece), `weights` (r, K) is theirs, r = 1 for
    the rows of one phase, and `shape` is the broadcast shape of a column of `weights`.
    """

    def piece(samples: list[jax.Array], row_weights: np.ndarray) -> jax.Array:
        shape = [1] * x.ndim
        shape[axis] = row_weights.shape[0]
        return combine(samples, row_weights, shape)

    def gathered(rows: slice) -> jax.Array:
        taps = source[rows]
        return piece([jnp.take(x, taps[:, k], axis=axis, mode="clip", indices_are_sorted=True)
                      for k in range(taps.shape[1])], weights[rows])

    periodic = _periodic_rows(source, weights, x.shape[axis]) if strided else None
    if periodic is None:
        return [gathered(slice(None))]
    in_period, out_period, first, count = periodic
    start, stop = first * out_period, (first + count) * out_period
    phases = []
    for row in range(start, start + out_period):
        samples = [jax.lax.slice_in_dim(x, s, s + in_period * (count - 1) + 1, stride=in_period, axis=axis)
                   for s in source[row].tolist()]
        phases.append(piece(samples, weights[row : row + 1]))
    interleaved = jnp.stack(phases, axis=axis + 1)  # block b, phase p -> row out_period * b + p
    pieces = [interleaved.reshape(*x.shape[:axis], count * out_period, *x.shape[axis + 1 :])]
    if start:
        pieces.insert(0, gathered(slice(0, start)))
    if stop < source.shape[0]:
        pieces.append(gathered(slice(stop, None)))
    return pieces


def _resample_fixed_point(x: jax.Array, out_size: int, axis: int, *, strided: bool) -> list[jax.Array]:
    """uint8 `x` resampled along `axis` to `out_size` samples (uint8, pieces and `strided` as
    `_filter_axis`): PyTorch's uint8 kernel, int16 weights accumulated in int32 from the +0.5 of
    the rounding, shifted and clamped."""
    source, weights, precision = _fixed_point_taps(x.shape[axis], out_size)

    def combine(samples, weights, shape):
        acc = jnp.int32(1 << (precision - 1))
        for k, sample in enumerate(samples):
            if weights[:, k].any():  # a phase's rows may all lack a tap: integer sums skip it exactly
                acc = acc + sample.astype(jnp.int32) * weights[:, k].reshape(shape)
        return jnp.clip(acc >> precision, 0, 255).astype(jnp.uint8)

    return _filter_axis(x, source, weights, axis, combine, strided=strided)


def _resample_float(
    x: jax.Array, out_size: int, axis: int, prepare: Callable[[jax.Array], jax.Array], zero: jax.Array
) -> list[jax.Array]:
    """`x` resampled along `axis` to `out_size` samples in float32 (no clamping; pieces as
    `_filter_axis`): each tap is `prepare(sample)` (float32) times its weight, summed tap by tap
    in order as the reference accumulates (taps past a row's support weigh 0). Gathering before
    `prepare` lets a uint8 input be scaled on the fly instead of as a float32 copy of the whole
    frame.

    `zero` is a traced 0.0: XLA's CPU backend (and LLVM-based GPU backends) contract a multiply
    feeding an add into one fused multiply-add, which skips the rounding of the product. Adding a
    zero the compiler cannot see through makes that fma(sample, weight, 0), the rounded product,
    so each step rounds the product and then the sum, as the reference does.
    """
    source, weights = _float_taps(x.shape[axis], out_size)

    def combine(samples, weights, shape):
        acc = None
        for k, sample in enumerate(samples):
            term = prepare(sample) * weights[:, k].reshape(shape) + zero
            acc = term if acc is None else acc + term
        return acc

    return _filter_axis(x, source, weights, axis, combine, strided=False)


def _identity(x: jax.Array) -> jax.Array:
    return x


def _resample(
    x: jax.Array,
    out_size: int,
    axis: int,
    *,
    float_resize: bool,
    strided: bool = False,
    prepare: Callable[[jax.Array], jax.Array] = _identity,
    zero: jax.Array | None = None,
) -> list[jax.Array]:
    """One pass of the antialiased bicubic resize along `axis`, as pieces along it
    (`_filter_axis`; `strided` is for the uint8 path's width pass); an unchanged axis is not
    filtered.

    uint8 path (`float_resize=False`): uint8 in, uint8 out, rounded and clamped. Float path:
    `prepare` maps the input's samples to float32 (the identity for float32 input) and the output
    is float32, neither rounded nor clamped; `zero` is a traced 0.0 (`_resample_float`).
    """
    if x.shape[axis] == out_size:
        return [prepare(x) if float_resize else x]
    if float_resize:
        return _resample_float(x, out_size, axis, prepare, zero)
    return _resample_fixed_point(x, out_size, axis, strided=strided)


# ---------------------------------------------------------------------------------------------
# Input checking (host)
# ---------------------------------------------------------------------------------------------


def to_channels_first(image, *, name: str = "image") -> np.ndarray:
    """Checks one RGB uint8 image and returns it as (3, H, W) (a view where it can).

    Accepts (3, H, W) or (H, W, 3). A leading axis of size 3 means channels-first, even when the
    last axis is 3 too (a (3, H, 3) image is read as 3 channels of H x 3 pixels), which is the rule
    Hugging Face's processors apply to ambiguous shapes.
    """
    array = np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D (3, H, W) or (H, W, 3) image, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(
            f"{name}: expected uint8 pixel values in 0..255, got dtype {array.dtype} "
            "(convert float images with np.round(x * 255).astype(np.uint8) first)"
        )
    if array.shape[0] == 3:
        chw = array
    elif array.shape[2] == 3:
        chw = array.transpose(2, 0, 1)
    else:
        raise ValueError(
            f"{name}: expected 3 (RGB) channels on the first or last axis, got shape {array.shape}"
        )
    if chw.shape[1] == 0 or chw.shape[2] == 0:
        raise ValueError(f"{name}: image is empty, shape {array.shape}")
    return chw


def flatten_camera_frames(frames) -> list[np.ndarray]:
    """(n_cameras, n_frames, 3, H, W) camera frames -> list of n_cameras * n_frames (3, H, W)
    images in prompt order: camera-major (cam0 f0, cam0 f1, ..., cam1 f0, ...).

    `frames` is a 5-D uint8 array or nested sequences of images (each (3, H, W) or (H, W, 3)).
    All frames of one camera must have the same size; cameras may differ.
    """
    if isinstance(frames, np.ndarray) and frames.ndim != 5:
        raise ValueError(f"camera frames: expected (n_cameras, n_frames, 3, H, W), got shape {frames.shape}")
    images = []
    for c, camera in enumerate(frames):
        camera_images = [to_channels_first(f, name=f"camera {c} frame {i}") for i, f in enumerate(camera)]
        if not camera_images:
            raise ValueError(f"camera {c} has no frames")
        sizes = {im.shape[1:] for im in camera_images}
        if len(sizes) > 1:
            raise ValueError(f"camera {c}: frames have different sizes {sorted(sizes)}")
        images.extend(camera_images)
    if not images:
        raise ValueError("camera frames: no cameras given")
    return images


def _device_layout(chw: np.ndarray) -> tuple[np.ndarray, bool]:
    """The array to send for a (3, H, W) image and whether it is channels-last: a view of an
    (H, W, 3) image goes as that image (the programs read either layout) rather than as a
    channels-first host copy."""
    if chw.flags.c_contiguous:
        return chw, False
    hwc = chw.transpose(1, 2, 0)
    if hwc.flags.c_contiguous:
        return hwc, True
    return np.ascontiguousarray(chw), False


def _batch(arrays: list[np.ndarray]) -> np.ndarray | tuple[np.ndarray, ...]:
    """n frames of one shape as one (n, ...) array when they are one frame, or consecutive,
    contiguous views of one owner's memory (the frames of a 5-D camera array), so that they
    travel as that memory; otherwise as a tuple, stacked on the host on the CPU backend
    (`_readable_in_place`), by the program on others."""
    first = arrays[0]
    if len(arrays) == 1:
        return first[None]
    stride = first.nbytes
    if first.base is not None and all(
        a.base is first.base and a.flags.c_contiguous and a.shape == first.shape and a.dtype == first.dtype
        and a.ctypes.data == first.ctypes.data + i * stride
        for i, a in enumerate(arrays)
    ):
        # Every frame is a view of one owner, so the n frames' span lies inside its memory.
        return np.lib.stride_tricks.as_strided(
            first, (len(arrays), *first.shape), (stride, *first.strides), writeable=False
        )
    return tuple(arrays)


# ---------------------------------------------------------------------------------------------
# Normalisation and patches (traced JAX)
# ---------------------------------------------------------------------------------------------


def _patch_rows(pixels: jax.Array, patch_size: int, merge_size: int, temporal: int, channels_last: bool):
    """(n, C, h, w) (or (n, h, w, C)) float32 -> (n * h/P * w/P, C * T * P * P) patch rows."""
    layout = "n (br mr py) (bc mc px) c" if channels_last else "n c (br mr py) (bc mc px)"
    # block rows/columns (br, bc), patch rows/columns inside a block (mr, mc), pixels in a patch (py, px)
    blocks = einops.rearrange(
        pixels, f"{layout} -> (n br bc mr mc) c py px", mr=merge_size, mc=merge_size, py=patch_size, px=patch_size
    )
    # The T copies as a concatenation: XLA's CPU backend writes that about twice as fast as a
    # broadcast along the same axis.
    clip = jnp.concatenate([blocks[:, :, None]] * temporal, axis=2)
    return clip.reshape(blocks.shape[0], -1)


def patchify(pixels, vision: VisionConfig) -> jax.Array:
    """(C, h, w) float32 -> (h/P * w/P, C * T * P * P) rows for the vision tower's patch embedding.

    The frame is repeated T times (an image is a clip of identical frames). Rows go over
    m x m merge blocks in row-major order, the m * m patches of a block consecutive (row-major);
    each row is laid out [C][T][py][px].
    """
    pixels = jnp.asarray(pixels)
    _, h, w = pixels.shape
    p, m, t = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size * merge_size = {p * m}")
    return _patch_rows(pixels[None], p, m, t, channels_last=False)


# ---------------------------------------------------------------------------------------------
# The program: resize, normalisation and patches of all frames of a call (one jit)
# ---------------------------------------------------------------------------------------------
# Left to itself, XLA fuses each step into the next one's gathers or transposes (recomputing
# the height pass once per copy of a patch) and lays the width pass's result out transposed:
# on CPU about twice as slow as materialising each step on the uint8 path, twenty times on the
# float path (16 x 1080 x 1920 frames). `_row_major` pins the result of each pass to a row-major
# buffer, a program boundary inside the program: the steps compile as they would alone, into one
# executable, as fast as three programs. (`jax.lax.optimization_barrier` does not do this: the
# compiled program has no trace of it.)


def _row_major(x: jax.Array) -> jax.Array:
    """`x` materialised in row-major order (see above)."""
    return with_layout_constraint(x, Layout(tuple(range(x.ndim))))


class _Group(NamedTuple):
    """The frames of one size and layout in a call (static): their indices in the call's image
    order, their size after the resize and whether they are channels-last."""

    images: tuple[int, ...]
    size: tuple[int, int]  # (h, w)
    channels_last: bool


def _resize(
    x: jax.Array,  # (n, 3, H, W) or (n, H, W, 3): uint8, or float32 for the float path
    size: tuple[int, int],
    *,
    float_resize: bool,
    channels_last: bool,
    levels: jax.Array | None,  # float path on uint8 frames: (256,) float32 value of each level
    zero: jax.Array,  # () float32 0.0 (`_resample_float`)
) -> jax.Array:  # (n, 3, h, w) or (n, h, w, 3): uint8, float32 on the float path
    """The width pass, then the height pass (`_resample`; a pass that keeps its size is skipped),
    each materialised row-major.

    The height pass filters each piece of columns the width pass made, and the pieces are joined
    only then: joining the width pass's pieces of 1080p frames first would copy 30 MB.
    """
    prepare = _identity if levels is None else (lambda v: levels[v.astype(jnp.int32)])
    height_axis = 1 if channels_last else 2
    width_axis = height_axis + 1
    columns = [c if c is x else _row_major(c) for c in _resample(
        x, size[1], width_axis, float_resize=float_resize, strided=True, prepare=prepare, zero=zero)]
    resized = []
    for c in columns:
        rows = _resample(c, size[0], height_axis, float_resize=float_resize, zero=zero)
        resized.append(c if rows[0] is c else _row_major(_joined(rows, height_axis)))
    return _joined(resized, width_axis)


def _joined(pieces: list[jax.Array], axis: int) -> jax.Array:
    """`pieces` concatenated along `axis`."""
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=axis)


def _normalize(
    x: jax.Array,  # (n, 3, h, w) or (n, h, w, 3) resized frames: uint8, float32 on the float path
    levels: jax.Array,  # uint8 path: (3, 256) float32 normalised value per channel and level
    mean: jax.Array,  # float path: (3,) float32
    inverse_std: jax.Array,  # float path: (3,) float32
    *,
    float_resize: bool,
    channels_last: bool,
) -> jax.Array:  # float32, x's shape
    """Normalised pixels (`_normalization_tables`).

    Every uint8-to-float map is a lookup in a table the host made with numpy: XLA turns a
    division by a constant, or by any scalar, into a multiplication by its rounded reciprocal,
    which is not the reference's float32 division.
    """
    channel_shape = (1, 1, 1, 3) if channels_last else (1, 3, 1, 1)
    if float_resize:
        return (x - mean.reshape(channel_shape)) * inverse_std.reshape(channel_shape)
    return levels[jnp.arange(3).reshape(channel_shape), x.astype(jnp.int32)]


@functools.partial(jax.jit, static_argnames=("groups", "float_resize", "patches", "history"))
def _program(
    frames: tuple,  # per group: an (n, 3, H, W) or (n, H, W, 3) array, or its n frames (stacked here)
    tables: tuple[jax.Array, ...],  # `_normalization_tables(float_resize)` and a float32 0.0
    history_xyz: jax.Array | None,  # with `history`: (T, 3) float32 ego history
    *,
    groups: tuple[_Group, ...],
    float_resize: bool,
    patches: tuple[int, int, int] | None,  # (P, m, T); None: the resized frames of the one group
    history: HistoryTokenizerConfig | None,
) -> tuple[jax.Array, jax.Array | None]:
    """All frames of a call -> (their patch rows in image order (S, 3 * T * P * P) float32, or the
    resized frames; the history bins (3T,) int32 (`encode_history`) or None).

    The frames are uint8, or float32 for the float resize of float images
    (`resize_bicubic_aa_float`); uint8 frames on the float path are mapped to x / 255 as the width
    pass gathers them.
    """
    width_levels, levels, mean, inverse_std, zero = tables
    outputs = []
    for group, x in zip(groups, frames):
        x = jnp.stack(x) if isinstance(x, tuple) else x
        x = _resize(x, group.size, float_resize=float_resize, channels_last=group.channels_last,
                    levels=width_levels if float_resize and x.dtype == jnp.uint8 else None, zero=zero)
        if patches is not None:
            pixels = _normalize(x, levels, mean, inverse_std, float_resize=float_resize,
                                channels_last=group.channels_last)
            x = _patch_rows(pixels, *patches, channels_last=group.channels_last)
        outputs.append(x)
    bins = None if history is None else encode_history(history_xyz, history)
    if len(groups) == 1:
        return outputs[0], bins
    pieces = {}
    for group, rows in zip(groups, outputs):
        per_image = rows.shape[0] // len(group.images)
        pieces.update({i: rows[j * per_image : (j + 1) * per_image] for j, i in enumerate(group.images)})
    return jnp.concatenate([pieces[i] for i in sorted(pieces)]), bins


def _normalization_tables(
    float_resize: bool, mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(width_levels, levels, mean, inverse_std) float32 for the program.

    uint8 path: the reference folds the 1/255 rescale into mean and std (float32 mean * 255 and
    std * 255) and then subtracts and divides in float32; `levels[c, u]` holds that value of
    level u in channel c. Float path: `width_levels[u]` = float32 u / 255, the value the resize
    starts from, and the resized values are normalised as (x - mean) * (1 / std), which is the
    division by std exactly because std is a power of two (0.5).
    """
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    inverse_rescale = np.float32(1.0 / RESCALE_FACTOR)
    level = np.arange(256, dtype=np.float32)
    if float_resize and np.any(np.frexp(std32)[0] != 0.5):
        raise ValueError(f"the float path needs std values that are powers of two, got {tuple(std)}")
    levels = (level[None] - (mean32 * inverse_rescale)[:, None]) / (std32 * inverse_rescale)[:, None]
    return level / inverse_rescale, levels, mean32, np.float32(1.0) / std32


_ZERO = np.float32(0.0)


# XLA's CPU client reads a host array in place when its data starts at a multiple of this many
# bytes; any other array it copies first, about four times slower than numpy copies (90 ms for
# the 100 MB of 16 1080p frames). numpy's own large arrays start 16 bytes past a page.
_IN_PLACE_ALIGNMENT = 64


def aligned_host_array(shape: Sequence[int], dtype=np.uint8) -> np.ndarray:
    """An uninitialised C-contiguous host array whose data starts at a multiple of
    `_IN_PLACE_ALIGNMENT` bytes, which XLA's CPU client reads in place. Loaders that write
    their frames into one (`np.stack(..., out=...)`) spare preprocessing a copy."""
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    storage = np.empty(count * dtype.itemsize + _IN_PLACE_ALIGNMENT, np.uint8)
    start = -storage.ctypes.data % _IN_PLACE_ALIGNMENT
    return np.frombuffer(storage, dtype, count=count, offset=start).reshape(shape)


def aligned_stack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """`np.stack(arrays)` (arrays of one shape and dtype) into an `aligned_host_array`: the
    arrays' one copy, which XLA's CPU client then reads in place."""
    stacked = aligned_host_array((len(arrays), *arrays[0].shape), arrays[0].dtype)
    np.stack(arrays, out=stacked)
    return stacked


def _readable_in_place(frames: np.ndarray | tuple[np.ndarray, ...]) -> np.ndarray | tuple[np.ndarray, ...]:
    """One group's frames (`_batch`) as the program gets them. On the CPU backend, an array XLA
    reads in place (`_IN_PLACE_ALIGNMENT`): the array itself, or a numpy copy of it, or the
    tuple's frames stacked by numpy into one (one host copy instead of one per frame and the
    program's stack). On other backends, `frames` unchanged."""
    if jax.default_backend() != "cpu":
        return frames
    if isinstance(frames, tuple):
        return aligned_stack(frames)
    if frames.ctypes.data % _IN_PLACE_ALIGNMENT == 0:
        return frames
    aligned = aligned_host_array(frames.shape, frames.dtype)
    np.copyto(aligned, frames)
    return aligned


def _run_program(frames: tuple, history_xyz=None, *, float_resize: bool, **static):
    """`_program` on `frames` (per group an array or a tuple of arrays) with the tables of
    `float_resize`."""
    frames = tuple(map(_readable_in_place, frames))
    return _program(frames, (*_normalization_tables(float_resize), _ZERO), history_xyz,
                    float_resize=float_resize, **static)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def _resize_image(image: np.ndarray, height: int, width: int, *, float_resize: bool) -> np.ndarray:
    if height <= 0 or width <= 0:
        raise ValueError(f"output size must be positive, got {height}x{width}")
    resized, _ = _run_program((_batch([image]),), float_resize=float_resize,
                              groups=(_Group((0,), (height, width), False),), patches=None, history=None)
    return np.asarray(resized[0])


def resize_bicubic_aa(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of a (C, H, W) uint8 image to (C, height, width) uint8.

    Bit-exact with `torch.nn.functional.interpolate(..., mode="bicubic", antialias=True)` on
    uint8 CPU tensors, which is what torchvision's `resize` runs for uint8 bicubic on CPU.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) uint8 image, got {image.dtype} {image.shape}")
    return _resize_image(image, height, width, float_resize=False)


def resize_bicubic_aa_float(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of a (C, H, W) float32 image to (C, height, width) float32.

    What `torch.nn.functional.interpolate(..., mode="bicubic", antialias=True)` (torchvision's
    `resize` of a float tensor) computes on CPU: the filter of `resize_bicubic_aa` with float32
    weights, a width pass then a height pass, and neither rounding nor clamping, so the cubic's
    overshoot can leave [0, 1]. The weights are PyTorch's bit for bit on x86 (fused multiply-adds
    in the filter polynomial); the sums agree to a float32 ulp or two, as PyTorch's compiled
    kernels fuse some of their multiply-adds and not others.
    """
    if image.dtype != np.float32 or image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) float32 image, got {image.dtype} {image.shape}")
    return _resize_image(image, height, width, float_resize=True)


def preprocess_images(
    images: Sequence, *, vision: VisionConfig, min_pixels: int, max_pixels: int, float_resize: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB images -> (pixel_values (S, C*T*P*P) float32, image_grid_thw (N, 3) int64),
    both host (numpy) arrays; pixel_values may be a read-only view of the device result.

    Each image is (3, H, W) or (H, W, 3) (see `to_channels_first` for the ambiguous case); sizes
    may differ between images. `image_grid_thw[i] = (1, h_i / P, w_i / P)` in patches. All images
    go through one program, those of one size and layout together (see the module docstring).

    `float_resize=False` is the inference processor (uint8 resize, `resize_bicubic_aa`);
    `float_resize=True` the reference's training processor: the image becomes float32 u8 / 255
    before a float resize (`resize_bicubic_aa_float`) and is then normalised from those values.
    Without a resize the two differ only by float32 rounding (~6e-8).
    """
    pixel_values, grid, _ = _preprocess(images, None, vision=vision, min_pixels=min_pixels,
                                        max_pixels=max_pixels, float_resize=float_resize, history=None)
    return pixel_values, grid


def preprocess_clip(
    images: Sequence,
    ego_history_xyz: np.ndarray,  # (T, 3) float32 positions in the t0 ego frame, oldest first
    *,
    vision: VisionConfig,
    min_pixels: int,
    max_pixels: int,
    history_tokenizer: HistoryTokenizerConfig,
    float_resize: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`preprocess_images` of a clip's images, and the bins (3T,) int64 of its ego history
    (`alpamayo_jax.action.tokenizers.encode_history`), from the same program: a clip is one
    compiled program per frame size, layout and count. The history is not checked here
    (`prompt.check_history` does)."""
    return _preprocess(images, ego_history_xyz, vision=vision, min_pixels=min_pixels, max_pixels=max_pixels,
                       float_resize=float_resize, history=history_tokenizer)


def _preprocess(
    images: Sequence, history_xyz, *, vision: VisionConfig, min_pixels: int, max_pixels: int, float_resize: bool,
    history: HistoryTokenizerConfig | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if vision.in_channels != 3:
        raise ValueError(f"only RGB vision towers are supported, got in_channels={vision.in_channels}")
    images = list(images)
    if not images:
        raise ValueError("no images given")
    factor = vision.patch_size * vision.spatial_merge_size
    members: dict[tuple[int, int, bool], list[int]] = {}
    arrays, sizes = [], []
    for i, image in enumerate(images):
        chw = to_channels_first(image, name=f"image {i}")
        sizes.append(smart_resize(chw.shape[1], chw.shape[2], factor=factor, min_pixels=min_pixels,
                                  max_pixels=max_pixels))
        array, channels_last = _device_layout(chw)
        arrays.append(array)
        members.setdefault((chw.shape[1], chw.shape[2], channels_last), []).append(i)
    grid = np.asarray([(1, h // vision.patch_size, w // vision.patch_size) for h, w in sizes], dtype=np.int64)
    groups = tuple(_Group(tuple(indices), sizes[indices[0]], channels_last)
                   for (_, _, channels_last), indices in members.items())
    rows, bins = _run_program(
        tuple(_batch([arrays[i] for i in group.images]) for group in groups), history_xyz,
        float_resize=float_resize, groups=groups,
        patches=(vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size), history=history,
    )
    return np.asarray(rows), grid, None if bins is None else np.asarray(bins).astype(np.int64)
