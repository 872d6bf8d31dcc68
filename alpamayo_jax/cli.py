"""Command line: `alpamayo-jax demo | infer | batch | evaluate | train | loss | make-dataset | convert | export |
verify | serve | warmup`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MAX_SEED = 2**32 - 1  # JAX keeps 32 bits of an integer seed: larger seeds would collide silently


def _output_file(path: Path | None, flag: str) -> Path | None:
    """A file the command will write: not a directory, in a directory that exists. Checked before
    any work, so that minutes of inference are never lost to a bad path."""
    if path is None:
        return None
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; name a file")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: directory {path.parent} does not exist")
    return path


def _seed(value: str) -> int:
    try:
        seed = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0 .. {MAX_SEED} (2**32 - 1), got {seed}")
    return seed


def _settings(args: argparse.Namespace, config):
    """The run's `InferenceConfig`: the flags given, the checkpoint's values for the rest."""
    from alpamayo_jax.inference.inference_config import InferenceConfig

    return InferenceConfig.from_model(config, num_samples=args.num_samples, greedy=args.greedy,
                                      temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                      max_new_tokens=args.max_new_tokens, num_flow_steps=args.num_flow_steps)


def _load_noise(path: Path | None, rows: int, waypoints: int):
    """Initial flow noise from a `.npy` file (`np.save`), checked against the run's shape."""
    if path is None:
        return None
    from alpamayo_jax.inference.pipeline import check_noise

    noise = _read_npy(path, "--noise", "noise")
    try:
        return check_noise(noise, rows, waypoints)
    except ValueError as error:
        raise ValueError(f"--noise {path}: {error}") from None


def _summary(result: dict) -> str:
    lines = []
    for index, (xyz, cot) in enumerate(zip(result["xyz"], result["cot"], strict=True)):
        end = xyz[-1]
        lines.append(f"sample {index}: CoC {cot!r}; after 6.4 s at x={end[0]:.2f} m, y={end[1]:.2f} m; "
                     f"{result['num_generated_tokens'][index]} tokens generated")
    lines.append("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in result["timings"].items()))
    return "\n".join(lines)


def _load_pipeline(args: argparse.Namespace):
    """The pipeline of --model/--processor-dir/--dtype, on --mesh after --distributed start-up."""
    from alpamayo_jax.inference.pipeline import Pipeline
    from alpamayo_jax.sharding import make_mesh, mesh_shape, start_distributed

    manual = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in manual) and any(v is None for v in manual):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if args.mesh is not None:
        mesh_shape(args.mesh)  # a bad name fails before the distributed start-up
    if args.distributed or args.coordinator is not None:
        start_distributed(*manual)
    mesh = None if args.mesh is None else make_mesh(args.mesh)
    return Pipeline.load(args.model, dtype=args.dtype, processor_dir=args.processor_dir, mesh=mesh)


def _checked_model(args: argparse.Namespace):
    """The model config and run settings, checked before anything heavy is loaded."""
    from alpamayo_jax.io.load import load_config

    config = load_config(args.model, processor_dir=args.processor_dir)
    return config, _settings(args, config)


def _run(pipeline, settings, args, *, noise, clip=None, inputs=None, model_name: str) -> dict:
    """Runs the pipeline on a clip or recorded inputs; writes --out (and --plot); returns the
    JSON-ready result."""
    from alpamayo_jax.inference.batch import result_record, write_result
    from alpamayo_jax.inference.pipeline import sample_from_inputs, sample_trajectories
    from alpamayo_jax.inference.sampling import seed_key
    from alpamayo_jax.processing.model_inputs import inputs_from_recorded

    key = seed_key(args.seed)
    if inputs is not None:
        samples = sample_from_inputs(pipeline, inputs_from_recorded(inputs, pipeline.config), key, settings,
                                     noise=noise)
        history = inputs.ego_history_xyz
    else:
        samples = sample_trajectories(pipeline, clip, key, settings, noise=noise)
        history = clip.ego_history_xyz
    result = result_record(samples, 0, settings=settings, model=model_name, seed=args.seed)
    write_result(args.out, result)  # before the picture: a failed plot must not lose the result
    if args.plot:
        from alpamayo_jax.evaluation.plots import plot_bird_eye_view, save_figure

        truth = None if clip is None else clip.ego_future_xyz
        save_figure(plot_bird_eye_view(history, samples.xyz[0], ground_truth_xyz=truth, title="alpamayo-jax"),
                    args.plot)
    return result


