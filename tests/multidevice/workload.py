"""The run every multi-device check makes and compares with one device: the tiny fixture, two clips
of equal image sizes (the fixture's cameras, and the same cameras in reverse order) x four samples,
12 tokens sampled at temperature 1. Imported by the scripts beside it once JAX is configured."""

import jax
from safetensors.numpy import load_file

from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.inference.pipeline import Pipeline, sample_from_inputs
from alpamayo_jax.processing.clip import Clip
from alpamayo_jax.processing.model_inputs import ModelInputs


class Workload:
    def __init__(self, fixture: str):
        self.fixture = fixture
        golden = load_file(f"{fixture}/golden.safetensors")
        self.history = golden["input.ego_history_xyz"][0], golden["input.ego_history_rot"][0]  # (1, 16, ...)
        self.frames = [golden["input.image_frames"], golden["input.image_frames"][::-1]]

    def load(self, mesh=None) -> Pipeline:
        return Pipeline.load(f"{self.fixture}/hf", processor_dir=f"{self.fixture}/vlm", mesh=mesh)

    def inputs(self, pipeline: Pipeline, clips: int = 2) -> ModelInputs:
        """The model inputs of the first `clips` clips."""
        return pipeline.prepare([Clip.create(frames, self.history[0][0], self.history[1][0])
                                 for frames in self.frames[:clips]])

    def run(self, pipeline: Pipeline, clips: int = 2, num_samples: int = 4):
        """clips x num_samples rows (8 by default: every preset's data axis divides them)."""
        settings = InferenceConfig.from_model(pipeline.config, num_samples=num_samples, temperature=1.0,
                                              max_new_tokens=12)
        return sample_from_inputs(pipeline, self.inputs(pipeline, clips), jax.random.key(3), settings)
