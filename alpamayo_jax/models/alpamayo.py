"""Alpamayo-R1: the Qwen3-VL backbone, the action expert and the action projections in one tree.

Parameter paths mirror the reference checkpoint (`alpamayo_jax.io.weight_map.alpamayo_rules`):
`vlm.{visual,language_model,lm_head}`, `expert`, `action_in_proj`, `action_out_proj`, and the
normalisation buffers of `action_space`.

Shapes: B batch, W waypoints, C action channels (2), E expert width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alpamayo_jax.action.unicycle import ActionStats
from alpamayo_jax.config import ActionSpaceConfig, AlpamayoConfig
from alpamayo_jax.models.action_proj import PerWaypointActionInProj
from alpamayo_jax.models.expert import ExpertContext, run_expert
from alpamayo_jax.models.text import TextDecoder
from alpamayo_jax.models.vlm import Qwen3VL
from alpamayo_jax.nn.axes import axes
from alpamayo_jax.nn.linear import Linear
from alpamayo_jax.nn.variables import Buffer

ACTION_DIM = 2  # (acceleration, curvature)


class ActionSpaceBuffers(nnx.Module):
    """The action normalisation statistics as stored in the checkpoint (0-d buffers)."""

    def __init__(self, config: ActionSpaceConfig, *, param_dtype=jnp.float32):
        for name in ActionStats._fields:
            setattr(self, name, Buffer(jnp.asarray(getattr(config, name), param_dtype), **axes()))

    def stats(self) -> ActionStats:
        return ActionStats(*(getattr(self, name)[...] for name in ActionStats._fields))


class AlpamayoR1(nnx.Module):
    """The whole model. Generation, flow matching and the rollout live in `alpamayo_jax.inference`."""

    def __init__(self, config: AlpamayoConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.vlm = Qwen3VL.from_config(config, param_dtype=param_dtype, rngs=rngs)
        self.expert = TextDecoder(config.expert, vocab_size=None, param_dtype=param_dtype, rngs=rngs)
        self.action_in_proj = PerWaypointActionInProj(
            config.action_in_proj, action_dim=ACTION_DIM, out_dim=config.expert.hidden_size,
            param_dtype=param_dtype, rngs=rngs,
        )
        self.action_out_proj = Linear(
            config.expert.hidden_size, ACTION_DIM, param_dtype=param_dtype,
            kernel_metadata=axes("embed", "action_dim"), bias_metadata=axes("action_dim"), rngs=rngs,
        )
        self.action_space = ActionSpaceBuffers(config.action_space, param_dtype=param_dtype)

    def action_velocity(self, x: jax.Array, t: jax.Array, context: ExpertContext, *, remat: bool = False
                        ) -> jax.Array:
        """The flow velocity for noisy normalised actions x (B, W, C) at flow time t (B,),
        conditioned on the language model's cache through `context`; `remat` recomputes the
        expert's layers in the backward pass (training memory)."""
        embeds = self.action_in_proj(x, t)
        hidden = run_expert(self.expert, embeds, context, remat=remat).hidden_states
        return self.action_out_proj(hidden)
