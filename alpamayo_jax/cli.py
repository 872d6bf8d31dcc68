"""Command line: `alpamayo-jax demo | infer | batch | convert | export | verify`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _run_pipeline(pipeline, args, *, clip=None, inputs=None) -> dict:
    """Runs the pipeline on a clip or precomputed inputs; returns the JSON-ready result."""
    import jax
    import numpy as np

    from alpamayo_jax.inference.batch import result_record
    from alpamayo_jax.inference.pipeline import fuse_precomputed, sample_from_inputs, sample_trajectories

    options = dict(num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
                   greedy=args.greedy, max_new_tokens=args.max_new_tokens, num_flow_steps=args.num_flow_steps,
                   noise=None if args.noise is None else np.load(args.noise))
    key = jax.random.key(args.seed)
    if inputs is not None:
        fused = fuse_precomputed(pipeline, inputs.input_ids, inputs.ego_history_xyz, inputs.ego_history_rot)
        samples = sample_from_inputs(pipeline, fused, inputs.pixel_values, inputs.image_grid_thw,
                                     inputs.ego_history_xyz[None], inputs.ego_history_rot[None], key, **options)
        history = inputs.ego_history_xyz
    else:
        samples = sample_trajectories(pipeline, clip, key, **options)
        history = clip.ego_history_xyz
    result = result_record(samples, 0)
    if args.plot:
        from alpamayo_jax.plot import plot_trajectories

        plot_trajectories(args.plot, history, samples.xyz[0], title="alpamayo-jax")
    return result


def _summary(result: dict) -> str:
    lines = []
    for index, (xyz, cot) in enumerate(zip(result["xyz"], result["cot"], strict=True)):
        end = xyz[-1]
        lines.append(f"sample {index}: CoC {cot!r}; after 6.4 s at x={end[0]:.2f} m, y={end[1]:.2f} m; "
                     f"{len(result['generated_token_ids'][index])} tokens generated")
    lines.append("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result["timings"].items()))
    return "\n".join(lines)


def _load_pipeline(args: argparse.Namespace):
    """The pipeline of --model/--processor-dir/--dtype, on --mesh after --distributed start-up."""
    from alpamayo_jax.inference.pipeline import Pipeline
    from alpamayo_jax.sharding import make_mesh, start_distributed

    manual = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in manual) and any(v is None for v in manual):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if args.distributed or args.coordinator is not None:
        start_distributed(*manual)
    mesh = None if args.mesh is None else make_mesh(args.mesh)
    return Pipeline.load(args.model, dtype=args.dtype, processor_dir=args.processor_dir, mesh=mesh)


def _infer(args: argparse.Namespace) -> int:
    """Model + clip (or precomputed inputs) -> trajectories, actions, tokens and CoC text as JSON."""
    from alpamayo_jax.inference.batch import write_result
    from alpamayo_jax.processing.clip import load_clip, load_model_inputs

    if (args.clip is None) == (args.inputs is None):
        raise ValueError("pass exactly one of --clip and --inputs")
    clip = None if args.clip is None else load_clip(args.clip)
    inputs = None if args.inputs is None else load_model_inputs(args.inputs)
    pipeline = _load_pipeline(args)
    result = _run_pipeline(pipeline, args, clip=clip, inputs=inputs)
    write_result(args.out, result)
    print(_summary(result))
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _batch(args: argparse.Namespace) -> int:
    """Model + many clips -> one result JSON per clip, batches split over the mesh's data axis."""
    import jax
    from tqdm import tqdm

    from alpamayo_jax.inference.batch import clip_paths, run_clips

    paths = clip_paths(args.clips)
    pipeline = _load_pipeline(args)
    with tqdm(total=len(paths), unit="clip", disable=args.quiet or jax.process_index() != 0) as bar:
        def progress(path, status):
            bar.update(1)
            bar.set_postfix_str(f"{path.stem}: {status}", refresh=False)

        summary = run_clips(pipeline, paths, args.out_dir, jax.random.key(args.seed), batch_size=args.batch_size,
                            overwrite=args.overwrite, plots=args.plots, on_clip=progress,
                            num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
                            greedy=args.greedy, max_new_tokens=args.max_new_tokens,
                            num_flow_steps=args.num_flow_steps)
    print(f"{len(summary.written)} clips written, {len(summary.skipped)} skipped (results exist), "
          f"{len(summary.failed)} failed -> {args.out_dir}")
    for path, why in summary.failed.items():
        print(f"  failed {path}: {why}", file=sys.stderr)
    return 1 if summary.failed else 0


