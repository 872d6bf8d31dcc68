"""The fine-tuning optimizer against the pieces of the Hugging Face Trainer it reproduces.

The schedule runs against transformers' own schedulers (stepped on a dummy torch optimizer); the
update rule against torch's AdamW with the reference's parameter groups (a 0.1 learning-rate
group, decay / no-decay splits), `clip_grad_norm_` and the Trainer's scheduler, all in float32;
gradient accumulation against the Trainer's loss scaling (each micro-batch gradient divided by k,
summed). The stage filters and the optimizer state are checked on the tiny model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alpamayo_jax.nn.variables import Buffer
from alpamayo_jax.training.optimizer import (
    TRAINABLE_MODULES,
    OptimizerConfig,
    TrainingStage,
    decay_mask,
    decays,
    learning_rate_schedule,
    lr_multiplier,
    make_optimizer,
    parameter_name,
    scale_by_lr_multiplier,
    total_optimizer_steps,
    trainable_filter,
    trainable_state,
)
from tests.parity import max_errors


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _hf_scheduler(transformers, optimizer, config: OptimizerConfig):
    """The Trainer's `create_scheduler` for this config (`lr_scheduler_kwargs: {min_lr: ...}`)."""
    return transformers.get_scheduler(
        config.schedule, optimizer,
        num_warmup_steps=config.warmup_steps, num_training_steps=config.total_steps,
        scheduler_specific_kwargs={"min_lr": config.min_learning_rate},
    )


