"""`alpamayo-jax warmup`: compiles the programs a deployment will run into the persistent
compilation cache, so that its first `infer`, `batch` or `serve` request loads them instead.

    alpamayo-jax warmup --model bundle/ --image-size 1080x1920 --num-samples 6 --batch-size 1 --batch-size 4

One inference on synthetic clips (`alpamayo_jax.processing.synthetic`) per requested shape: every
--image-size (frame height x width; sizes of one aspect ratio give the same model inputs) with
every --batch-size (clips per call), under the run settings of the sampling flags. The programs
depend on everything that shapes them: image size, clips, --num-samples, --max-new-tokens,
--num-flow-steps, the sampling flags (greedy, temperature, top-p, top-k), --dtype and --mesh.
So warm up with the flags the deployment uses; the seed does not matter. `infer --noise` (given
flow noise) and the per-clip keys of `evaluate` (--per-clip-keys here) are variants of their own.

`add_arguments(parser)` declares the warm-up's own flags; `alpamayo_jax.cli` adds the model,
cache and sampling flags of `infer` to the same parser. `main(args) -> int` reports, per shape,
the programs compiled and those loaded from the cache, with the seconds.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import time

from alpamayo_jax.serving.command import DEFAULT_WARMUP_SIZE, _warmup_size


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The warm-up's own flags (the model, cache and sampling ones are `infer`'s)."""
    parser.add_argument("--image-size", type=_warmup_size, action="append", metavar="HxW",
                        help=f"camera frame size, repeatable (default: {DEFAULT_WARMUP_SIZE})")
    parser.add_argument("--batch-size", type=int, action="append", metavar="C",
                        help="clips per call, repeatable (default: 1; `batch` and `evaluate` run "
                             "--batch-size clips per call, and their last batch may be smaller)")
    parser.add_argument("--per-clip-keys", action="store_true",
                        help="one PRNG key per clip, as `evaluate` draws (default: one key per call, as "
                             "`infer`, `batch` and `serve`)")


def main(args: argparse.Namespace) -> int:
    """Loads the model, runs one inference per requested shape, prints what each compiled."""
    import jax

    from alpamayo_jax import cli
    from alpamayo_jax.compilation_cache import count_compilations
    from alpamayo_jax.inference.pipeline import sample_trajectories
    from alpamayo_jax.inference.sampling import seed_key, seed_keys
    from alpamayo_jax.processing.synthetic import synthetic_clip

    sizes = args.image_size or [_warmup_size(DEFAULT_WARMUP_SIZE)]
    batch_sizes = args.batch_size or [1]
    if min(batch_sizes) < 1:
        raise ValueError(f"--batch-size must be >= 1, got {min(batch_sizes)}")
    _, settings = cli._checked_model(args)
    began = time.perf_counter()
    pipeline = cli._load_pipeline(args)
    cache_dir = jax.config.jax_compilation_cache_dir
    print(f"model loaded in {time.perf_counter() - began:.1f} s; compilation cache: "
          + (cache_dir or "off (the programs are compiled, but not kept for later processes)"))
    total = {"compiled": 0, "loaded": 0}
    for (height, width), clips in itertools.product(sizes, batch_sizes):
        batch = [synthetic_clip(index, image_size=(height, width)) for index in range(clips)]
        start = time.perf_counter()
        with count_compilations() as count:
            key = seed_keys([args.seed] * clips) if args.per_clip_keys else seed_key(args.seed)
            samples = sample_trajectories(pipeline, batch, key, settings)
        seconds = time.perf_counter() - start
        total["compiled"] += len(count.compiled)
        total["loaded"] += len(count.loaded)
        stages = ", ".join(f"{stage} {value:.2f}" for stage, value in samples.timings.items())
        print(f"{height}x{width}, {_plural(clips, 'clip')} x {_plural(settings.num_samples, 'sample')}: "
              f"{len(count.compiled)} programs compiled, {len(count.loaded)} loaded from the cache, "
              f"{count.seconds:.1f} s of it compiling or loading, {seconds:.1f} s in all ({stages})")
        if count.compiled:
            names = collections.Counter(count.compiled)
            print("  compiled: " + ", ".join(name if n == 1 else f"{name} x{n}" for name, n in names.items()))
    print(f"warm-up done in {time.perf_counter() - began:.1f} s: {total['compiled']} programs compiled, "
          f"{total['loaded']} loaded from the cache")
    return 0
