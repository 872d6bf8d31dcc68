"""Command line: `alpamayo-jax demo | convert | export | verify`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    """Runs the tiny-preset language model: a prompt prefill, then greedy decoding with the static
    KV cache, both jitted. Weights are random (seeded); the full pipeline replaces this later."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from alpamayo_jax.config import tiny
    from alpamayo_jax.models.text import CausalLM

    config = tiny().text
    model = CausalLM(config, rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, cache):
        out = nnx.merge(graphdef, state)(ids, cache=cache, last_logits_only=True)
        return jnp.argmax(out.logits[:, -1], axis=-1), out.cache

    prompt = jax.random.randint(jax.random.key(args.seed), (1, args.prompt_length), 0, config.vocab_size)
    cache = model.init_cache(1, args.prompt_length + args.new_tokens)
    start = time.perf_counter()
    token, cache = forward(state, prompt, cache)
    tokens = [int(token[0])]
    for _ in range(args.new_tokens - 1):
        token, cache = forward(state, token[:, None], cache)
        tokens.append(int(token[0]))
    elapsed = time.perf_counter() - start
    print(f"tiny language model ({config.num_hidden_layers} layers, width {config.hidden_size}, "
          f"vocab {config.vocab_size}), random weights, seed {args.seed}")
    print(f"prompt of {args.prompt_length} random tokens -> {args.new_tokens} greedy tokens: {tokens}")
    print(f"KV cache: {int(cache.length)} of {cache.capacity} slots filled; "
          f"{elapsed:.2f} s including compilation")
    return 0


def _convert(args: argparse.Namespace) -> int:
    """Hugging Face checkpoint -> bundle, with a progress bar over tensors and bytes."""
    from tqdm import tqdm

    from alpamayo_jax.io.convert import convert_checkpoint
    from alpamayo_jax.io.safetensors import CheckpointReader

    total_bytes = CheckpointReader(args.hf_dir).total_bytes
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tensors", disable=args.quiet) as bar:
        def progress(item, source):
            bar.update(source.nbytes)
            bar.set_postfix_str(item.key[-48:], refresh=False)

        report = convert_checkpoint(args.hf_dir, args.processor_dir, args.out, dtype=args.dtype,
                                    force=args.force, on_tensor=progress)
    print(f"converted {report['num_tensors']} tensors, {report['num_parameters']:,} parameters "
          f"({report['dtype']}) in {report['seconds']:.1f} s -> {args.out}")
    for name, count in report["parameters_per_module"].items():
        print(f"  {name:22s} {count:>16,}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """Bundle -> Hugging Face safetensors with the reference's key names."""
    import json

    from alpamayo_jax.io.bundle import CONFIG_FILE, load_bundle
    from alpamayo_jax.io.hf import save_hf_checkpoint

    model, _ = load_bundle(args.model, dtype=args.dtype)
    config = json.loads((args.model / CONFIG_FILE).read_text())
    out = save_hf_checkpoint(model, args.out, config)
    print(f"exported to {out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Bundle vs a PyTorch reference built from the same checkpoint; non-zero exit above tolerance."""
    try:
        from alpamayo_reference.verify import format_report, report_json, verify
    except ImportError as error:
        print(f"alpamayo-jax verify needs the PyTorch reference (pip install -e '.[test]'): {error}",
              file=sys.stderr)
        return 2
    errors = verify(args.model, args.hf_dir, processor_dir=args.processor_dir, seed=args.seed,
                    tolerance=args.tolerance)
    print(format_report(errors))
    if args.json:
        args.json.write_text(report_json(errors) + "\n")
    failed = [e.stage for e in errors if not e.ok]
    print("verification " + ("FAILED: " + ", ".join(failed) if failed else "passed"))
    return 1 if failed else 0


def _existing_dir(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is not a directory")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alpamayo-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the embedded tiny model (no downloads)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--prompt-length", type=int, default=16)
    demo.add_argument("--new-tokens", type=int, default=8)
    demo.set_defaults(run=_demo)

    dtypes = ["bfloat16", "float32"]
    convert = commands.add_parser("convert", help="convert a Hugging Face checkpoint into a bundle")
    convert.add_argument("--hf-dir", type=_existing_dir, required=True, help="Alpamayo-R1 checkpoint directory")
    convert.add_argument("--processor-dir", type=_existing_dir, required=True,
                         help="backbone processor directory: tokenizer, chat template, image settings")
    convert.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    convert.add_argument("--dtype", choices=dtypes, help="parameter dtype (default: the checkpoint's)")
    convert.add_argument("--force", action="store_true", help="replace an existing --out")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(run=_convert)

    export = commands.add_parser("export", help="write a bundle back as Hugging Face safetensors")
    export.add_argument("--model", type=_existing_dir, required=True, help="bundle directory")
    export.add_argument("--out", type=Path, required=True, help="directory to create")
    export.add_argument("--dtype", choices=dtypes, help="parameter dtype (default: as stored)")
    export.set_defaults(run=_export)

    verify = commands.add_parser("verify", help="compare a bundle with the PyTorch reference, stage by stage")
    verify.add_argument("--model", type=_existing_dir, required=True, help="bundle (or Hugging Face) directory")
    verify.add_argument("--hf-dir", type=_existing_dir, required=True, help="the source checkpoint directory")
    verify.add_argument("--processor-dir", type=_existing_dir, help="backbone config directory if not a preset")
    verify.add_argument("--tolerance", type=float, default=1e-4, help="max relative error per stage")
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--json", type=Path, help="also write the errors as JSON here")
    verify.set_defaults(run=_verify)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        # Validation errors already say what is wrong and where; a traceback adds nothing.
        print(f"alpamayo-jax {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