def _names(tree) -> list[str]:
    return [parameter_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(value)
    return tree


def _flat(tree) -> dict[str, np.ndarray]:
    return {parameter_name(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_stage_presets_follow_the_reference_yaml():
    stage1 = OptimizerConfig.stage1(total_steps=930)
    assert (stage1.learning_rate, stage1.warmup_steps, stage1.min_learning_rate) == (1e-5, 500, 1e-6)
    assert stage1.lr_multipliers == (("vlm.visual", 0.1),)
    assert stage1.gradient_accumulation_steps == 4
    stage2 = OptimizerConfig.stage2(total_steps=930)
    assert (stage2.learning_rate, stage2.warmup_steps, stage2.min_learning_rate) == (1e-4, 100, 1e-6)
    assert stage2.lr_multipliers == () and stage2.gradient_accumulation_steps == 1
    for config in (stage1, stage2):
        assert (config.b1, config.b2, config.eps, config.weight_decay, config.max_grad_norm) == (
            0.9, 0.999, 1e-8, 0.0, 1.0)
        assert config.schedule == "cosine_warmup_with_min_lr"
        hash(config)
    assert OptimizerConfig.for_stage(TrainingStage.VLM, 930) == stage1
    assert OptimizerConfig.for_stage(2, 930) == stage2
    # The yaml's mapping form is stored as hashable sorted pairs.
    mapped = OptimizerConfig.stage1(930, lr_multipliers={"vlm.visual": 0.1, "vlm.lm_head": 2.0})
    assert mapped.lr_multipliers == (("vlm.lm_head", 2.0), ("vlm.visual", 0.1))
    hash(mapped)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"learning_rate": 0.0}, "learning_rate must be a positive"),
        ({"learning_rate": float("nan")}, "learning_rate must be a positive"),
        ({"total_steps": 0}, "total_steps must be an integer >= 1"),
        ({"warmup_steps": 11}, r"warmup_steps must be an integer in \[0, total_steps=10\]"),
        ({"warmup_steps": -1}, "warmup_steps must be"),
        ({"warmup_steps": 2.5}, "warmup_steps must be"),
        ({"min_learning_rate": 2e-3}, "min_learning_rate must lie in"),
        ({"b2": 1.0}, r"b2 must lie in \[0, 1\)"),
        ({"eps": -1e-8}, "eps must be >= 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm must be positive or None"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be"),
        ({"schedule": "cosine"}, "schedule must be one of"),
        ({"lr_multipliers": (("vlm.visual.", 0.1),)}, "non-empty dotted path"),
        ({"lr_multipliers": (("vlm.visual", -0.1),)}, "must be a number >= 0"),
        ({"lr_multipliers": (("vlm", 0.1), ("vlm", 0.2))}, "repeats a prefix"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    base = {"learning_rate": 1e-3, "warmup_steps": 2, "total_steps": 10}
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**{**base, **overrides})


def test_total_optimizer_steps_counts_like_the_trainer():
    # ceil(310 / 4) = 78 optimizer steps an epoch: the partial accumulation is a step of its own.
    assert total_optimizer_steps(310, num_epochs=3, gradient_accumulation_steps=4) == 234
    assert total_optimizer_steps(310) == 930
    assert total_optimizer_steps(5, num_epochs=0.5, gradient_accumulation_steps=4) == 1
    with pytest.raises(ValueError, match="batches_per_epoch >= 1"):
        total_optimizer_steps(0)


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------

SCHEDULE_CASES = [
    OptimizerConfig.stage1(total_steps=930),
    OptimizerConfig.stage2(total_steps=3000),
    OptimizerConfig.stage2(total_steps=3000, schedule="cosine_with_min_lr"),
    OptimizerConfig(learning_rate=3e-4, warmup_steps=0, total_steps=7, min_learning_rate=0.0),
    OptimizerConfig(learning_rate=3e-4, warmup_steps=5, total_steps=5, min_learning_rate=1e-5),
    OptimizerConfig(learning_rate=3e-4, warmup_steps=3, total_steps=10, schedule="cosine_with_min_lr"),
]


@pytest.mark.parametrize(
    "config", SCHEDULE_CASES, ids=lambda c: f"{c.schedule}-w{c.warmup_steps}-t{c.total_steps}"
)
def test_schedule_matches_transformers_step_for_step(config, torch, transformers):
    # Two groups, as the reference's: the base one and a vision-like one at 0.1 x the learning rate.
    optimizer = torch.optim.SGD(
        [{"params": [torch.zeros(1, requires_grad=True)]},
         {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1 * config.learning_rate}],
        lr=config.learning_rate,
    )
    scheduler = _hf_scheduler(transformers, optimizer, config)
    expected, expected_group = [], []
    for _ in range(config.total_steps):
        base, group = scheduler.get_last_lr()
        expected.append(base)
        expected_group.append(group)
        optimizer.step()
        scheduler.step()
    expected, expected_group = np.asarray(expected), np.asarray(expected_group)

    schedule = learning_rate_schedule(config)
    steps = jnp.arange(config.total_steps + 3)
    actual = np.asarray(jax.jit(jax.vmap(schedule))(steps), np.float64)
    assert np.array_equal(actual, np.asarray(jax.vmap(schedule)(steps), np.float64))
    rel = np.abs(actual[: config.total_steps] - expected) / np.maximum(np.abs(expected), 1e-30)
    rel_group = np.abs(0.1 * actual[: config.total_steps] - expected_group)
    rel_group /= np.maximum(expected_group, 1e-30)
    message = (f"max relative error {rel.max():.3e} (step {rel.argmax()}), 0.1 group {rel_group.max():.3e}, "
               f"over {config.total_steps} steps")
    print(message)
    assert rel.max() <= 1e-7 and rel_group.max() <= 1e-7, message

    lr, warmup, total = config.learning_rate, config.warmup_steps, config.total_steps
    if warmup:
        step0 = lr / warmup if config.schedule == "cosine_warmup_with_min_lr" else 0.0
        np.testing.assert_allclose(actual[0], step0, rtol=1e-7)
        peak = warmup - 1 if config.schedule == "cosine_warmup_with_min_lr" else warmup
        np.testing.assert_allclose(actual[peak], lr, rtol=1e-7)
    if config.schedule == "cosine_warmup_with_min_lr" and warmup < total:
        np.testing.assert_allclose(actual[total - 1], config.min_learning_rate, rtol=1e-7, atol=1e-12)
    # Past the run it holds the floor.
    np.testing.assert_allclose(actual[total:], config.min_learning_rate, rtol=1e-7, atol=0)


# ---------------------------------------------------------------------------------------------
# Update rule: parity with torch's AdamW, clip_grad_norm_ and the Trainer's scheduler
# ---------------------------------------------------------------------------------------------

PARITY_SHAPES = {
    "vlm.visual.blocks.0.attn.qkv.kernel": (5, 4),  # 0.1 x lr, decays
    "vlm.visual.blocks.0.attn.qkv.bias": (4,),  # 0.1 x lr, no decay
    "vlm.language_model.layers.0.mlp.up_proj.kernel": (3, 6),  # 1 x lr, decays
    "vlm.language_model.norm.scale": (6,),  # 1 x lr, no decay
}
PARITY_CONFIG = OptimizerConfig(
    learning_rate=1e-2, warmup_steps=2, total_steps=6, min_learning_rate=1e-3, weight_decay=0.1,
    max_grad_norm=1.0, lr_multipliers=(("vlm.visual", 0.1),),
)
# Global gradient norms, step by step: clipped on the steps above 1, not on the others.
GRAD_NORMS = (0.3, 4.0, 0.5, 20.0, 0.05, 2.0)


def _parity_inputs(seed: int, steps: int):
    rng = np.random.default_rng(seed)
    params = {name: rng.normal(size=shape).astype(np.float32) for name, shape in PARITY_SHAPES.items()}
    grads = []
    for norm in GRAD_NORMS[:steps]:
        g = {name: rng.normal(size=shape) for name, shape in PARITY_SHAPES.items()}
        total = np.sqrt(sum(np.sum(v**2) for v in g.values()))
        grads.append({name: (v * norm / total).astype(np.float32) for name, v in g.items()})
    return params, grads


def _torch_adamw(torch, transformers, params, config: OptimizerConfig):
    """The reference's `create_optimizer`: groups by longest multiplier prefix, each split into a
    decay group and a no-decay group, lr = learning_rate x multiplier; then the Trainer's scheduler."""
    tensors = {name: torch.nn.Parameter(torch.tensor(value)) for name, value in params.items()}
    groups: dict[tuple[float, bool], list] = {}
    for name, tensor in tensors.items():
        groups.setdefault((lr_multiplier(config.lr_multipliers, name), decays(name)), []).append(tensor)
    optimizer = torch.optim.AdamW(
        [
            {"params": ps, "lr": config.learning_rate * mult,
             "weight_decay": config.weight_decay if decay else 0.0}
            for (mult, decay), ps in groups.items()
        ],
        lr=config.learning_rate, betas=(config.b1, config.b2), eps=config.eps,
        weight_decay=config.weight_decay, foreach=False,
    )
    return tensors, optimizer, _hf_scheduler(transformers, optimizer, config)


def _torch_run(torch, transformers, params, grads, config: OptimizerConfig, accumulate: int = 1):
    """Params after each optimizer step; with `accumulate` k, each micro-batch gradient is divided by
    k and summed into `.grad`, as the Trainer's `loss / k` does."""
    tensors, optimizer, scheduler = _torch_adamw(torch, transformers, params, config)
    history = []
    for start in range(0, len(grads), accumulate):
        for micro in grads[start : start + accumulate]:
            for name, tensor in tensors.items():
                g = torch.tensor(micro[name]) / accumulate
                tensor.grad = g if tensor.grad is None else tensor.grad + g
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(tensors.values()), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({name: tensor.detach().numpy().copy() for name, tensor in tensors.items()})
    return history


def _jax_run(params, grads, config: OptimizerConfig, tx: optax.GradientTransformation | None = None):
    """Params after each call of `tx.update` (micro-steps included)."""
    tx = make_optimizer(config) if tx is None else tx
    state = tx.init(_nest(params))

    @jax.jit
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    p, history = _nest(params), []
    for g in grads:
        p, state = step(p, state, _nest(g))
        history.append(_flat(p))
    return history


def _compare(actual_history, expected_history) -> float:
    """max over steps and leaves of max|a - e| / max|e|. (The params are compared, not their
    per-step changes: torch hands back only the rounded float32 params, and a change of 1e-4 on a
    param of 1 is known to a few 1e-3 of itself from them.)"""
    err = 0.0
    for actual, expected in zip(actual_history, expected_history, strict=True):
        for name in expected:
            err = max(err, max_errors(actual[name], expected[name])[1])
    return err


@pytest.mark.parametrize("max_grad_norm", [1.0, None], ids=["clipped", "unclipped"])
def test_update_matches_torch_adamw_with_param_groups(max_grad_norm, torch, transformers):
    config = dataclasses.replace(PARITY_CONFIG, max_grad_norm=max_grad_norm)
    params, grads = _parity_inputs(seed=0, steps=config.total_steps)
    expected = _torch_run(torch, transformers, params, grads, config)
    actual = _jax_run(params, grads, config)
    err = _compare(actual, expected)
    message = f"{config.total_steps} steps: params max relative error {err:.3e}"
    print(message)
    assert err <= 1e-6, message

    # Each ingredient moves the params far beyond that tolerance: the test can see all of them.
    variants = {
        "no multiplier": dataclasses.replace(config, lr_multipliers=()),
        "no weight decay": dataclasses.replace(config, weight_decay=0.0),
        "other clipping": dataclasses.replace(config, max_grad_norm=None if max_grad_norm else 1.0),
    }
    for label, variant in variants.items():
        err = _compare(_jax_run(params, grads, variant), expected)
        print(f"{label}: params max relative error {err:.3e}")
        assert err > 1e-4, f"{label}: {err:.3e}"


def test_multiplier_scales_learning_rate_and_weight_decay_of_its_leaves_only():
    """With zero gradients AdamW's update is pure decay, -lr x wd x p: the 0.1 leaves move 0.1 as far."""
    params, _ = _parity_inputs(seed=1, steps=0)
    zeros = [{name: np.zeros_like(v) for name, v in params.items()}]
    config = dataclasses.replace(PARITY_CONFIG, max_grad_norm=None)
    (after,) = _jax_run(params, zeros, config)
    lr0 = float(learning_rate_schedule(config)(0))
    for name, p in params.items():
        decay = lr_multiplier(config.lr_multipliers, name) * config.weight_decay * decays(name)
        expected = p * (1 - lr0 * decay)
        err = max_errors(after[name], expected)[1]
        assert err <= 1e-7, f"{name}: {err:.3e}"


# ---------------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------------


def test_gradient_accumulation_applies_the_clipped_mean(torch, transformers):
    k, steps = 4, 3
    config_k = dataclasses.replace(
        PARITY_CONFIG, warmup_steps=1, total_steps=steps, gradient_accumulation_steps=k
    )
    config_1 = dataclasses.replace(config_k, gradient_accumulation_steps=1)
    rng = np.random.default_rng(2)
    params, _ = _parity_inputs(seed=2, steps=0)
    micro, means = [], []
    # Micro-batch gradients of norm ~6 around a mean of norm 0.5, 3, 0.8: per-micro-batch clipping
    # would shrink each of them, clipping the mean only clips the second step.
    for mean_norm in (0.5, 3.0, 0.8):
        center = {n: rng.normal(size=s) for n, s in PARITY_SHAPES.items()}
        scale = mean_norm / np.sqrt(sum(np.sum(v**2) for v in center.values()))
        spread = [{n: rng.normal(size=s) * 3.0 for n, s in PARITY_SHAPES.items()} for _ in range(k)]
        offsets = {n: np.mean([d[n] for d in spread], axis=0) for n in PARITY_SHAPES}
        batch = [{n: (center[n] * scale + d[n] - offsets[n]).astype(np.float32) for n in PARITY_SHAPES}
                 for d in spread]
        micro += batch
        means.append({n: np.mean([g[n] for g in batch], axis=0, dtype=np.float64).astype(np.float32)
                      for n in PARITY_SHAPES})

    accumulated = _jax_run(params, micro, config_k)
    for i, p in enumerate(accumulated):  # between optimizer steps the params do not move
        if i % k != k - 1:
            reference = params if i < k else accumulated[i - i % k - 1]
            assert all(np.array_equal(p[n], reference[n]) for n in params), f"micro-step {i} moved the params"
    accumulated = accumulated[k - 1 :: k]

    one_step = _jax_run(params, means, config_1)
    torch_run = _torch_run(torch, transformers, params, micro, config_k, accumulate=k)
    err_mean = _compare(accumulated, one_step)
    err_torch = _compare(accumulated, torch_run)
    message = f"MultiSteps vs one step on the mean: {err_mean:.3e}; vs torch with loss / {k}: {err_torch:.3e}"
    print(message)
    assert err_mean <= 1e-6 and err_torch <= 1e-6, message

    # Clipping each micro-batch gradient instead would be visibly different.
    per_micro = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.MultiSteps(
            make_optimizer(dataclasses.replace(config_1, max_grad_norm=None)), k
        ).gradient_transformation(),
    )
    err_wrong = _compare(_jax_run(params, micro, config_k, tx=per_micro)[k - 1 :: k], torch_run)
    print(f"clipping per micro-batch: {err_wrong:.3e}")
    assert err_wrong > 1e-4


# ---------------------------------------------------------------------------------------------
# Parameter paths, multipliers, weight-decay mask
# ---------------------------------------------------------------------------------------------


def test_multipliers_take_the_longest_whole_component_prefix():
    rules = (("a", 0.5), ("a.b", 0.25))
    assert lr_multiplier(rules, "a.b.kernel") == 0.25
    assert lr_multiplier(rules, "a.c.kernel") == 0.5
    assert lr_multiplier(rules, "ab.kernel") == 1.0
    assert lr_multiplier(rules, "a") == 0.5
    assert lr_multiplier((), "a.b") == 1.0

    tree = {"a": {"b": {"kernel": jnp.ones(2)}, "c": {"kernel": jnp.ones(2)}}, "ab": {"kernel": jnp.ones(2)}}
    state = nnx.State(jax.tree.map(nnx.Param, tree))
    tx = scale_by_lr_multiplier(rules)
    expected = {"a.b.kernel": 0.25, "a.c.kernel": 0.5, "ab.kernel": 1.0}
    for flavour in (tree, state, nnx.as_pure(state)):
        scaled, _ = jax.jit(tx.update)(flavour, tx.init(flavour))
        assert {n: float(v[0]) for n, v in _flat(scaled).items()} == expected, type(flavour)


def test_decay_mask_follows_the_trainer_parameter_groups(tiny_model):
    names = _names(nnx.state(tiny_model, nnx.Param))
    no_decay = {n for n in names if not decays(n)}
    for name in names:
        last = name.rsplit(".", 1)[1]
        if last in ("kernel", "embedding"):
            assert name not in no_decay, name
        elif last == "bias":
            assert name in no_decay, name
    # Norm weights: by name (layernorm, q_norm, norm) or, for the vision blocks' LayerNorms, by type.
    assert {
        "vlm.language_model.layers.0.input_layernorm.scale",
        "vlm.language_model.layers.0.self_attn.q_norm.scale",
        "vlm.language_model.norm.scale", "vlm.visual.blocks.0.norm1.scale", "vlm.visual.merger.norm.scale",
        "action_in_proj.norm.scale", "expert.norm.scale",
    } <= no_decay
    # The action encoder's RMSNorm is a plain module named `trunk.{i}`: the reference decays it.
    trunk_norm = "action_in_proj.encoder.trunk.2.scale"
    assert trunk_norm in names and trunk_norm not in no_decay
    mask = decay_mask(nnx.as_pure(trainable_state(tiny_model, TrainingStage.EXPERT)))
    assert {n for n, m in _flat(mask).items() if not m} == {n for n in no_decay if not n.startswith("vlm.")}


# ---------------------------------------------------------------------------------------------
# Stages on the tiny model
# ---------------------------------------------------------------------------------------------


def _param_count(model, modules) -> int:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return sum(v.get_value().size for path, v in flat if path[0] in modules)


@pytest.mark.parametrize("stage", list(TrainingStage), ids=lambda s: s.name)
def test_trainable_filter_selects_the_stage_modules(tiny_model, stage):
    state = trainable_state(tiny_model, stage)
    flat = nnx.to_flat_state(state)
    modules = TRAINABLE_MODULES[stage]
    assert flat and all(path[0] in modules for path, _ in flat)
    assert all(type(v) is nnx.Param for _, v in flat)
    assert sum(v.get_value().size for _, v in flat) == _param_count(tiny_model, modules)
    # Buffers under a trained module stay out (the action encoder's Fourier frequencies).
    buffers = {p for p, _ in nnx.to_flat_state(nnx.state(tiny_model, Buffer))}
    assert ("action_in_proj", "sinus") in {p[:2] for p in buffers}
    assert not buffers & {p for p, _ in flat}
    # The same filter through nnx.DiffState.
    grads = nnx.grad(lambda m: sum(jnp.sum(x) for x in jax.tree.leaves(nnx.state(m, nnx.Param))),
                     argnums=nnx.DiffState(0, trainable_filter(stage)))(tiny_model)
    assert jax.tree.structure(grads) == jax.tree.structure(state)


def test_stage2_optimizer_state_holds_only_trainable_leaves(tiny_model):
    params = trainable_state(tiny_model, TrainingStage.EXPERT)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == _param_count(tiny_model, ("expert", "action_in_proj", "action_out_proj"))
    state = make_optimizer(OptimizerConfig.stage2(total_steps=1000)).init(params)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    assert not [jax.tree_util.keystr(p) for p, _ in leaves if "'vlm'" in jax.tree_util.keystr(p)]
    arrays = [leaf for _, leaf in leaves if leaf.ndim > 0]
    counters = [leaf for _, leaf in leaves if leaf.ndim == 0]
    assert sum(a.size for a in arrays) == 2 * n  # Adam's mu and nu
    assert len(counters) <= 3 and all(jnp.issubdtype(c.dtype, jnp.integer) for c in counters)

    # Stage 1 (with MultiSteps) holds mu, nu and the accumulated gradient of the VLM only.
    vlm = trainable_state(tiny_model, TrainingStage.VLM)
    state1 = make_optimizer(OptimizerConfig.stage1(total_steps=1000)).init(vlm)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state1)[0]]
    assert not [name for name in names if "'expert'" in name or "'action_" in name]
    n_vlm = sum(x.size for x in jax.tree.leaves(vlm))
    assert sum(x.size for x in jax.tree.leaves(state1) if x.ndim > 0) == 3 * n_vlm