def _infer(args: argparse.Namespace) -> int:
    """Model + clip (or recorded inputs) -> trajectories, actions, tokens and CoC text as JSON."""
    from alpamayo_jax.processing.clip_file import load_clip
    from alpamayo_jax.processing.recorded_inputs import load_recorded_inputs

    if (args.clip is None) == (args.inputs is None):
        raise ValueError("pass exactly one of --clip and --inputs")
    _output_file(args.out, "--out")
    _output_file(args.plot, "--plot")
    config, settings = _checked_model(args)
    clip = None if args.clip is None else load_clip(args.clip)
    inputs = None if args.inputs is None else load_recorded_inputs(args.inputs)
    noise = _load_noise(args.noise, settings.num_samples, config.n_waypoints)
    pipeline = _load_pipeline(args)
    result = _run(pipeline, settings, args, noise=noise, clip=clip, inputs=inputs, model_name=str(args.model))
    print(_summary(result))
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _batch(args: argparse.Namespace) -> int:
    """Model + many clips -> one result JSON per clip, batches split over the mesh's data axis."""
    import jax
    from tqdm import tqdm

    from alpamayo_jax.inference.batch import clip_paths, run_clips
    from alpamayo_jax.inference.sampling import seed_key

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ValueError(f"--out-dir {args.out_dir} exists and is not a directory")
    paths = clip_paths(args.clips)
    _, settings = _checked_model(args)
    pipeline = _load_pipeline(args)
    with tqdm(total=len(paths), unit="clip", disable=args.quiet or jax.process_index() != 0) as bar:
        def progress(path, status):
            bar.update(1)
            bar.set_postfix_str(f"{path.stem}: {status}", refresh=False)

        summary = run_clips(pipeline, paths, args.out_dir, seed_key(args.seed), settings,
                            batch_size=args.batch_size, overwrite=args.overwrite, plots=args.plots,
                            on_clip=progress, provenance={"model": str(args.model), "seed": args.seed})
    print(f"{len(summary.written)} clips written, {len(summary.skipped)} skipped (results exist), "
          f"{len(summary.failed)} failed -> {args.out_dir}")
    for why in summary.failed.values():
        print(f"  failed: {why}", file=sys.stderr)
    return 1 if summary.failed else 0


def _evaluate(args: argparse.Namespace) -> int:
    """Model + clips with ground truth -> per-clip results and the reference's metrics."""
    import jax
    from tqdm import tqdm

    from alpamayo_jax.evaluation.evaluate import evaluate, open_source, read_clip_list

    if args.score_only == (args.model is not None):
        raise ValueError("pass --model to run the clips, or --score-only to score the results in --out-dir")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out_dir.exists() and not args.out_dir.is_dir():
        raise ValueError(f"--out-dir {args.out_dir} exists and is not a directory")
    if args.score_only and not args.out_dir.is_dir():
        raise FileNotFoundError(f"--score-only: no results directory {args.out_dir}")
    t0 = int(args.t0) if args.t0.lstrip("-").isdigit() else args.t0
    source = open_source(args.data, None if args.clips is None else read_clip_list(args.clips), t0=t0)
    pipeline = settings = None
    if not args.score_only:
        _, settings = _checked_model(args)
        pipeline = _load_pipeline(args)
    minimum = []
    with tqdm(total=len(source), unit="clip", disable=args.quiet or jax.process_index() != 0) as bar:
        def progress(name, metrics):
            if metrics is None:
                bar.set_postfix_str(f"{name}: failed", refresh=False)
                return
            bar.update(1)
            minimum.append(metrics["min_ade"])
            bar.set_postfix(min_ade=f"{sum(minimum) / len(minimum):.3f}", refresh=False)

        report = evaluate(source, args.out_dir, pipeline=pipeline, settings=settings, seed=args.seed,
                          batch_size=args.batch_size, plots=args.plots, on_clip=progress,
                          provenance={"model": None if args.model is None else str(args.model),
                                      "data": str(args.data)})
    mean = report["mean"]
    print(f"{report['num_clips']} clips scored, {report['num_failed']} failed -> {args.out_dir}")
    if mean:
        print("  " + ", ".join(f"{key} {mean[key]:.4f}" for key in ("min_ade", "ade", "fde", "corner_distance")))
    for why in report["failed"].values():
        print(f"  failed: {why}", file=sys.stderr)
    return 1 if report["num_failed"] else 0


