"""Image preprocessing for the Qwen3-VL vision tower, on the host (numpy only).

Reproduces what `Qwen2VLImageProcessorFast` does to uint8 RGB images on CPU:

1. `smart_resize` picks an output size divisible by patch_size * spatial_merge_size within the
   pixel budget;
2. the image is resized with torchvision's antialiased bicubic filter. For uint8 tensors on CPU
   torchvision hands the tensor to PyTorch's native uint8 kernel, which `resize_bicubic_aa`
   re-implements bit for bit: PIL's antialiased Keys cubic (a = -0.5) with weights quantised to
   int16, a width pass then a height pass, each rounded and clamped to uint8;
3. values are mapped to float32 as (u8 - mean * 255) / (std * 255);
4. the single frame is repeated to temporal_patch_size frames and cut into patches.

The reference's training processor takes another route (`float_resize=True`): it scales the
uint8 frames to float32 x / 255 first and calls the processor with `do_rescale=False`, so the
resize runs PyTorch's float kernel (`resize_bicubic_aa_float`: the same taps with float32
weights, no rounding or clamping) and the normalisation is (x - mean) / std.

Shapes: C channels (3), H x W input pixels, h x w resized pixels, T temporal_patch_size,
P patch_size, m spatial_merge_size, N images, S = sum over images of (h / P) * (w / P) patches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import einops
import numpy as np

from alpamayo_jax.config import VisionConfig

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
# Antialiased bicubic resize of uint8 images (PyTorch's CPU uint8 kernel)
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


def _resample_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Fixed-point filter taps of one axis (PyTorch's uint8 kernel): source indices (out, K),
    int16-range weights (out, K) and their precision in bits. Weights beyond a row's support are
    0 (their index is clamped)."""
    source, weights = _filter_weights(in_size, out_size, np.float64)
    wt_max = float(weights.max(initial=0.0))

    # Largest precision at which the biggest weight still fits in int16.
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)
    return np.minimum(source, in_size - 1), fixed, precision