def test_jitted_train_step_moves_only_the_trainable_parameters(tiny_model):
    stage = TrainingStage.EXPERT
    filt = trainable_filter(stage)
    config = OptimizerConfig.stage2(total_steps=10, learning_rate=1e-2, warmup_steps=1, weight_decay=0.1,
                                    lr_multipliers=(("expert", 0.1),))
    tx = make_optimizer(config)

    def loss_fn(model):
        # Touches every parameter and buffer, so only the filter keeps the VLM's gradients out.
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Any(nnx.Param, Buffer))))

    @nnx.jit
    def train_step(model, opt_state):
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, filt))(model)
        params = nnx.state(model, filt)
        updates, opt_state = tx.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return opt_state

    model = nnx.clone(tiny_model)
    before = {n: np.asarray(v) for n, v in _flat(nnx.state(model)).items()}
    opt_state = tx.init(trainable_state(model, stage))
    opt_state = train_step(model, opt_state)
    after = _flat(nnx.state(model))
    trainable = set(_flat(trainable_state(model, stage)))
    for name, value in after.items():
        moved = not np.array_equal(value, before[name])
        assert moved == (name in trainable), f"{name}: moved={moved}"

    # nnx.Optimizer over the same filter (pure-array paths) takes the same step. Steps are ~1e-2
    # (1e-3 under `expert`, so a lost multiplier shows); where a step nearly cancels its param, the
    # eager-versus-jit rounding of ~1e-9 is large relative to the result, hence atol 1e-7.
    other = nnx.clone(tiny_model)
    optimizer = nnx.Optimizer(other, tx, wrt=filt)
    optimizer.update(other, nnx.grad(loss_fn, argnums=nnx.DiffState(0, filt))(other))
    for name, value in _flat(nnx.state(other)).items():
        np.testing.assert_allclose(value, after[name], rtol=1e-6, atol=1e-7, err_msg=name)
