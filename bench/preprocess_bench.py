"""Image preprocessing benchmark: ours (`processing.image.preprocess_images`, jitted JAX) against
transformers' `Qwen2VLImageProcessorFast` (torchvision on PyTorch) on the same uint8 frames.

The default input is a real rig's: 4 cameras x 4 frames of 1080 x 1920 uint8, resized to
320 x 576 with the 10B model's pixel budget. Both sides get the same frames; their calls are
interleaved in one process so that a loaded machine slows both alike, in an order that turns
every repeat (the call right after theirs runs slower, whichever it is). The first call of ours
includes compiling its programs; the first call of theirs warms up too. Also checks that both
produce the same pixel values (bit for bit on the uint8 path), and counts each side's minor page
faults per call: memory the kernel maps and zeroes afresh, which on glibc's default allocator is
a large share of both sides' time (every buffer over 32 MB is a new mapping).

numpy's large arrays start 16 bytes past a 64-byte boundary, and XLA's CPU client reads only
64-byte-aligned host arrays in place, so ours first copies such frames (`image._readable_in_place`).
The figures of ours include that copy; `ours_aligned_frames_*` are the same calls, interleaved
with the others, on the frames in an `image.aligned_host_array` filled beforehand: what a caller
that allocates its frames there gets, as the PhysicalAI-AV loader does. `ours_separate_frames_*`
are the frames as 16 arrays of their own, given straight to preprocessing (numpy stacks them).

    python bench/preprocess_bench.py [--height 1080 --width 1920 --cameras 4 --frames 4]
                                     [--repeats 7] [--layout chw|hwc] [--float-resize] [--json]

transformers' fast processor needs torchvision, which the project does not depend on: install a
torchvision wheel matching the installed torch into a directory of its own and put it on
PYTHONPATH. A wheel built for another torch variant (a CUDA build next to a CPU torch) is fine:
its compiled operators are not used, and the import shim below lets its Python transforms load.
Without torchvision the benchmark reports ours only.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import jax
import numpy as np

from alpamayo_jax.config import alpamayo_r1_10b
from alpamayo_jax.processing import image

def fast_processor(config):
    """transformers' fast Qwen2-VL image processor with the model's settings, or None (and why)."""
    try:
        import torch
    except ImportError as error:
        return None, f"torch not importable ({error})"
    from alpamayo_reference.verify_training import import_torchvision

    try:
        import_torchvision([])  # with the shim for a wheel built for another torch variant
    except ImportError as error:
        return None, f"torchvision not importable ({error})"
    from transformers import Qwen2VLImageProcessorFast

    vision = config.vision
    processor = Qwen2VLImageProcessorFast(
        size={"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels},
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        image_mean=list(image.IMAGE_MEAN),
        image_std=list(image.IMAGE_STD),
    )
    name = f"transformers Qwen2VLImageProcessorFast, torch {torch.__version__}, {torch.get_num_threads()} threads"
    return processor, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4, help="frames per camera")
    parser.add_argument("--repeats", type=int, default=7, help="steady-state calls of each side")
    parser.add_argument("--layout", choices=("chw", "hwc"), default="chw", help="layout of the frames")
    parser.add_argument("--float-resize", action="store_true", help="the training path (theirs: do_rescale=False)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args()

    config = alpamayo_r1_10b()
    shape = (args.cameras, args.frames, 3, args.height, args.width)
    frames = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    if args.layout == "hwc":
        frames = np.ascontiguousarray(frames.transpose(0, 1, 3, 4, 2))

    aligned_frames = image.aligned_host_array(frames.shape)
    aligned_frames[...] = frames
    separate_frames = [[np.array(f) for f in camera] for camera in frames]

    def ours(frames=frames):
        pixels, grid = image.preprocess_images(
            image.flatten_camera_frames(frames), vision=config.vision, min_pixels=config.min_pixels,
            max_pixels=config.max_pixels, float_resize=args.float_resize,
        )
        return pixels, grid

    processor, theirs_name = fast_processor(config)
    theirs = None
    if processor is not None:
        import torch

        if args.float_resize:  # as the reference's training collate feeds its processor
            inputs = [torch.from_numpy(f.astype(np.float32) / np.float32(255)) for f in
                      frames.reshape(-1, *frames.shape[2:])]
            options = {"do_rescale": False}
        else:
            inputs = [torch.from_numpy(f) for f in frames.reshape(-1, *frames.shape[2:])]
            options = {}
        layout = "channels_last" if args.layout == "hwc" else "channels_first"

        def theirs():
            out = processor(images=inputs, return_tensors="pt", input_data_format=layout, **options)
            return out["pixel_values"].numpy(), out["image_grid_thw"].numpy()

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result

    first_ours, (pixels, grid) = timed(ours)
    first_theirs, reference = timed(theirs) if theirs else (None, None)
    for variant in (aligned_frames, separate_frames):
        assert np.array_equal(ours(variant)[0], pixels), "ours differs between the ways its frames are held"
    calls = {"ours": ours, "aligned": lambda: ours(aligned_frames), "separate": lambda: ours(separate_frames)}
    if theirs:
        calls["theirs"] = theirs
    steady = {name: [] for name in calls}
    faults = {name: [] for name in calls}
    for repeat in range(args.repeats):
        # The order turns every repeat: the call after theirs runs slower (some 30 ms for ours on
        # plain frames), so each variant takes each place in turn.
        names = list(calls)[repeat % len(calls):] + list(calls)[:repeat % len(calls)]
        for name in names:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            steady[name].append(timed(calls[name])[0])
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    steady_ours, steady_aligned, steady_separate = steady["ours"], steady["aligned"], steady["separate"]
    steady_theirs = steady.get("theirs")

    report = {
        "input": f"{args.cameras * args.frames} x {args.height} x {args.width} uint8 ({args.layout})",
        "path": "float (training)" if args.float_resize else "uint8 (inference)",
        "output": list(pixels.shape),
        "jax_backend": jax.default_backend(),
        "ours_first_s": round(first_ours, 4),
        "ours_steady_median_s": round(statistics.median(steady_ours), 4),
        "ours_steady_min_s": round(min(steady_ours), 4),
        "ours_aligned_frames_median_s": round(statistics.median(steady_aligned), 4),
        "ours_aligned_frames_min_s": round(min(steady_aligned), 4),
        "ours_separate_frames_median_s": round(statistics.median(steady_separate), 4),
        "ours_page_faults_per_call": statistics.median(faults["ours"]),
        "compiled_programs": image._program._cache_size(),  # resize, normalisation and patches: one program
    }
    if theirs:
        their_pixels, their_grid = reference
        report.update({
            "theirs": theirs_name,
            "theirs_first_s": round(first_theirs, 4),
            "theirs_steady_median_s": round(statistics.median(steady_theirs), 4),
            "theirs_steady_min_s": round(min(steady_theirs), 4),
            "theirs_page_faults_per_call": statistics.median(faults["theirs"]),
            "speedup_median": round(statistics.median(steady_theirs) / statistics.median(steady_ours), 2),
            "speedup_median_aligned_frames": round(
                statistics.median(steady_theirs) / statistics.median(steady_aligned), 2),
            "speedup_median_separate_frames": round(
                statistics.median(steady_theirs) / statistics.median(steady_separate), 2),
            "same_grid": bool(np.array_equal(grid, their_grid)),
            "max_abs_difference": float(np.abs(pixels - their_pixels).max())
            if pixels.shape == their_pixels.shape else None,
        })
    else:
        report["theirs"] = f"not run: {theirs_name}"

    if args.json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key:24s} {value}")


if __name__ == "__main__":
    main()
