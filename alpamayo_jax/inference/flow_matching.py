"""Flow matching: the Euler sampler (one `lax.scan`) and the training objective, as pure functions.

Convention (the reference's): t = 0 is noise, t = 1 is data; x_t = t x_1 + (1 - t) eps, and the
model predicts the velocity x_1 - eps.

Shapes: N samples, W waypoints, C action channels; `...` any leading axes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from alpamayo_jax.config import TIMESTEP_SAMPLERS, FlowMatchingConfig
from alpamayo_jax.numerics import torch_linspace_f32

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x (N, W, C), t (N,)) -> v (N, W, C)

# The reference's default training-time sampler ("beta"): t = 0.999 - 0.999 s with s ~ Beta(1.5, 1),
# which puts more weight on the noisy end (t near 0). The other one, "uniform", is t ~ U[0, 1).
BETA_A, BETA_B, BETA_SCALE = 1.5, 1.0, 0.999
DEFAULT_TIMESTEP_SAMPLER = FlowMatchingConfig.train_timestep_sampler  # "beta"


def time_grid(num_steps: int) -> np.ndarray:
    """(num_steps + 1,) float32 grid from 0 to 1, bit-identical to the reference's
    `torch.linspace(0, 1, num_steps + 1)`; its steps are therefore not all exactly 1/num_steps."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch_linspace_f32(0.0, 1.0, num_steps + 1)


class EulerResult(NamedTuple):
    actions: jax.Array  # (N, W, C) the final iterate (t = 1)
    iterates: jax.Array | None  # (num_steps + 1, N, W, C): x before each step, then the final x
    velocities: jax.Array | None  # (num_steps, N, W, C)


DEFAULT_NUM_STEPS = 10  # the reference's default; the paper's latency setting uses 5


def initial_noise(key: jax.Array, num_samples: int, num_waypoints: int, action_dim: int = 2) -> jax.Array:
    """The starting point of sampling: eps ~ N(0, I) of shape (N, W, C), float32."""
    return jax.random.normal(key, (num_samples, num_waypoints, action_dim), jnp.float32)


def euler_sample(velocity_fn: VelocityFn, noise: jax.Array, num_steps: int = DEFAULT_NUM_STEPS,
                 return_iterates: bool = False) -> EulerResult:
    """Integrates dx/dt = v(x, t) from t = 0 (x = `noise` (N, W, C), e.g. from `initial_noise`,
    or injected for reproducibility) to t = 1 in `num_steps` Euler steps, as one `lax.scan`. The
    step sizes are the differences of `time_grid`, not exactly 1/num_steps."""
    grid = time_grid(num_steps)
    times, steps = jnp.asarray(grid[:-1]), jnp.asarray(grid[1:] - grid[:-1])
    batch = noise.shape[0]

    def step(x, time_and_dt):
        t, dt = time_and_dt
        v = velocity_fn(x, jnp.full((batch,), t, jnp.float32))
        x_next = x + dt * v
        return x_next, (x, v) if return_iterates else None

    x = noise.astype(jnp.float32)
    final, history = jax.lax.scan(step, x, (times, steps))
    if not return_iterates:
        return EulerResult(final, None, None)
    before, velocities = history
    return EulerResult(final, jnp.concatenate([before, final[None]], axis=0), velocities)


def sample_timesteps(key: jax.Array, shape: tuple[int, ...],
                     sampler: str = DEFAULT_TIMESTEP_SAMPLER) -> jax.Array:
    """Training flow times, float32. `sampler` (static, one of `TIMESTEP_SAMPLERS`): "beta" draws
    from (0, 0.999], biased towards the noisy end; "uniform" draws from [0, 1)."""
    if sampler == "beta":
        s = jax.random.beta(key, BETA_A, BETA_B, shape, dtype=jnp.float32)
        return BETA_SCALE - s * BETA_SCALE
    if sampler == "uniform":
        return jax.random.uniform(key, shape, jnp.float32)
    raise ValueError(f"unknown timestep sampler {sampler!r}; expected one of {TIMESTEP_SAMPLERS}")


def interpolate(actions: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = t x_1 + (1 - t) eps, with t (N,) broadcast over the trailing axes."""
    t = t.reshape(t.shape + (1,) * (actions.ndim - t.ndim))
    return t * actions + (1 - t) * noise


def flow_matching_loss(velocity_fn: VelocityFn, actions: jax.Array, key: jax.Array,
                       config: FlowMatchingConfig | None = None, *, sampler: str | None = None) -> jax.Array:
    """Mean squared error between v(x_t, t) and the target velocity x_1 - eps, with t drawn by
    `sample_timesteps` and eps ~ N(0, I) from `key`. `actions` (N, W, C) are normalised.

    The timestep sampler is `config.train_timestep_sampler`, or `sampler`, or (neither given) the
    reference's default "beta"; giving both is an error. Both are static under `jax.jit`."""
    if config is not None and sampler is not None:
        raise TypeError("pass the timestep sampler either in config or as sampler=, not both")
    if config is not None:
        sampler = config.train_timestep_sampler
    elif sampler is None:
        sampler = DEFAULT_TIMESTEP_SAMPLER
    time_key, noise_key = jax.random.split(key)
    t = sample_timesteps(time_key, actions.shape[:1], sampler)
    noise = jax.random.normal(noise_key, actions.shape, jnp.float32)
    prediction = velocity_fn(interpolate(actions, noise, t), t)
    target = (actions - noise).astype(prediction.dtype)
    return jnp.mean((prediction - target) ** 2)
