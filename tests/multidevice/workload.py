"""The runs every multi-device check makes and compares with one device: the tiny fixture, two clips
of equal image sizes (the fixture's cameras, and the same cameras in reverse order) x four samples,
12 tokens sampled at temperature 1; and three training steps (stage 2, or stage 1) on a batch of
four synthetic clips with ground truth. Imported by the scripts beside it once JAX is configured."""

import jax
from safetensors.numpy import load_file

from alpamayo_jax.inference.inference_config import InferenceConfig
from alpamayo_jax.inference.pipeline import Pipeline, sample_from_inputs
from alpamayo_jax.processing.clip import Clip
from alpamayo_jax.processing.collate import collate
from alpamayo_jax.processing.model_inputs import ModelInputs
from alpamayo_jax.processing.synthetic import synthetic_clip
from alpamayo_jax.sharding import LOGICAL_RULES
from alpamayo_jax.training.optimizer import OptimizerConfig
from alpamayo_jax.training.stage2 import fit_actions
from alpamayo_jax.training.trainer import Trainer

TRAINING_OPTIMIZER = OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=3)


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

    @staticmethod
    def settings(pipeline: Pipeline, num_samples: int = 4) -> InferenceConfig:
        return InferenceConfig.from_model(pipeline.config, num_samples=num_samples, temperature=1.0,
                                          max_new_tokens=12)

    def run(self, pipeline: Pipeline, clips: int = 2, num_samples: int = 4):
        """clips x num_samples rows (8 by default: every preset's data axis divides them)."""
        return sample_from_inputs(pipeline, self.inputs(pipeline, clips), jax.random.key(3),
                                  self.settings(pipeline, num_samples))

    def training_batch(self, pipeline: Pipeline, stage: int = 2):
        """(inputs, targets) of four synthetic clips with ground truth: stage 2's actions, or stage 1's labels."""
        clips = [synthetic_clip(i, image_size=(32, 48), speed=4.0 + i, curvature=0.01 * (i - 2), with_future=True)
                 for i in range(4)]
        batch = collate(clips, tokenizer=pipeline.tokenizer, chat_template=pipeline.chat_template,
                        config=pipeline.config)
        if stage == 1:
            return batch.fused_inputs(), jax.numpy.asarray(batch.labels())
        return batch.inputs, fit_actions(pipeline.split, batch.inputs, batch.ego_future_xyz, batch.ego_future_rot)

    @staticmethod
    def trainer(pipeline: Pipeline, mesh=None, rules=LOGICAL_RULES, stage: int = 2):
        """The trainer of `stage` (2 by default) and its initial state, from key 0."""
        return Trainer.create(pipeline.model, TRAINING_OPTIMIZER, jax.random.key(0), stage=stage, mesh=mesh,
                              rules=rules)

    @staticmethod
    def train(trainer, state, batch, steps: int = 3):
        """(final state, losses) of `steps` stage-2 steps on `batch`."""
        losses = []
        for _ in range(steps):
            state, metrics = trainer.step(state, *batch)
            losses.append(float(metrics["loss"]))
        return state, losses
