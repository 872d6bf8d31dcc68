"""The unicycle action space against NVIDIA's reference fixture, plus its numerical robustness.

float32, highest matmul precision. Every jitted function is compiled once for the module (the
config is static, the statistics are traced) and the hand-made hostile trajectories come in a
batch of four, the fixture's batch size, so they reuse the same executables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pytest

from alpamayo_jax.action import solvers, unicycle
from alpamayo_jax.config import tiny
from tests.parity import assert_close, max_errors

jax.config.update("jax_default_matmul_precision", "highest")

CFG = tiny().action_space
STATS = unicycle.ActionStats.from_config(CFG)

action_to_traj = jax.jit(unicycle.action_to_traj, static_argnames="cfg")
traj_to_action = jax.jit(unicycle.traj_to_action, static_argnames=("cfg", "return_states"))
estimate_t0_states = jax.jit(unicycle.estimate_t0_states, static_argnames="cfg")

# traj_to_action's acceleration is a smoothed finite difference of solved speeds, so it carries
# the float32 error of the speed solve amplified by ~1/dt. Evaluating the reference code itself in
# float64 on the fixture inputs moves its outputs by 1.2e-4 (acceleration) and 3.6e-5 (curvature)
# relative to the recorded float32 ones: no float32 implementation can match them to 1e-5.
ACCEL_REL_TOL = 2e-4
CURVATURE_REL_TOL = 1e-4


def _fixture_history(golden):
    return golden["action_space.hist_xyz"], golden["action_space.hist_rot"]


def _fixture_future(golden):
    return golden["action_space.fut_xyz"], golden["action_space.fut_rot"]


# ---------------------------------------------------------------------------------------------
# Parity with the reference fixture
# ---------------------------------------------------------------------------------------------


def test_action_to_traj_matches_reference(golden):
    xyz, rot = action_to_traj(golden["action_space.actions_in"], *_fixture_history(golden), CFG, STATS)
    assert_close(xyz, golden["action_space.action_to_traj_xyz"], rel=1e-5, name="action_to_traj xyz")
    assert_close(rot, golden["action_space.action_to_traj_rot"], rel=1e-5, name="action_to_traj rot")


def test_t0_speed_matches_reference(golden):
    assert_close(
        estimate_t0_states(*_fixture_history(golden), CFG), golden["action_space.t0_v"], rel=1e-5, name="t0_v"
    )
    hist_xyz = golden["input.ego_history_xyz"][0, 0]
    hist_rot = golden["input.ego_history_rot"][0, 0]
    speed = estimate_t0_states(hist_xyz, hist_rot, CFG)
    assert_close(speed[None], golden["action_space.main_hist_t0_v"], rel=1e-5, name="main_hist_t0_v")


def test_traj_to_action_matches_reference(golden):
    actions, states = traj_to_action(
        *_fixture_history(golden), *_fixture_future(golden), CFG, STATS, return_states=True
    )
    expected_actions = golden["action_space.traj_to_action"]
    expected_states = golden["action_space.traj_to_action_states"]
    assert_close(actions[..., 0], expected_actions[..., 0], rel=ACCEL_REL_TOL, name="traj_to_action accel")
    assert_close(
        actions[..., 1], expected_actions[..., 1], rel=CURVATURE_REL_TOL, name="traj_to_action curvature"
    )
    assert_close(states[..., 0], expected_states[..., 0], rel=1e-5, name="traj_to_action_states v")
    assert_close(
        states[..., 1], expected_states[..., 1], rel=ACCEL_REL_TOL, name="traj_to_action_states accel"
    )
    assert_close(states[..., 2], expected_states[..., 2], rel=1e-5, name="traj_to_action_states theta")


# ---------------------------------------------------------------------------------------------
# The scan rollout against the reference's formulation
# ---------------------------------------------------------------------------------------------


def _rollout_by_cumsums(actions, v0, cfg, stats):
    """SPEC §9.3 as the reference writes it: each state a sum of separate cumulative sums.
    Returns x, y, theta (..., N) at waypoints 1..N."""
    accel, kappa = unicycle.denormalize(actions, stats)
    dt, half_dt = cfg.dt, 0.5 * cfg.dt
    v = jnp.concatenate([v0[..., None], v0[..., None] + jnp.cumsum(accel * dt, axis=-1)], axis=-1)
    theta = jnp.cumsum(kappa * v[..., :-1] * dt, axis=-1) + jnp.cumsum(kappa * accel * (0.5 * dt**2), axis=-1)
    theta = jnp.concatenate([jnp.zeros_like(v0)[..., None], theta], axis=-1)

    def integrate(f):
        return jnp.cumsum(v[..., :-1] * f(theta[..., :-1]) * half_dt, axis=-1) + jnp.cumsum(
            v[..., 1:] * f(theta[..., 1:]) * half_dt, axis=-1
        )

    return integrate(jnp.cos), integrate(jnp.sin), theta[..., 1:]


@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["fixture_actions", "3x_fixture_actions"])
def test_scan_rollout_equals_cumsum_evaluation(golden, scale):
    actions = scale * golden["action_space.actions_in"]
    hist_xyz, hist_rot = _fixture_history(golden)
    xyz, rot = action_to_traj(actions, hist_xyz, hist_rot, CFG, STATS)
    x, y, theta = jax.jit(_rollout_by_cumsums, static_argnames="cfg")(
        actions, estimate_t0_states(hist_xyz, hist_rot, CFG), CFG, STATS
    )
    assert_close(xyz[..., 0], x, rel=2e-6, name="scan vs cumsum x")
    assert_close(xyz[..., 1], y, rel=2e-6, name="scan vs cumsum y")
    assert_close(
        jnp.arctan2(rot[..., 1, 0], rot[..., 0, 0]),
        jnp.arctan2(jnp.sin(theta), jnp.cos(theta)),
        rel=2e-6,
        name="scan vs cumsum yaw",
    )


# ---------------------------------------------------------------------------------------------
# Degenerate and hostile trajectories
# ---------------------------------------------------------------------------------------------


def _drive(speed: float, yaw, n_hist: int = 16, n_future: int = 64, dt: float = 0.1, substeps: int = 100):
    """Poses every dt of a vehicle moving at `speed` (negative: reversing) with heading yaw(t),
    t0 = 0 being the origin with zero heading; positions are integrated on a fine grid so they
    are consistent with the headings. Returns hist_xyz, hist_rot, fut_xyz, fut_rot (float32)."""
    step = dt / substeps
    t = np.arange(-(n_hist - 1) * substeps, n_future * substeps + 1) * step
    heading = yaw(t)
    velocity = speed * np.stack([np.cos(heading), np.sin(heading)], axis=-1)
    xy = np.concatenate([np.zeros((1, 2)), np.cumsum((velocity[1:] + velocity[:-1]) * step / 2, axis=0)])
    xy -= xy[(n_hist - 1) * substeps]
    every = slice(None, None, substeps)
    xyz = np.concatenate([xy[every], np.zeros((n_hist + n_future, 1))], axis=-1).astype(np.float32)
    rot = np.asarray(unicycle.yaw_rotation(jnp.asarray(heading[every], jnp.float32)))
    return xyz[:n_hist], rot[:n_hist], xyz[n_hist:], rot[n_hist:]


WRAP_SPEED, WRAP_YAW_RATE = 8.0, 2.5  # curvature 0.3125 1/m: the history alone turns past -π
HOSTILE = {
    "standing": _drive(0.0, lambda t: 0 * t),
    "reversing": _drive(-3.0, lambda t: 0 * t),
    "heading_wrap": _drive(WRAP_SPEED, lambda t: WRAP_YAW_RATE * t),
    "90_degree_turn": _drive(
        6.0,
        lambda t: np.pi / 2 * np.clip((t - 1.0) / 2.5, 0, 1) ** 2 * (3 - 2 * np.clip((t - 1.0) / 2.5, 0, 1)),
    ),
}
CASE = {name: i for i, name in enumerate(HOSTILE)}


@pytest.fixture(scope="module")
def hostile():
    """The four hostile cases as one batch, and traj_to_action / action_to_traj run on them."""
    hist_xyz, hist_rot, fut_xyz, fut_rot = (np.stack(a) for a in zip(*HOSTILE.values()))
    actions, states = traj_to_action(hist_xyz, hist_rot, fut_xyz, fut_rot, CFG, STATS, return_states=True)
    xyz, rot = action_to_traj(actions, hist_xyz, hist_rot, CFG, STATS)
    outputs = {"actions": actions, "states": states, "xyz": xyz, "rot": rot}
    inputs = {"hist_xyz": hist_xyz, "hist_rot": hist_rot, "fut_xyz": fut_xyz, "fut_rot": fut_rot}
    return inputs | {name: np.asarray(value) for name, value in outputs.items()}


def test_hostile_trajectories_give_finite_outputs(hostile):
    for key in ("actions", "states", "xyz", "rot"):
        for name, i in CASE.items():
            assert np.isfinite(hostile[key][i]).all(), f"{name}: non-finite {key}"


def test_hostile_trajectories_round_trip(hostile):
    """action_to_traj(traj_to_action(future)) reproduces each future within 2 cm."""
    for name, i in CASE.items():
        abs_err, _ = max_errors(hostile["xyz"][i], hostile["fut_xyz"][i])
        print(f"{name}: round-trip max abs position error {abs_err:.3e} m")
        assert abs_err <= 2e-2, f"{name}: round-trip position error {abs_err:.3e} m"


def test_standing_vehicle_stays_put(hostile):
    i = CASE["standing"]
    assert np.abs(hostile["states"][i, :, 0]).max() <= 1e-6
    assert np.abs(hostile["xyz"][i]).max() <= 1e-6


def test_reversing_gives_negative_speed(hostile):
    speeds = hostile["states"][CASE["reversing"], :, 0]
    np.testing.assert_allclose(
        speeds, -3.0, atol=1e-3, err_msg="fitted speeds of a vehicle reversing at 3 m/s"
    )


def test_heading_wrap_gives_constant_curvature(hostile):
    """Headings pass ±π in the history and several times in the future; unwrapping must keep
    the fitted curvature flat (a 2π jump would be a spike of ~80 1/m) and near the true value.
    The trapezoid speed model overestimates the speed on a circle by tan(x)/x, x = ω dt / 2,
    hence the 0.5% bias."""
    accel, curvature = unicycle.denormalize(hostile["actions"][CASE["heading_wrap"]], STATS)
    assert np.ptp(curvature) <= 1e-4, f"curvature varies by {np.ptp(curvature):.3e} 1/m"
    x = WRAP_YAW_RATE * CFG.dt / 2
    np.testing.assert_allclose(curvature, WRAP_YAW_RATE / WRAP_SPEED * x / np.tan(x), rtol=1e-3)
    np.testing.assert_allclose(accel, 0.0, atol=1e-2)


def test_quarter_turn_ends_at_ninety_degrees(hostile):
    i = CASE["90_degree_turn"]
    final_yaw = np.arctan2(hostile["rot"][i, -1, 1, 0], hostile["rot"][i, -1, 0, 0])
    assert abs(final_yaw - np.pi / 2) <= 1e-3, f"final yaw {final_yaw}"


# ---------------------------------------------------------------------------------------------
# The Cholesky retry rule
# ---------------------------------------------------------------------------------------------

solve_spd = jax.jit(solvers.solve_spd, static_argnames="ridge")
cholesky_ridge = jax.jit(solvers.cholesky_ridge, static_argnames="ridge")


@jax.jit
def _single_attempt(matrix, rhs):
    chol = solvers.cholesky(matrix + np.float32(CFG.v_ridge) * jnp.eye(matrix.shape[-1]))
    return solvers.cho_solve(chol, rhs)


def test_solve_equals_single_cholesky_when_it_succeeds(golden):
    """On the real speed systems of the fixture, the retry machinery changes no bit."""

    @jax.jit
    def speed_system(hist_xyz, hist_rot):
        theta = unicycle.unwrap_angle(unicycle.yaw_of(hist_rot))
        gram, atb = solvers.trapezoid_normal_equations(theta, jnp.diff(hist_xyz[..., :2], axis=-2), CFG.dt)
        return gram + solvers.smoothing_matrix(theta.shape[-1], 3, CFG.v_lambda, CFG.dt), atb

    matrix, atb = speed_system(*_fixture_history(golden))
    np.testing.assert_array_equal(cholesky_ridge(matrix, CFG.v_ridge), np.float32(CFG.v_ridge))
    np.testing.assert_array_equal(solve_spd(matrix, atb, CFG.v_ridge), _single_attempt(matrix, atb))


def test_cholesky_and_substitutions_match_lapack():
    """The project's own factorisation and triangular solves (no LAPACK call: see `solvers`) agree
    with LAPACK's through jnp.linalg to float32 rounding, on random SPD systems of the sizes
    `traj_to_action` solves."""
    rng = np.random.default_rng(0)
    systems = []
    for n in (16, 63, 64):
        a = rng.normal(size=(3, n, n)).astype(np.float32)
        systems.append((a @ np.swapaxes(a, -1, -2) / n + np.eye(n, dtype=np.float32), rng.normal(size=(3, n))))
    for matrix, rhs in systems:
        ours_chol = np.asarray(solvers.cholesky(jnp.asarray(matrix)))
        lapack_chol = np.asarray(jnp.linalg.cholesky(jnp.asarray(matrix)))
        ours = np.asarray(solvers.cho_solve(jnp.asarray(ours_chol), jnp.asarray(rhs, jnp.float32)))
        lapack = np.asarray(jsl.cho_solve((jnp.asarray(lapack_chol), True), jnp.asarray(rhs, jnp.float32)[..., None]))[..., 0]
        chol_error = np.abs(ours_chol - lapack_chol).max() / np.abs(lapack_chol).max()
        solve_error = np.abs(ours - lapack).max() / np.abs(lapack).max()
        print(f"n={matrix.shape[-1]}: factor relative error {chol_error:.2e}, solve {solve_error:.2e}")
        assert chol_error <= 1e-6 and solve_error <= 2e-6  # measured <= 7.9e-8 and 2.9e-7
        assert np.all(np.triu(ours_chol, 1) == 0)
    # Not positive definite: a non-finite factor, as LAPACK's, which the ridge search relies on.
    assert not np.isfinite(np.asarray(solvers.cholesky(jnp.asarray(_indefinite(-0.5))))).all()


def _indefinite(negative: float, n: int = 16) -> np.ndarray:
    """A smooth SPD matrix with one negative eigenvalue: Cholesky with a small ridge fails."""
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(n, n)))
    eigenvalues = np.linspace(1.0, 2.0, n)
    eigenvalues[3] = negative
    return ((q * eigenvalues) @ q.T).astype(np.float32)


def test_failed_factorisation_retries_with_ten_times_the_ridge():
    matrix, rhs = _indefinite(-0.05), np.ones(16, np.float32)
    assert not np.isfinite(
        np.asarray(jnp.linalg.cholesky(matrix + 1e-4 * np.eye(16, dtype=np.float32)))
    ).all()
    ridge = float(cholesky_ridge(matrix, 1e-4))
    # The first power-of-ten multiple of 1e-4 above 0.05, as the reference's ×10 loop would reach.
    assert ridge == np.float32(1e-4 * 10**3), ridge
    x = solve_spd(matrix, rhs, 1e-4)
    expected = np.linalg.solve(matrix.astype(np.float64) + ridge * np.eye(16), rhs)
    assert_close(x, expected, rel=1e-5, name="retried solve")


def test_hopeless_factorisation_falls_back_to_diagonal_dominance():
    """Beyond the last ×10 retry, the ridge that makes the matrix diagonally dominant still
    gives a finite solution of the regularised system."""
    matrix, rhs = _indefinite(-1e3), np.ones(16, np.float32)
    ridge = float(cholesky_ridge(matrix, 1e-4))
    assert ridge > 1e3 and ridge >= 1e-4 * 10**solvers.RIDGE_RETRIES, ridge
    x = solve_spd(matrix, rhs, 1e-4)
    expected = np.linalg.solve(matrix.astype(np.float64) + ridge * np.eye(16), rhs)
    assert_close(x, expected, rel=1e-5, name="diagonally dominant fallback")


# ---------------------------------------------------------------------------------------------
# Non-finite input
# ---------------------------------------------------------------------------------------------


def test_validate_trajectory_names_the_bad_array(golden):
    hist_xyz, hist_rot = _fixture_history(golden)
    unicycle.validate_trajectory(hist_xyz=hist_xyz, hist_rot=hist_rot)
    bad = hist_xyz.copy()
    bad[2, 5, 1] = np.inf
    with pytest.raises(ValueError, match=r"hist_xyz has 1 non-finite value\(s\) .* index \(2, 5, 1\)"):
        unicycle.validate_trajectory(hist_rot=hist_rot, hist_xyz=bad)


def test_non_finite_input_stays_in_its_batch_element(golden):
    """Inside jit nothing raises: a NaN or inf poisons the outputs of its own trajectory, and
    every other trajectory of the batch is computed bit for bit as without it."""
    hist_xyz, hist_rot = (a.copy() for a in _fixture_history(golden))
    fut_xyz, fut_rot = (a.copy() for a in _fixture_future(golden))
    # return_states=True only to reuse the executable compiled for the parity test.
    clean = np.asarray(
        traj_to_action(hist_xyz, hist_rot, fut_xyz, fut_rot, CFG, STATS, return_states=True)[0]
    )
    clean_xyz = np.asarray(
        action_to_traj(golden["action_space.actions_in"], hist_xyz, hist_rot, CFG, STATS)[0]
    )
    fut_xyz[1, 10, 0] = np.nan
    hist_xyz[2, 3, 1] = np.inf
    dirty = np.asarray(
        traj_to_action(hist_xyz, hist_rot, fut_xyz, fut_rot, CFG, STATS, return_states=True)[0]
    )
    dirty_xyz = np.asarray(
        action_to_traj(golden["action_space.actions_in"], hist_xyz, hist_rot, CFG, STATS)[0]
    )
    for poisoned in (1, 2):
        assert not np.isfinite(dirty[poisoned]).any()
    assert not np.isfinite(dirty_xyz[2, :, :2]).any()
    for untouched in (0, 3):
        np.testing.assert_array_equal(dirty[untouched], clean[untouched])
    np.testing.assert_array_equal(dirty_xyz[[0, 1, 3]], clean_xyz[[0, 1, 3]])


# ---------------------------------------------------------------------------------------------
# Transformations and small helpers
# ---------------------------------------------------------------------------------------------


def test_vmap_matches_batched_call(golden):
    actions = golden["action_space.actions_in"]
    hist_xyz, hist_rot = _fixture_history(golden)
    batched = action_to_traj(actions, hist_xyz, hist_rot, CFG, STATS)
    mapped = jax.jit(jax.vmap(lambda a, x, r: unicycle.action_to_traj(a, x, r, CFG, STATS)))(
        actions, hist_xyz, hist_rot
    )
    assert_close(mapped[0], batched[0], rel=1e-6, name="vmap xyz")
    assert_close(mapped[1], batched[1], rel=1e-6, name="vmap rot")


def test_gradient_of_rollout_is_finite_and_matches_finite_differences(golden):
    actions = jnp.asarray(golden["action_space.actions_in"])
    hist_xyz, hist_rot = _fixture_history(golden)

    def final_lateral(a, h):
        return jnp.sum(unicycle.action_to_traj(a, h, hist_rot, CFG, STATS)[0][..., -1, 1])

    value_and_grad = jax.jit(jax.value_and_grad(final_lateral, argnums=(0, 1)))
    _, (grad_actions, grad_hist) = value_and_grad(actions, hist_xyz)
    assert np.isfinite(grad_actions).all() and np.isfinite(grad_hist).all()
    direction = jax.random.normal(jax.random.key(0), actions.shape)
    # Central differences of a float32 rollout (positions ~50 m, rounding ~1e-5 m): the expected
    # agreement is a few 1e-4, far below what a wrong gradient would give.
    eps = 1e-2
    (plus, _), (minus, _) = (
        value_and_grad(actions + eps * direction, hist_xyz),
        value_and_grad(actions - eps * direction, hist_xyz),
    )
    finite_difference = (plus - minus) / (2 * eps)
    directional = jnp.sum(grad_actions * direction)
    assert_close(directional, finite_difference, rel=5e-3, name="directional derivative vs finite difference")


def test_is_within_bounds(golden):
    actions = golden["action_space.actions_in"].copy()
    np.testing.assert_array_equal(unicycle.is_within_bounds(actions, CFG, STATS), True)
    actions[1, 7, 0] = (CFG.accel_bounds[1] + 0.1 - CFG.accel_mean) / CFG.accel_std
    actions[3, 0, 1] = (CFG.curvature_bounds[0] - 0.01 - CFG.curvature_mean) / CFG.curvature_std
    np.testing.assert_array_equal(unicycle.is_within_bounds(actions, CFG, STATS), [True, False, True, False])


def test_unwrap_angle_recovers_a_continuous_heading():
    heading = np.linspace(-10.0, 10.0, 50, dtype=np.float32)  # steps of 0.41 rad, crosses ±π six times
    wrapped = np.arctan2(np.sin(heading), np.cos(heading))
    assert_close(unicycle.unwrap_angle(wrapped), wrapped[0] + (heading - heading[0]), rel=1e-6, name="unwrap")