def _resample_axis(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Resamples uint8 `x` along `axis` to `out_size` samples (uint8)."""
    source, weights, precision = _resample_taps(x.shape[axis], out_size)
    weight_shape = [1] * x.ndim
    weight_shape[axis] = out_size
    out_shape = list(x.shape)
    out_shape[axis] = out_size
    # int32 accumulation, as in the reference; the initial value is the +0.5 of the rounding.
    acc = np.full(out_shape, 1 << (precision - 1), dtype=np.int32)
    for k in range(source.shape[1]):
        tap = weights[:, k].astype(np.int32).reshape(weight_shape)
        acc += np.take(x, source[:, k], axis=axis).astype(np.int32) * tap
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_bicubic_aa(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of a (C, H, W) uint8 image to (C, height, width) uint8.

    Bit-exact with `torch.nn.functional.interpolate(..., mode="bicubic", antialias=True)` on
    uint8 CPU tensors, which is what torchvision's `resize` runs for uint8 bicubic on CPU.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) uint8 image, got {image.dtype} {image.shape}")
    if height <= 0 or width <= 0:
        raise ValueError(f"output size must be positive, got {height}x{width}")
    # With uint8 rounding between the two passes.
    return _separable_resize(image, height, width, _resample_axis)


def _separable_resize(image: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    """Width pass, then height pass (`resample(x, out_size, axis)`); an unchanged axis is not filtered."""
    out = image
    if width != image.shape[2]:
        out = resample(out, width, axis=2)
    if height != image.shape[1]:
        out = resample(out, height, axis=1)
    return out


def _resample_axis_float(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """Resamples float32 `x` along `axis` to `out_size` samples (float32, no clamping)."""
    source, weights = _filter_weights(x.shape[axis], out_size, np.float32)
    source = np.minimum(source, x.shape[axis] - 1)
    weight_shape = [1] * x.ndim
    weight_shape[axis] = out_size
    # Tap by tap, in order, as the reference accumulates (taps past a row's support weigh 0).
    acc = np.take(x, source[:, 0], axis=axis) * weights[:, 0].reshape(weight_shape)
    for k in range(1, source.shape[1]):
        acc = acc + np.take(x, source[:, k], axis=axis) * weights[:, k].reshape(weight_shape)
    return acc


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
    if height <= 0 or width <= 0:
        raise ValueError(f"output size must be positive, got {height}x{width}")
    return _separable_resize(image, height, width, _resample_axis_float)


# ---------------------------------------------------------------------------------------------
# Input checking
# ---------------------------------------------------------------------------------------------


def to_channels_first(image, *, name: str = "image") -> np.ndarray:
    """Checks one RGB uint8 image and returns it as (3, H, W).

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


# ---------------------------------------------------------------------------------------------
# Normalisation and patches
# ---------------------------------------------------------------------------------------------


def normalize(
    image: np.ndarray, *, mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD
) -> np.ndarray:
    """(C, h, w) uint8 -> (C, h, w) float32 (u8 - mean * 255) / (std * 255); or, for a float32
    image already scaled to [0, 1] (the processor's `do_rescale=False`), (x - mean) / std.

    For uint8 the reference folds the 1/255 rescale into mean and std (float32 mean * 255 and
    std * 255) and then subtracts and divides in float32; doing the same gives bit-identical
    values. A float32 image is normalised as it is, subtraction then division in float32.
    """
    if image.dtype == np.float32:
        mean32, std32 = (np.asarray(v, np.float32)[:, None, None] for v in (mean, std))
        return (image - mean32) / std32
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or float32 image, got {image.dtype}")
    inverse_rescale = np.float32(1.0 / RESCALE_FACTOR)
    mean255 = (np.asarray(mean, np.float32) * inverse_rescale)[:, None, None]
    std255 = (np.asarray(std, np.float32) * inverse_rescale)[:, None, None]
    return (image.astype(np.float32) - mean255) / std255


def patchify(pixels: np.ndarray, vision: VisionConfig) -> np.ndarray:
    """(C, h, w) float32 -> (h/P * w/P, C * T * P * P) rows for the vision tower's patch embedding.

    The frame is repeated T times (an image is a clip of identical frames). Rows go over
    m x m merge blocks in row-major order, the m * m patches of a block consecutive (row-major);
    each row is laid out [C][T][py][px].
    """
    c, h, w = pixels.shape
    p, m, t = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise ValueError(f"image size {h}x{w} is not a multiple of patch_size * merge_size = {p * m}")
    clip = np.broadcast_to(pixels[None], (t, c, h, w))
    # block rows/columns (br, bc), patch rows/columns inside a block (mr, mc), pixels in a patch (py, px)
    return einops.rearrange(clip, "t c (br mr py) (bc mc px) -> (br bc mr mc) (c t py px)", mr=m, mc=m, py=p, px=p)


def preprocess_images(
    images: Sequence, *, vision: VisionConfig, min_pixels: int, max_pixels: int, float_resize: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB images -> (pixel_values (S, C*T*P*P) float32, image_grid_thw (N, 3) int64).

    Each image is (3, H, W) or (H, W, 3) (see `to_channels_first` for the ambiguous case); sizes
    may differ between images. `image_grid_thw[i] = (1, h_i / P, w_i / P)` in patches.

    `float_resize=False` is the inference processor (uint8 resize, `resize_bicubic_aa`);
    `float_resize=True` the reference's training processor: the image becomes float32 u8 / 255
    before a float resize (`resize_bicubic_aa_float`) and is then normalised from those values.
    Without a resize the two differ only by float32 rounding (~6e-8).
    """
    if vision.in_channels != 3:
        raise ValueError(f"only RGB vision towers are supported, got in_channels={vision.in_channels}")
    images = list(images)
    if not images:
        raise ValueError("no images given")
    factor = vision.patch_size * vision.spatial_merge_size
    rows, grids = [], []
    for i, image in enumerate(images):
        chw = to_channels_first(image, name=f"image {i}")
        height, width = smart_resize(
            chw.shape[1], chw.shape[2], factor=factor, min_pixels=min_pixels, max_pixels=max_pixels
        )
        if float_resize:
            resized = resize_bicubic_aa_float(chw.astype(np.float32) / np.float32(255.0), height, width)
        else:
            resized = resize_bicubic_aa(chw, height, width)
        rows.append(patchify(normalize(resized), vision))
        grids.append((1, height // vision.patch_size, width // vision.patch_size))
    return np.concatenate(rows, axis=0), np.asarray(grids, dtype=np.int64)