def _demo(args: argparse.Namespace) -> int:
    """The embedded tiny model (NVIDIA's tiny random-weight reference checkpoint, shipped with the
    package) on a synthetic clip: no network, no arguments needed."""
    from importlib import resources

    from alpamayo_jax.inference.pipeline import Pipeline
    from alpamayo_jax.processing.clip import synthetic_clip

    tiny = resources.files("alpamayo_jax.tiny_model")
    pipeline = Pipeline.load(tiny / "hf", processor_dir=tiny / "vlm")
    clip = synthetic_clip(args.seed, image_size=(32, 48))
    result = _run_pipeline(pipeline, args, clip=clip)
    print("tiny Alpamayo-R1 (random weights, so the text is gibberish) on a synthetic clip")
    print(_summary(result))
    print(f"wrote {args.plot}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    """Hugging Face checkpoint -> bundle, with a progress bar over tensors and bytes."""
    from tqdm import tqdm

    from alpamayo_jax.io.convert import convert_checkpoint
    from alpamayo_jax.io.safetensors import CheckpointReader

    stored = CheckpointReader(args.hf_dir)
    with tqdm(total=stored.total_bytes, unit="B", unit_scale=True, desc="tensors", disable=args.quiet) as bar:
        def progress(item, source):
            bar.update(stored.tensors[item.key].nbytes)  # stored bytes (`source` may be cast)
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
    def sampling_options(command, *, max_new_tokens: int, noise: bool = True):
        if noise:
            command.add_argument("--noise", type=Path, help="initial flow noise .npy (num_samples, 64, 2) float32")
        command.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
        command.add_argument("--num-samples", type=int, default=1)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--temperature", type=float, default=0.6)
        command.add_argument("--top-p", type=float, default=0.98)
        command.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
        command.add_argument("--num-flow-steps", type=int, default=10)

    demo = commands.add_parser("demo", help="run the embedded tiny model on a synthetic clip (no downloads)")
    sampling_options(demo, max_new_tokens=32)
    demo.add_argument("--plot", type=Path, default=Path("alpamayo_demo.png"), help="bird's-eye-view PNG")
    demo.set_defaults(run=_demo)

    def model_options(command):
        command.add_argument("--model", type=_existing_dir, required=True, help="bundle or Hugging Face directory")
        command.add_argument("--processor-dir", type=_existing_dir,
                             help="tokenizer/template for a Hugging Face --model")
        command.add_argument("--dtype", choices=["float32", "bfloat16"], help="parameter dtype (default: as stored)")
        command.add_argument("--mesh", help="device mesh: a preset (single, model2, data8, data2_model4, ...) or "
                                            "DATAxMODEL; default: no mesh (one device)")
        command.add_argument("--distributed", action="store_true",
                             help="join a multi-host run first (jax.distributed; SLURM, Open MPI, ... detected)")
        command.add_argument("--coordinator", help="multi-host run without a detected cluster: HOST:PORT of process 0")
        command.add_argument("--num-processes", type=int, help="with --coordinator: number of processes")
        command.add_argument("--process-id", type=int, help="with --coordinator: this process's index")

    infer = commands.add_parser("infer", help="trajectories and Chain-of-Causation text for a clip")
    model_options(infer)
    infer.add_argument("--clip", type=Path, help="clip .npz (see alpamayo_jax.processing.clip)")
    infer.add_argument("--inputs", type=Path, help="precomputed model inputs .safetensors (instead of --clip)")
    infer.add_argument("--out", type=Path, required=True, help="result JSON")
    infer.add_argument("--plot", type=Path, help="bird's-eye-view PNG")
    sampling_options(infer, max_new_tokens=256)
    infer.set_defaults(run=_infer)

    batch = commands.add_parser("batch", help="run many clips, one result JSON per clip")
    model_options(batch)
    batch.add_argument("--clips", type=Path, required=True,
                       help="directory of clip .npz files, or a text file listing them one per line")
    batch.add_argument("--out-dir", type=Path, required=True, help="directory for <clip name>.json results")
    batch.add_argument("--batch-size", type=int, help="clips per batch (default: the mesh's data axis size)")
    batch.add_argument("--overwrite", action="store_true", help="recompute clips whose result file exists")
    batch.add_argument("--plots", action="store_true", help="also write <clip name>.png")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    sampling_options(batch, max_new_tokens=256, noise=False)
    batch.set_defaults(run=_batch)

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