def _demo(args: argparse.Namespace) -> int:
    """The embedded demo model (the reference fixture's tiny architecture, trained by alpamayo-jax
    on synthetic driving scenes: scripts/make_demo_model.py) on a new synthetic scene: no
    network, no arguments needed."""
    from importlib import resources

    from alpamayo_jax.data.driving_scenes import KINDS, driving_scene
    from alpamayo_jax.inference.pipeline import Pipeline

    _output_file(args.plot, "--plot")
    _output_file(args.out, "--out")
    args.model, args.processor_dir = Path(str(resources.files("alpamayo_jax") / "demo_model")), None
    config, settings = _checked_model(args)
    noise = _load_noise(args.noise, settings.num_samples, config.n_waypoints)
    pipeline = Pipeline.load(args.model)
    kind = KINDS[args.seed % len(KINDS)]
    clip = driving_scene(kind, DEMO_SCENE_SEED + args.seed)  # scenes the model was not trained on
    result = _run(pipeline, settings, args, noise=noise, clip=clip, model_name="embedded demo model")
    print(f"tiny Alpamayo-R1 trained by alpamayo-jax on synthetic scenes; a new {kind!r} scene "
          f"(the scene's own explanation: {clip.cot!r})")
    print(_summary(result))
    print(f"wrote {args.out} and {args.plot}")
    return 0


DEMO_SCENE_SEED = 1_000_000  # far from the seeds the demo model's training scenes were drawn from


def _stage(args: argparse.Namespace) -> None:
    """Checks the stage-specific training options and fills in the stage's defaults."""
    if args.stage == 1:
        if args.expert_attention is not None:
            raise ValueError("--expert-attention is stage 2's (the action expert); stage 1 trains the VLM")
    elif args.expert_attention is None:
        args.expert_attention = "default"


def _train(args: argparse.Namespace) -> int:
    """Model + clips with ground truth -> a run directory (checkpoints, metrics.jsonl) of stage 1
    (the VLM) or stage 2 (the action expert) and, with --export, a bundle of the trained model."""
    import jax
    from tqdm import tqdm

    from alpamayo_jax.data.physical_ai_av import is_dataset_root
    from alpamayo_jax.inference.batch import clip_paths
    from alpamayo_jax.inference.sampling import seed_key
    from alpamayo_jax.io.convert import save_model_bundle
    from alpamayo_jax.sharding import FSDP_RULES, LOGICAL_RULES
    from alpamayo_jax.training.data import load_training_clips
    from alpamayo_jax.training.optimizer import OptimizerConfig
    from alpamayo_jax.training.trainer import Trainer, train, trained_model

    _stage(args)
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--save-every", args.save_every),
                        ("--keep", args.keep)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.gradient_accumulation is not None and args.gradient_accumulation < 1:
        raise ValueError(f"--gradient-accumulation must be >= 1, got {args.gradient_accumulation}")
    if args.export is not None and args.export.exists():
        raise FileExistsError(f"--export {args.export} already exists")
    if args.fsdp and args.mesh is None:
        raise ValueError("--fsdp shards over a mesh: pass --mesh too")
    overrides = {name: value for name, value in (("learning_rate", args.lr), ("warmup_steps", args.warmup),
                                                 ("gradient_accumulation_steps", args.gradient_accumulation))
                 if value is not None}
    optimizer = OptimizerConfig.for_stage(args.stage, args.steps, **overrides)
    # The loop counts micro-batches: k of them per optimizer step.
    accumulation = optimizer.gradient_accumulation_steps
    if is_dataset_root(args.data):  # its clips at the default keyframe, 5.1 s
        from alpamayo_jax.data.iterator import DatasetSource

        clips = load_training_clips(DatasetSource(args.data))  # every clip checked before the model loads
    else:
        clips = load_training_clips(clip_paths(args.data))
    pipeline = _load_pipeline(args)
    trainer, state = Trainer.create(pipeline.model, optimizer, seed_key(args.seed), stage=args.stage,
                                    expert_attention=args.expert_attention or "default", mesh=pipeline.mesh,
                                    rules=FSDP_RULES if args.fsdp else LOGICAL_RULES, remat=args.remat)
    micro_steps = args.steps * accumulation
    with tqdm(total=micro_steps, unit="step", disable=args.quiet or jax.process_index() != 0) as bar:
        def progress(step, record):
            bar.n = step
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}", refresh=True)

        result = train(trainer, state, clips, split=pipeline.split, tokenizer=pipeline.tokenizer,
                       chat_template=pipeline.chat_template, run_dir=args.out, steps=micro_steps,
                       batch_size=args.batch_size, seed=args.seed, save_every=args.save_every * accumulation,
                       keep=args.keep, resume=args.resume, on_step=progress)
    steps_run = len(result.losses)
    batches = "" if accumulation == 1 else f" (batches; {accumulation} per optimizer step)"
    print(f"{steps_run} steps{batches} in {result.seconds:.1f} s ({steps_run / max(result.seconds, 1e-9):.2f} "
          f"steps/s), last loss {result.losses[-1]:.4f} -> {args.out}" if steps_run else
          f"nothing to do: {args.out} is at step {int(result.state.step)}")
    if args.export is not None:
        provenance = {"stage": args.stage, "run_dir": str(args.out.absolute()), "step": int(result.state.step),
                      "seed": args.seed, "gradient_accumulation": accumulation}
        if args.stage == 2:
            provenance["expert_attention"] = args.expert_attention
        save_model_bundle(trained_model(trainer, result.state), args.model, args.export,
                          processor_dir=args.processor_dir, provenance=provenance)
        print(f"exported the trained model to {args.export} (a bundle; `export` writes Hugging Face safetensors)")
    return 0


