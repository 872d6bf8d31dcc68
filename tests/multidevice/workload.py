"""The run every multi-device check makes and compares with one device: the tiny fixture, two clips
of equal image sizes (the fixture's cameras, and the same cameras in reverse order) x four samples,
12 tokens sampled at temperature 1. Imported by the scripts beside it once JAX is configured."""

import jax
import numpy as np
from safetensors.numpy import load_file

from alpamayo_jax.inference.pipeline import Pipeline, prepare_clips, sample_from_inputs


class Workload:
    def __init__(self, fixture: str):
        self.fixture = fixture
        golden = load_file(f"{fixture}/golden.safetensors")
        self.history = golden["input.ego_history_xyz"][0], golden["input.ego_history_rot"][0]  # (1, 16, ...)
        self.frames = [golden["input.image_frames"], golden["input.image_frames"][::-1]]

    def load(self, mesh=None) -> Pipeline:
        return Pipeline.load(f"{self.fixture}/hf", processor_dir=f"{self.fixture}/vlm", mesh=mesh)

    def inputs(self, pipeline: Pipeline, clips: int = 2) -> dict:
        """Prompt ids, pixels and grids of the first `clips` clips."""
        return prepare_clips(pipeline, self.frames[:clips], [self.history[0][0]] * clips,
                             [self.history[1][0]] * clips)

    def run(self, pipeline: Pipeline, clips: int = 2, num_samples: int = 4):
        """clips x num_samples rows (8 by default: every preset's data axis divides them)."""
        inputs = self.inputs(pipeline, clips)
        return sample_from_inputs(pipeline, inputs["fused_input_ids"], inputs["pixel_values"],
                                  inputs["image_grid_thw"], np.repeat(self.history[0], clips, 0),
                                  np.repeat(self.history[1], clips, 0), jax.random.key(3),
                                  num_samples=num_samples, temperature=1.0, max_new_tokens=12)
