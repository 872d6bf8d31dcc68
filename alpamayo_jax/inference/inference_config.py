"""How to run inference: sampling, token budget, flow steps and samples per clip, in one place.

`InferenceConfig.from_model(config, **overrides)` is the one statement of every default:

* flow steps: the checkpoint's `diffusion_cfg.num_inference_steps` (10 unless it says otherwise);
* token budget: the checkpoint's `tokens_per_future_traj`, the reference's default
  `max_generation_length` (NVIDIA's inference test script passes 256 instead);
* sampling: the reference rollout's temperature 0.6, top-p 0.98, no top-k
  (`alpamayo_jax.inference.sampling.REFERENCE_SAMPLING`); `greedy` decodes by argmax;
* one sample per clip.

Every value is checked here, with messages that name the option, before any model work starts.
The config is frozen and hashable, so it can be a static argument under `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math

from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.inference.generation import GenerationConfig
from alpamayo_jax.inference.sampling import REFERENCE_SAMPLING, SamplingParams

DEFAULT_NUM_SAMPLES = 1


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """What one inference run does per clip.

    num_samples: trajectories (and reasoning rollouts) per clip.
    sampling: how tokens are chosen (`SamplingParams`; greedy when `do_sample` is false).
    max_new_tokens: the reasoning rollout's token budget.
    num_flow_steps: Euler steps of the flow-matching sampler.
    """

    num_samples: int
    sampling: SamplingParams
    max_new_tokens: int
    num_flow_steps: int

    def __post_init__(self):
        for name in ("num_samples", "max_new_tokens", "num_flow_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")

    @classmethod
    def from_model(
        cls,
        config: AlpamayoConfig,
        *,
        num_samples: int | None = None,
        greedy: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        max_new_tokens: int | None = None,
        num_flow_steps: int | None = None,
    ) -> InferenceConfig:
        """The checkpoint's defaults (module docstring) with the given values in their place.
        `greedy` takes no temperature, top-p or top-k. Raises ValueError naming a bad value."""
        if greedy:
            given = [name for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k))
                     if value is not None]
            if given:
                raise ValueError(f"greedy decoding takes the most likely token: {', '.join(given)} cannot be "
                                 "given with it")
            sampling = SamplingParams.greedy()
        else:
            temperature = REFERENCE_SAMPLING.temperature if temperature is None else temperature
            if not _real(temperature) or not math.isfinite(temperature) or temperature <= 0:
                raise ValueError(f"temperature must be a finite number > 0, got {temperature!r} (for argmax "
                                 "decoding, use greedy decoding: --greedy)")
            top_p = REFERENCE_SAMPLING.top_p if top_p is None else top_p
            if not _real(top_p) or not 0 < top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")
            top_k = REFERENCE_SAMPLING.top_k if top_k is None else top_k
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
                raise ValueError(f"top_k must be a whole number >= 0 (0 disables it), got {top_k!r}")
            sampling = SamplingParams(do_sample=True, temperature=float(temperature), top_p=float(top_p),
                                      top_k=top_k or None)
        return cls(
            num_samples=DEFAULT_NUM_SAMPLES if num_samples is None else num_samples,
            sampling=sampling,
            max_new_tokens=config.tokens_per_future_traj if max_new_tokens is None else max_new_tokens,
            num_flow_steps=config.flow_matching.num_inference_steps if num_flow_steps is None else num_flow_steps,
        )

    def generation_config(self, config: AlpamayoConfig, *, pad_token_id: int) -> GenerationConfig:
        """The rollout settings for this run on a model with `config`."""
        return GenerationConfig.for_alpamayo(config, pad_token_id=pad_token_id, max_new_tokens=self.max_new_tokens,
                                             sampling=self.sampling)

    def to_json(self) -> dict:
        """The settings as a JSON-ready dict (recorded next to results)."""
        return {
            "num_samples": self.num_samples,
            "greedy": not self.sampling.do_sample,
            "temperature": self.sampling.temperature if self.sampling.do_sample else None,
            "top_p": self.sampling.top_p if self.sampling.do_sample else None,
            "top_k": self.sampling.top_k if self.sampling.do_sample else None,
            "max_new_tokens": self.max_new_tokens,
            "num_flow_steps": self.num_flow_steps,
        }


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
