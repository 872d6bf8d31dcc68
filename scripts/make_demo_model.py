"""Regenerates the embedded demo model (`alpamayo_jax/demo_model/`): the tiny architecture of the
reference fixture, trained by alpamayo-jax itself on synthetic driving scenes.

    python scripts/make_demo_model.py [--out alpamayo_jax/demo_model] [--clips 100] [--seed 0]

1. `alpamayo_jax.data.driving_scenes` draws `--clips` scenes (cruise, a braking car ahead, a stop
   line, left and right curves), each with its ground-truth future and a one-sentence
   Chain-of-Causation, and saves them as `.npz` training clips;
2. stage 1 (`alpamayo-jax train --stage 1`) trains the whole VLM, starting from the tiny fixture's
   random weights, to write the explanation and the trajectory tokens;
3. stage 2 (`alpamayo-jax train --stage 2`) trains the action expert on the stage-1 VLM;
4. the result is written as a bundle at `--out` (replacing it), and scored on `--test-clips` new
   scenes: how often the greedy explanation is the scene's, and minADE over 6 samples.

It runs on a 2-core CPU in about 7 minutes; CI does not run it (a test checks the shipped bundle). The
commands each step ran and the scores are printed and recorded in `--out`/demo_model.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny_ar1_dev"


def _run(argv: list[str]) -> None:
    from alpamayo_jax import cli

    print("$ alpamayo-jax " + " ".join(argv), flush=True)
    started = time.perf_counter()
    if cli.main(argv) != 0:
        sys.exit(f"alpamayo-jax {argv[0]} failed")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def _write_scenes(directory: Path, num_clips: int, seed: int) -> None:
    from alpamayo_jax.data.driving_scenes import driving_scenes
    from alpamayo_jax.processing.clip_file import save_clip

    directory.mkdir(parents=True)
    for name, clip in driving_scenes(num_clips, seed):
        save_clip(directory / f"{name}.npz", clip)


def score(bundle: Path, num_clips: int, seed: int) -> dict:
    """Greedy explanations and 6-sample minADE of the bundle on `num_clips` new scenes."""
    import jax
    import numpy as np

    from alpamayo_jax.data.driving_scenes import driving_scenes
    from alpamayo_jax.evaluation.metrics import trajectory_metrics
    from alpamayo_jax.inference.inference_config import InferenceConfig
    from alpamayo_jax.inference.pipeline import Pipeline, sample_trajectories

    pipeline = Pipeline.load(bundle)
    greedy = InferenceConfig.from_model(pipeline.config, greedy=True, max_new_tokens=48)
    sampled = InferenceConfig.from_model(pipeline.config, num_samples=6, max_new_tokens=48)
    correct, min_ade, examples = 0, [], {}
    for index, (name, clip) in enumerate(driving_scenes(num_clips, seed)):
        text = sample_trajectories(pipeline, clip, jax.random.key(index), greedy).cot[0][0]
        correct += text.strip() == clip.cot
        examples.setdefault(name.rsplit("_", 1)[0], text)
        samples = sample_trajectories(pipeline, clip, jax.random.key(index), sampled)
        values = trajectory_metrics(samples.xyz, samples.rotation, clip.ego_future_xyz[None], clip.ego_future_rot[None])
        min_ade.append(float(values["min_ade"][0]))
    return {"test_clips": num_clips, "explanations_exact": correct / num_clips,
            "min_ade_mean": float(np.mean(min_ade)), "greedy_examples": examples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "alpamayo_jax" / "demo_model")
    parser.add_argument("--clips", type=int, default=100, help="training scenes")
    parser.add_argument("--test-clips", type=int, default=10, help="new scenes to score the result on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage1-steps", type=int, default=150)
    parser.add_argument("--stage2-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    from alpamayo_jax.io.atomic import atomic_directory

    with tempfile.TemporaryDirectory(prefix="demo-model-") as scratch:
        scratch = Path(scratch)
        _write_scenes(scratch / "clips", args.clips, args.seed)
        common = ["--data", str(scratch / "clips"), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
                  "--save-every", "100000", "--quiet"]
        stage1 = ["train", "--stage", "1", "--model", str(FIXTURE / "hf"), "--processor-dir", str(FIXTURE / "vlm"),
                  *common, "--out", str(scratch / "run1"), "--steps", str(args.stage1_steps), "--lr", "2e-3",
                  "--warmup", "30", "--export", str(scratch / "stage1")]
        stage2 = ["train", "--stage", "2", "--model", str(scratch / "stage1"), *common, "--out", str(scratch / "run2"),
                  "--steps", str(args.stage2_steps), "--lr", "2e-3", "--warmup", "20",
                  "--export", str(scratch / "stage2")]
        _run(stage1)
        _run(stage2)
        scores = score(scratch / "stage2", args.test_clips, args.seed + 1)
        print(json.dumps(scores, indent=2))
        record = {"script": "scripts/make_demo_model.py", "arguments": vars(args) | {"out": str(args.out)},
                  "commands": [stage1, stage2], "scores": scores}
        for command in record["commands"]:  # paths inside the scratch directory mean nothing later
            for i, value in enumerate(command):
                command[i] = value.replace(str(scratch), "$SCRATCH").replace(str(ROOT), ".")
        (scratch / "stage2" / "demo_model.json").write_text(json.dumps(record, indent=2) + "\n")
        with atomic_directory(args.out, force=True) as staging:
            shutil.copytree(scratch / "stage2", staging, dirs_exist_ok=True)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
