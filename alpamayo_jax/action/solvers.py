"""Regularised least-squares solvers behind `traj_to_action` (SPEC §9.4-9.5).

Every solve is a small symmetric positive definite system `(G + S + r I) x = b`: a Gram matrix G
of the data term, a smoothing matrix S = (λ / dt^(2k)) DₖᵀDₖ built from the banded k-th
difference operator, and a ridge r. All arithmetic is float32, as in the reference (which runs
these solvers with autocast disabled).

Shape legend: `...` any leading batch axes; N the number of unknowns of a solve (the waypoints);
N+1 when the value at t0 is part of the sequence.

The factorisation and the triangular solves are written here in plain jax.numpy (`cholesky`,
`cho_solve`) rather than taken from `jnp.linalg` / `jax.scipy.linalg`: on the CPU those call
LAPACK through jaxlib 0.10.2's batched kernels, which wait for their batch on the thread pool they
run on, so two of them at once (two solves XLA runs side by side, or two programs in flight) on
a two-core machine deadlock the process. The systems are small (N <= 64), so a column loop costs
nothing that matters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def difference_operator(n: int, order: int) -> np.ndarray:
    """The banded k-th order forward difference matrix, (n - order, n): rows (-1, 1), (1, -2, 1),
    (-1, 3, -3, 1) for orders 1, 2, 3."""
    return np.diff(np.eye(n, dtype=np.float32), n=order, axis=0)


def smoothing_matrix(n: int, order: int, lam: float, dt: float) -> np.ndarray:
    """(λ / dt^(2·order)) DᵀD, (n, n) float32: the normal-equation term of a penalty
    λ ‖dᵏx/dtᵏ‖² on a sequence of n samples dt apart."""
    d = difference_operator(n, order)
    # DᵀD has small integer entries (exact in float32); the weight is rounded to float32 once
    # and the product rounded once, as in the reference.
    return np.float32(lam / dt ** (2 * order)) * (d.T @ d)


# Ridge multipliers tried after a failed factorisation (the reference's ×10 rule), before the
# diagonal-dominance fallback below.
RIDGE_RETRIES = 4


def cholesky(matrix: jax.Array) -> jax.Array:
    """The lower Cholesky factor L (..., N, N) of symmetric `matrix` (..., N, N) (its lower
    triangle is read), L Lᵀ = matrix; non-finite entries where `matrix` is not positive definite
    (a pivot <= 0 gives an inf or NaN that runs through the later columns), as LAPACK's factor
    does. One column per step of a `fori_loop`, left-looking:
    L[:, j] = (A[:, j] - L[:, :j] L[j, :j]) / sqrt(pivot), zero above the diagonal."""
    _, lower = jax.lax.fori_loop(0, matrix.shape[-1], _cholesky_column, (matrix, jnp.zeros_like(matrix)))
    return lower


def cho_solve(lower: jax.Array, rhs: jax.Array) -> jax.Array:
    """x (..., N) with L Lᵀ x = rhs (..., N), L = `lower` (..., N, N) from `cholesky`: forward
    substitution for L y = rhs, then back substitution for Lᵀ x = y, one unknown per step."""
    n = lower.shape[-1]
    _, _, y = jax.lax.fori_loop(0, n, _forward_substitution, (lower, rhs, jnp.zeros_like(rhs)))
    _, _, x = jax.lax.fori_loop(0, n, _back_substitution, (lower, y, jnp.zeros_like(rhs)))
    return x


# The loop bodies are module-level functions, the data in the carry: a `fori_loop` called outside
# `jit` is compiled once per body function, so a closure made per call would compile per call.
def _cholesky_column(j, carry):
    matrix, lower = carry
    index = jnp.arange(matrix.shape[-1])
    unit = (index == j).astype(matrix.dtype)  # (N,) e_j
    row_j = jnp.sum(lower * unit[:, None], axis=-2)  # (..., N) L[j, :], zero from column j on
    residual = jnp.sum(matrix * unit, axis=-1) - jnp.sum(lower * row_j[..., None, :], axis=-1)  # (..., N)
    pivot = jnp.sqrt(jnp.sum(residual * unit, axis=-1))  # (...,)
    values = jnp.where(index >= j, residual / pivot[..., None], 0.0)
    return matrix, lower + values[..., :, None] * unit


def _forward_substitution(i, carry):
    lower, rhs, y = carry
    unit = (jnp.arange(lower.shape[-1]) == i).astype(lower.dtype)
    row = jnp.sum(lower * unit[:, None], axis=-2)  # L[i, :]
    pivot = jnp.sum(row * unit, axis=-1)
    value = (jnp.sum(rhs * unit, axis=-1) - jnp.sum(row * y, axis=-1)) / pivot
    return lower, rhs, y + value[..., None] * unit


def _back_substitution(step, carry):
    lower, y, x = carry
    i = lower.shape[-1] - 1 - step
    unit = (jnp.arange(lower.shape[-1]) == i).astype(lower.dtype)
    column = jnp.sum(lower * unit, axis=-1)  # L[:, i] = Lᵀ[i, :]
    pivot = jnp.sum(column * unit, axis=-1)
    value = (jnp.sum(y * unit, axis=-1) - jnp.sum(column * x, axis=-1)) / pivot
    return lower, y, x + value[..., None] * unit


def cholesky_ridge(matrix: jax.Array, ridge: float) -> jax.Array:
    """The ridge r (...,) to add to `matrix` (..., N, N) so that its Cholesky factorisation succeeds.

    The reference factorises `matrix + ridge·I` and, on failure, multiplies the ridge by 10 and
    tries again. Here a failure is a factor with a non-finite entry (what `cholesky` returns for a
    matrix that is not positive definite), and the attempts are evaluated side by
    side, without control flow, then the first success is picked per batch element:

    * ridge·10^k for k = 0..RIDGE_RETRIES: when the first attempt succeeds the ridge is `ridge`
      itself, so the solve is identical to a single attempt; the next ones follow the reference;
    * last, twice the largest absolute row sum, which makes the matrix strictly diagonally
      dominant with a positive diagonal, so its factorisation cannot break down: a finite matrix
      always gets a finite solution;
    * a non-finite matrix (NaN or inf input) fails every attempt and keeps `ridge`: its NaN
      propagates to the solution of that batch element only.

    That costs RIDGE_RETRIES + 2 small factorisations per solve instead of one, but no
    data-dependent loop. The matrix is treated as a constant: the ridge is piecewise constant.
    """
    matrix = jax.lax.stop_gradient(matrix)
    ladder = np.float32(ridge * 10.0 ** np.arange(RIDGE_RETRIES + 1))
    dominant = 2 * jnp.max(jnp.sum(jnp.abs(matrix), axis=-1), axis=-1)
    candidates = jnp.concatenate(
        [
            jnp.broadcast_to(ladder, matrix.shape[:-2] + ladder.shape),
            jnp.maximum(dominant, ladder[-1])[..., None],
        ],
        axis=-1,
    )  # (..., RIDGE_RETRIES + 2)
    eye = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
    chol = cholesky(matrix[..., None, :, :] + candidates[..., None, None] * eye)
    factorised = jnp.all(jnp.isfinite(chol), axis=(-2, -1))
    first = jnp.argmax(factorised, axis=-1)  # 0 when nothing factorises
    return jnp.take_along_axis(candidates, first[..., None], axis=-1)[..., 0]


def solve_spd(matrix: jax.Array, rhs: jax.Array, ridge: float) -> jax.Array:
    """Solves (matrix + r·I) x = rhs by Cholesky, r from `cholesky_ridge` (the reference's
    ×10 retry rule). matrix (..., N, N) symmetric positive semi-definite, rhs (..., N) -> (..., N).

    Bit-identical to a plain `cho_solve(cholesky(matrix + ridge·I), rhs)` whenever that
    factorisation succeeds; never NaN for a finite matrix; NaN for a non-finite one.
    Differentiable in matrix and rhs (the ridge is held constant).
    """
    r = cholesky_ridge(matrix, ridge)
    chol = cholesky(matrix + r[..., None, None] * jnp.eye(matrix.shape[-1], dtype=matrix.dtype))
    return cho_solve(chol, rhs)


def _tridiagonal(diag: jax.Array, off: jax.Array) -> jax.Array:
    """Symmetric tridiagonal matrix (..., N, N) from its diagonal (..., N) and off-diagonal (..., N-1)."""
    n = diag.shape[-1]
    i = np.arange(n)
    out = jnp.zeros(diag.shape + (n,), diag.dtype)
    return out.at[..., i, i].set(diag).at[..., i[:-1], i[1:]].set(off).at[..., i[1:], i[:-1]].set(off)


def _diagonal(values: jax.Array) -> jax.Array:
    """Diagonal matrix (..., N, N) from (..., N)."""
    return _tridiagonal(values, jnp.zeros_like(values[..., 1:]))


def _shift(x: jax.Array, before: int, after: int) -> jax.Array:
    """Zero-pads the last axis."""
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(before, after)])


def trapezoid_normal_equations(theta: jax.Array, dxy: jax.Array, dt: float) -> tuple[jax.Array, jax.Array]:
    """Normal equations AᵀA, Aᵀb of the trapezoid speed model.

    With u_t = (cos θ_t, sin θ_t), each step t contributes the two rows
    `v_t u_t + v_{t+1} u_{t+1} = 2 Δp_t / dt`; A is (2N, N+1) with two non-zeros per row, so
    AᵀA is tridiagonal and is built directly rather than through A.

    theta (..., N+1) headings, dxy (..., N, 2) displacements -> AᵀA (..., N+1, N+1), Aᵀb (..., N+1).
    """
    u = jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)  # (..., N+1, 2)
    g = (2 / dt) * dxy
    norm2 = jnp.sum(u * u, axis=-1)
    # Step t touches v_t (as "left" unknown) and v_{t+1} (as "right" unknown).
    diag = _shift(norm2[..., 1:], 1, 0) + _shift(norm2[..., :-1], 0, 1)
    off = jnp.sum(u[..., :-1, :] * u[..., 1:, :], axis=-1)
    atb = _shift(jnp.sum(u[..., 1:, :] * g, axis=-1), 1, 0) + _shift(
        jnp.sum(u[..., :-1, :] * g, axis=-1), 0, 1
    )
    return _tridiagonal(diag, off), atb


def solve_speeds(
    dxy: jax.Array,
    theta: jax.Array,
    *,
    dt: float,
    lam: float,
    ridge: float,
    v0: jax.Array | None = None,
) -> jax.Array:
    """Speeds v (..., N+1) from displacements dxy (..., N, 2) and headings theta (..., N+1).

    Least squares on the trapezoid model with a third-order smoothness penalty λ‖d³v/dt³‖² and a
    ridge. With `v0` (...,) the first speed is fixed to it and only v_1..v_N are solved for
    (`dxy_theta_to_v`); without it all N+1 speeds are free (`dxy_theta_to_v_without_v0`).
    """
    gram, atb = trapezoid_normal_equations(theta, dxy, dt)
    smooth = smoothing_matrix(theta.shape[-1], 3, lam, dt)
    if v0 is None:
        return solve_spd(gram + smooth, atb, ridge)
    v0 = v0[..., None]
    rhs = atb[..., 1:] - gram[..., 1:, 0] * v0 - smooth[1:, 0] * v0
    v = solve_spd(gram[..., 1:, 1:] + smooth[1:, 1:], rhs, ridge)
    return jnp.concatenate([jnp.broadcast_to(v0, v.shape[:-1] + (1,)), v], axis=-1)


def smooth_heading(target: jax.Array, *, dt: float, lam: float, ridge: float) -> jax.Array:
    """Smoothed headings (..., N+1) = [0, θ_1..θ_N] close to target (..., N) (unwrapped), with a
    third-order smoothness penalty over the whole sequence including the fixed θ_0 = 0.

    Because θ_0 = 0, the coupling column S[1:, 0]·θ_0 of the constrained solve vanishes.
    """
    n = target.shape[-1]
    smooth = smoothing_matrix(n + 1, 3, lam, dt)
    matrix = jnp.broadcast_to(np.eye(n, dtype=np.float32) + smooth[1:, 1:], target.shape + (n,))
    theta = solve_spd(matrix, target, ridge)
    return _shift(theta, 1, 0)


def solve_scaled(s: jax.Array, y: jax.Array, *, dt: float, lam: float, ridge: float) -> jax.Array:
    """x (..., N) minimising Σ(s_i x_i − y_i)² + λ‖d²x/dt²‖² + ridge‖x‖², for s, y (..., N)
    (`solve_xs_eq_y` with second-order smoothing). Without a data term (s = 0, a vehicle at
    standstill) only the smoothing penalty and the ridge keep the system positive definite."""
    smooth = smoothing_matrix(y.shape[-1], 2, lam, dt)
    return solve_spd(_diagonal(s * s) + smooth, s * y, ridge)