def _loss(args: argparse.Namespace) -> int:
    """One forward/backward on examples in file order: the loss (stage 1 also its two terms) and the
    gradient of every parameter the stage trains."""
    import jax.numpy as jnp
    import numpy as np

    from alpamayo_jax.inference.pipeline import Pipeline
    from alpamayo_jax.io.safetensors import write_safetensors
    from alpamayo_jax.processing.collate import collate
    from alpamayo_jax.training.data import check_cot_texts, load_training_clips
    from alpamayo_jax.training.stage1 import stage1_gradients
    from alpamayo_jax.training.stage2 import FlowDraw, fit_actions, stage2_gradients

    _stage(args)
    flow = {"--flow-timesteps": args.flow_timesteps, "--flow-noise": args.flow_noise}
    if args.stage == 1 and any(value is not None for value in flow.values()):
        raise ValueError("stage 1 has no flow matching: drop --flow-timesteps and --flow-noise")
    missing = [flag for flag, value in flow.items() if value is None]
    if args.stage == 2 and missing:
        raise ValueError(f"--stage 2 needs the flow-matching draws: pass {' and '.join(missing)}")
    _output_file(args.out, "--out")
    clips = load_training_clips(args.examples)
    if args.stage == 2:
        timesteps = _load_array(args.flow_timesteps, "--flow-timesteps", (len(clips),))
        noise = _load_array(args.flow_noise, "--flow-noise", None)
    pipeline = Pipeline.load(args.model, dtype=args.dtype, processor_dir=args.processor_dir)
    check_cot_texts(clips, pipeline.tokenizer)
    batch = collate(clips, tokenizer=pipeline.tokenizer, chat_template=pipeline.chat_template, config=pipeline.config)
    if args.stage == 1:
        terms, grads = stage1_gradients(pipeline.model, batch.fused_inputs(), batch.labels())
        tensors = {name: np.asarray(value, np.float32) for name, value in terms.items()}
        loss = terms["loss"]
        detail = f" (future_traj {terms['loss.future_traj']:.6f} + others {terms['loss.others']:.6f})"
    else:
        waypoints = pipeline.config.n_waypoints
        if noise.shape != (len(clips), waypoints, 2):
            raise ValueError(f"--flow-noise must be ({len(clips)}, {waypoints}, 2) for {len(clips)} examples, got "
                             f"{noise.shape}")
        actions = fit_actions(pipeline.split, batch.inputs, batch.ego_future_xyz, batch.ego_future_rot)
        loss, grads = stage2_gradients(pipeline.model, batch.inputs, actions, FlowDraw(jnp.asarray(timesteps),
                                       jnp.asarray(noise)), expert_attention=args.expert_attention)
        tensors, detail = {"loss": np.asarray(loss, np.float32)}, ""
    tensors.update({f"grad.{key}": value for key, value in grads.items()})
    write_safetensors(args.out, tensors)
    print(f"loss {loss:.6f}{detail}; {len(grads)} gradients -> {args.out}")
    return 0


def _read_npy(path: Path, flag: str, what: str):
    """The `what` array of a `.npy` file (`np.save`) given by `flag`; a clear error for anything else."""
    import zipfile

    import numpy as np

    if not path.is_file():
        raise FileNotFoundError(f"{flag} file not found: {path}")
    if zipfile.is_zipfile(path):
        raise ValueError(f"{flag} {path} is an .npz archive; save the {what} array alone with np.save (.npy)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{flag} {path} is not a readable .npy array ({error})") from None


def _load_array(path: Path, flag: str, shape: tuple[int, ...] | None):
    """A float32 .npy array of `shape` (any shape with None)."""
    import numpy as np

    array = _read_npy(path, flag, flag.removeprefix("--").replace("-", " "))
    if array.dtype.kind != "f" or not np.isfinite(array).all():
        raise ValueError(f"{flag} {path}: expected finite floating-point values, got {array.dtype}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{flag} {path}: expected shape {shape}, got {array.shape}")
    return array.astype(np.float32)


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

    if args.out.exists() and not args.force:
        raise FileExistsError(f"{args.out} already exists; pass --force to replace it")
    model, _ = load_bundle(args.model, dtype=args.dtype)
    config = json.loads((args.model / CONFIG_FILE).read_text())
    out = save_hf_checkpoint(model, args.out, config, force=args.force)
    print(f"exported to {out}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Bundle vs a PyTorch reference built from the same checkpoint (default), or with --stage 1|2
    one fine-tuning forward/backward through NVIDIA's training code and ours; non-zero exit above
    tolerance (2 when the reference cannot run)."""
    if args.stage in ("1", "2"):
        if args.dtype != "float32":
            print("alpamayo-jax verify: error: --dtype bfloat16 compares inference, not --stage 1|2", file=sys.stderr)
            return 2
        return _verify_training(args)
    if args.dtype == "bfloat16":
        return _verify_bfloat16(args)
    if args.hf_dir is None:
        print("alpamayo-jax verify: error: --hf-dir is required (the source checkpoint directory)", file=sys.stderr)
        return 2
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


def _verify_bfloat16(args: argparse.Namespace) -> int:
    """`verify --dtype bfloat16`: alpamayo-jax in bfloat16 and in float32 against the reference's
    bfloat16 autocast run of a Hugging Face checkpoint (transformers' modules, or with
    --reference-src NVIDIA's own AlpamayoR1); fails where bfloat16 is further from it than float32
    (bfloat16 is meant to reproduce the autocast run's arithmetic), in the language model by more
    than `LANGUAGE_MODEL_SLACK` times (`further_than_float32`)."""
    import dataclasses
    import json

    try:
        from alpamayo_reference.verify_bfloat16 import (
            format_precision_report,
            further_than_float32,
            verify_bfloat16,
        )
    except ImportError as error:
        print(f"alpamayo-jax verify needs the PyTorch reference (pip install -e '.[test]'): {error}",
              file=sys.stderr)
        return 2
    if args.reference_src is not None:  # NVIDIA's own AlpamayoR1 as the reference
        from alpamayo_reference.verify_training import ReferenceUnavailable, check_reference

        try:
            check_reference(args.reference_src)
        except ReferenceUnavailable as error:
            print(f"alpamayo-jax verify --dtype bfloat16: {error}", file=sys.stderr)
            return 2
        if args.processor_dir is None:
            print("alpamayo-jax verify: error: --reference-src needs --processor-dir (NVIDIA's model loads it)",
                  file=sys.stderr)
            return 2
    table = verify_bfloat16(args.hf_dir or args.model, processor_dir=args.processor_dir, seed=args.seed,
                            reference_src=args.reference_src)
    print(format_precision_report(table))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(row) for row in table], indent=2) + "\n")
    failed = further_than_float32(table)
    print("verification " + ("FAILED, bfloat16 further from the reference than float32: " + ", ".join(failed)
                             if failed else "passed"))
    return 1 if failed else 0


def _verify_training(args: argparse.Namespace) -> int:
    """`verify --stage 1|2`: per-tensor errors of the batch, the loss and every trainable gradient,
    NVIDIA's training code of that stage (--reference-src) vs ours, on the same clips (and, for
    stage 2, the same flow draws)."""
    command = f"alpamayo-jax verify --stage {args.stage}"
    required = [("--examples", args.examples), ("--processor-dir", args.processor_dir)]
    flow = [("--flow-timesteps", args.flow_timesteps), ("--flow-noise", args.flow_noise)]
    stage2_only = [*flow, ("--expert-attention", args.expert_attention), ("--actions", args.actions)]
    missing = [flag for flag, value in required + (flow if args.stage == "2" else []) if value is None]
    if missing:
        print(f"{command}: error: {', '.join(missing)} required", file=sys.stderr)
        return 2
    given = [flag for flag, value in stage2_only if value is not None]
    if args.stage == "1" and given:
        print(f"{command}: error: {', '.join(given)} only apply to --stage 2 (stage 1 has no flow matching)",
              file=sys.stderr)
        return 2
    _output_file(args.json, "--json")
    try:
        from alpamayo_reference.verify import format_report
        from alpamayo_reference.verify_training import (
            ReferenceUnavailable,
            check_reference,
            report_json,
            verify_stage1,
            verify_stage2,
        )
    except ImportError as error:
        print(f"alpamayo-jax verify needs the PyTorch reference (pip install -e '.[test]'): {error}",
              file=sys.stderr)
        return 2
    try:
        check_reference(args.reference_src)  # before any clip or model loads
    except ReferenceUnavailable as error:
        print(f"{command}: {error}", file=sys.stderr)
        return 2
    if args.stage == "1":
        report = verify_stage1(args.model, args.examples, processor_dir=args.processor_dir,
                               reference_src=args.reference_src, hf_dir=args.hf_dir, tolerance=args.tolerance)
    else:
        timesteps = _load_array(args.flow_timesteps, "--flow-timesteps", (len(args.examples),))
        noise = _load_array(args.flow_noise, "--flow-noise", None)
        report = verify_stage2(args.model, args.examples, processor_dir=args.processor_dir,
                               reference_src=args.reference_src, flow_timesteps=timesteps, flow_noise=noise,
                               expert_attention=args.expert_attention or "reference",
                               actions=args.actions or "reference", hf_dir=args.hf_dir, tolerance=args.tolerance)
    print(format_report(report.errors))
    for note in report.notes:
        print(f"note: {note}")
    if args.json:
        args.json.write_text(report_json(report) + "\n")
    failed = [e.stage for e in report.errors if not e.ok]
    print(f"verification {'FAILED: ' + str(len(failed)) + ' of ' + str(len(report.errors)) + ' tensors' if failed else 'passed'}")
    return 1 if failed else 0


def _existing_dir(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is not a directory")
    return path


def _cache_option(command) -> None:
    """--compilation-cache, read by `main` before the command runs (`alpamayo_jax.compilation_cache`)."""
    command.add_argument("--compilation-cache", metavar="DIR|off",
                         help="persistent compilation cache directory, or off (default: $ALPAMAYO_JAX_CACHE_DIR, "
                              "else $XDG_CACHE_HOME/alpamayo-jax/xla, i.e. ~/.cache/alpamayo-jax/xla)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alpamayo-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    def sampling_options(command, *, noise: bool = True, max_new_tokens: str = "the checkpoint's "
                         "tokens_per_future_traj"):
        if noise:
            command.add_argument("--noise", type=Path,
                                 help="initial flow noise: a .npy array (num_samples, waypoints, 2), float")
        command.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
        command.add_argument("--num-samples", type=int, help="trajectories per clip (default: 1)")
        command.add_argument("--seed", type=_seed, default=0, help="PRNG seed, 0 .. 2**32 - 1 (default: 0)")
        command.add_argument("--temperature", type=float, help="sampling temperature (default: the reference's 0.6)")
        command.add_argument("--top-p", type=float, help="nucleus sampling mass, 1 disables it "
                                                        "(default: the reference's 0.98)")
        command.add_argument("--top-k", type=int, help="keep the k most likely tokens, 0 disables it "
                                                      "(default: the reference's none)")
        command.add_argument("--max-new-tokens", type=int, help=f"reasoning token budget (default: {max_new_tokens})")
        command.add_argument("--num-flow-steps", type=int,
                             help="Euler steps of flow matching (default: the checkpoint's num_inference_steps)")

    demo = commands.add_parser("demo", help="run the embedded tiny model on a synthetic clip (no downloads)")
    sampling_options(demo)
    demo.add_argument("--plot", type=Path, default=Path("alpamayo_demo.png"), help="bird's-eye-view PNG")
    demo.add_argument("--out", type=Path, default=Path("alpamayo_demo.json"), help="result JSON")
    _cache_option(demo)
    demo.set_defaults(run=_demo, mesh=None, dtype=None)

    def model_options(command, *, parallel: bool = True, model_required: bool = True):
        command.add_argument("--model", type=_existing_dir, required=model_required,
                             help="bundle or Hugging Face directory")
        command.add_argument("--processor-dir", type=_existing_dir,
                             help="tokenizer/template for a Hugging Face --model")
        command.add_argument("--dtype", choices=["float32", "bfloat16"],
                             help="parameter dtype (default: as stored); bfloat16 computes as the "
                                  "reference's autocast does (alpamayo_jax/nn/precision.py)")
        _cache_option(command)
        if not parallel:
            return
        command.add_argument("--mesh", help="device mesh: a preset (single, model2, data8, data2_model4, ...) or "
                                            "DATAxMODEL; default: no mesh (one device)")
        command.add_argument("--distributed", action="store_true",
                             help="join a multi-host run first (jax.distributed; SLURM, Open MPI, ... detected)")
        command.add_argument("--coordinator", help="multi-host run without a detected cluster: HOST:PORT of process 0")
        command.add_argument("--num-processes", type=int, help="with --coordinator: number of processes")
        command.add_argument("--process-id", type=int, help="with --coordinator: this process's index")

    infer = commands.add_parser("infer", help="trajectories and Chain-of-Causation text for a clip")
    model_options(infer)
    infer.add_argument("--clip", type=Path, help="clip .npz (format: alpamayo_jax.processing.clip_file)")
    infer.add_argument("--inputs", type=Path, help="recorded model inputs .safetensors (alpamayo_jax.processing.recorded_inputs; instead of --clip)")
    infer.add_argument("--out", type=Path, required=True, help="result JSON")
    infer.add_argument("--plot", type=Path, help="bird's-eye-view PNG")
    sampling_options(infer)
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
    sampling_options(batch, noise=False)
    batch.set_defaults(run=_batch)

    evaluate = commands.add_parser("evaluate", help="run and score clips with ground truth: minADE and the "
                                                    "reference's metrics, plots")
    model_options(evaluate, model_required=False)
    evaluate.add_argument("--data", type=_existing_dir, required=True,
                          help="a PhysicalAI-AV dataset root, or a directory of clip .npz files with ground truth")
    evaluate.add_argument("--clips", help="only these clips: a file with one name per line, or names separated "
                                          "by commas (file stems, or dataset clip ids, optionally ID@T0_US)")
    evaluate.add_argument("--t0", default="keyframe",
                          help="dataset samples: keyframe (5.1 s, default), first_event, all_events, or "
                               "microseconds")
    evaluate.add_argument("--out-dir", type=Path, required=True,
                          help="results (<clip name>.json, reused when present), metrics.json, metrics.csv, "
                               "summary.png")
    evaluate.add_argument("--score-only", action="store_true",
                          help="score the results already in --out-dir (no --model needed)")
    evaluate.add_argument("--batch-size", type=int, help="clips per batch (default: the mesh's data axis size)")
    evaluate.add_argument("--plots", action="store_true", help="also per clip: bird's-eye view and camera mosaic")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    sampling_options(evaluate, noise=False)
    evaluate.set_defaults(run=_evaluate, num_samples=6, seed=42)

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
    export.add_argument("--force", action="store_true", help="replace an existing --out")
    export.set_defaults(run=_export)

    def training_options(command, *, parallel: bool):
        command.add_argument("--stage", type=int, choices=[1, 2], required=True,
                             help="1: the whole VLM learns to write the trajectory tokens (and the clips' "
                                  "Chain-of-Causation text); 2: the action expert on the frozen VLM")
        model_options(command, parallel=parallel)
        command.add_argument("--expert-attention", choices=["default", "reference"],
                             help="stage 2: default (the default): action tokens attend bidirectionally, as at "
                                  "inference, padding masked; reference: NVIDIA's training code exactly (causal, "
                                  "padding visible)")

    train_command = commands.add_parser("train", help="fine-tune on clips with ground truth (stage 1: the VLM, "
                                                      "stage 2: the action expert)")
    training_options(train_command, parallel=True)
    train_command.add_argument("--data", type=Path, required=True,
                               help="directory of clip .npz files with ego_future_xyz/rot, a list of them, or a "
                                    "PhysicalAI-AV dataset root (its clips at t0 = 5.1 s)")
    train_command.add_argument("--out", type=Path, required=True, help="run directory: checkpoints/, metrics.jsonl")
    train_command.add_argument("--steps", type=int, default=1000,
                               help="optimizer steps (default: 1000); each takes --gradient-accumulation batches")
    train_command.add_argument("--batch-size", type=int, default=1, help="examples per batch (default: 1)")
    train_command.add_argument("--lr", type=float,
                               help="peak learning rate (default: the reference's, 1e-5 stage 1, 1e-4 stage 2; the "
                                    "vision tower learns at 0.1 x this in stage 1)")
    train_command.add_argument("--warmup", type=int, help="warmup steps (default: the reference's, 500 stage 1, "
                                                         "100 stage 2)")
    train_command.add_argument("--gradient-accumulation", type=int,
                               help="batches per optimizer step (default: the reference's, 4 stage 1, 1 stage 2)")
    train_command.add_argument("--seed", type=_seed, default=42, help="data order and flow draws (default: 42)")
    train_command.add_argument("--save-every", type=int, default=100, help="checkpoint interval in optimizer steps")
    train_command.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    train_command.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train_command.add_argument("--fsdp", action="store_true",
                               help="with --mesh: also split every parameter and its optimizer state over the "
                                    "data axis (FSDP); default: tensor parallel over the model axis only")
    train_command.add_argument("--remat", action=argparse.BooleanOptionalAction,
                               help="recompute the trained stack's layer activations in the backward pass (less "
                                    "memory; default: on for stage 1's language model, off for stage 2's expert)")
    train_command.add_argument("--export", type=Path,
                               help="write the trained model here as a bundle (what `infer` reads)")
    train_command.add_argument("--quiet", action="store_true", help="no progress bar")
    train_command.set_defaults(run=_train)

    from alpamayo_jax.serving.command import add_arguments as add_serve_arguments
    from alpamayo_jax.serving.command import main as serve_main

    serve = commands.add_parser("serve", help="a warm policy server: AlpaSim egodriver (gRPC) and NIM-style HTTP")
    add_serve_arguments(serve)
    _cache_option(serve)
    serve.set_defaults(run=serve_main)

    from alpamayo_jax import warmup

    warmup_command = commands.add_parser("warmup", help="compile the programs of a deployment's shapes into the "
                                                        "persistent compilation cache")
    model_options(warmup_command)
    sampling_options(warmup_command, noise=False)
    warmup.add_arguments(warmup_command)
    warmup_command.set_defaults(run=warmup.main)

    from alpamayo_jax.data import synthetic_dataset

    make_dataset = commands.add_parser("make-dataset",
                                       help="write a small synthetic dataset in the PhysicalAI-AV layout")
    synthetic_dataset.add_arguments(make_dataset)
    make_dataset.set_defaults(run=synthetic_dataset.main)

    loss = commands.add_parser("loss", help="one forward/backward: the loss and every trainable gradient")
    training_options(loss, parallel=False)
    loss.add_argument("--examples", type=Path, nargs="+", required=True, help="clip .npz files with ground truth")
    loss.add_argument("--flow-timesteps", type=Path, help="stage 2 (required): .npy (B,) flow times, one per example")
    loss.add_argument("--flow-noise", type=Path, help="stage 2 (required): .npy (B, waypoints, 2) flow noise")
    loss.add_argument("--out", type=Path, required=True,
                      help=".safetensors with `loss` (stage 1 also `loss.future_traj`, `loss.others`) and "
                           "`grad.<checkpoint key>` of every trained parameter (checkpoint layout, float32)")
    loss.set_defaults(run=_loss)

    verify = commands.add_parser("verify", help="compare with the PyTorch reference: inference stage by stage "
                                                "(default), or --stage 1|2: fine-tuning gradients vs NVIDIA's code")
    verify.add_argument("--stage", choices=["inference", "1", "2"], default="inference",
                        help="inference (default): a bundle vs a PyTorch model of its source checkpoint; 1 or 2: one "
                             "training step's loss and gradients of that stage vs NVIDIA's training code")
    verify.add_argument("--model", type=_existing_dir, required=True,
                        help="bundle (or Hugging Face) directory; with --stage 1|2 a Hugging Face checkpoint, or a "
                             "bundle with --hf-dir")
    verify.add_argument("--hf-dir", type=_existing_dir,
                        help="the source checkpoint directory (required for inference; with --stage 1|2 what the "
                             "reference loads, default --model)")
    verify.add_argument("--processor-dir", type=_existing_dir,
                        help="backbone config directory if not a preset (required with --stage 1|2)")
    verify.add_argument("--tolerance", type=float, default=1e-4, help="max relative error per stage / tensor")
    verify.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="inference only. float32 (default): stage by stage within --tolerance; bfloat16: ours "
                             "in bfloat16 and float32 against the reference's bfloat16 autocast run of a Hugging "
                             "Face checkpoint (--hf-dir, default --model), failing where bfloat16 is the further "
                             "(in the language model by more than 2x)")
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--json", type=Path, help="also write the errors as JSON here")
    training = verify.add_argument_group("--stage 1|2")
    training.add_argument("--examples", type=Path, nargs="+", help="clip .npz files with ground truth, one batch")
    training.add_argument("--reference-src", type=Path,
                          help="an NVlabs/alpamayo source tree (required with --stage 1|2; with --dtype bfloat16, "
                               "NVIDIA's AlpamayoR1 becomes the reference); its Python dependencies (hydra-core, "
                               "omegaconf, antlr4-python3-runtime, colorlog, torchvision) must be importable")
    stage2 = verify.add_argument_group("--stage 2")
    stage2.add_argument("--flow-timesteps", type=Path, help=".npy (B,) flow times, one per example")
    stage2.add_argument("--flow-noise", type=Path, help=".npy (B, waypoints, 2) flow noise")
    stage2.add_argument("--expert-attention", choices=["reference", "default"],
                        help="our expert's attention: reference (default; NVIDIA's training code: causal, padding "
                             "visible) or default (as at inference; expected to differ)")
    stage2.add_argument("--actions", choices=["reference", "ours"],
                        help="clean actions x our loss starts from: reference (default: NVIDIA's traj_to_action, so "
                             "the gradients test the VLM cache, expert and loss) or ours (end to end; traj_to_action "
                             "is ill-conditioned in float32, use a tolerance like 5e-2)")
    verify.set_defaults(run=_verify)

    args = parser.parse_args(argv)
    try:
        if hasattr(args, "compilation_cache"):  # the model commands, before anything compiles
            from alpamayo_jax.compilation_cache import setup_compilation_cache

            setup_compilation_cache(args.compilation_cache)
        return args.run(args)
    except (ValueError, OSError) as error:
        # Validation errors already say what is wrong and where; a traceback adds nothing.
        print(f"alpamayo-jax {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
