"""Config parsing: presets load, every kind of bad field is rejected with a named error, and every
constructor argument of the reference classes is honoured, rejected with a reason, or ignored."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpamayo_jax.action.tokenizers import encode_history
from alpamayo_jax.config import (
    IGNORED_FIELDS,
    ActionInProjConfig,
    ActionSpaceConfig,
    AlpamayoConfig,
    ConfigError,
    DecoderConfig,
    FlowMatchingConfig,
    HistoryTokenizerConfig,
    TextConfig,
    alpamayo_r1_10b,
    load_preset_json,
    tiny,
)
from alpamayo_jax.inference.flow_matching import flow_matching_loss, sample_timesteps

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "tiny_ar1_dev"


@pytest.fixture
def real_dicts():
    """A synthetic copy of the 10B `config.json` (SPEC §0) and of the Qwen3-VL-8B backbone config."""
    return load_preset_json("alpamayo_r1_10b"), load_preset_json("qwen3_vl_8b_backbone")


def test_10b_preset_matches_spec():
    config = alpamayo_r1_10b()
    text, vision, expert = config.text, config.vision, config.expert
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (4096, 12288, 36)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (32, 8, 128)
    assert text.vocab_size == 155697 and text.rope_theta == 5e6 and text.mrope_section == (24, 20, 20)
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.head_dim) == (27, 1152, 16, 72)
    assert vision.deepstack_visual_indexes == (8, 16, 24) and vision.patch_dim == 1536
    assert (expert.hidden_size, expert.intermediate_size, expert.num_attention_heads) == (2048, 8256, 16)
    assert (expert.num_hidden_layers, expert.num_key_value_heads, expert.head_dim) == (36, 8, 128)
    assert expert.num_key_value_groups == 2
    assert config.history_token_start_idx == 154669
    assert config.traj_token_ids.future_start == 155681
    assert config.flow_matching.num_inference_steps == 10
    assert config.action_space.accel_std == pytest.approx(0.6810426736454882)


def test_tiny_preset_is_the_fixture_config(fixture_dir):
    config = tiny()
    from_fixture = AlpamayoConfig.from_hf_config(
        json.loads((fixture_dir / "hf" / "config.json").read_text()),
        json.loads((fixture_dir / "vlm" / "config.json").read_text()),
    )
    assert config == from_fixture
    assert config.text.vocab_size == 778  # the resized embedding, not the backbone's 512
    assert (config.expert.hidden_size, config.expert.num_attention_heads) == (48, 6)
    assert config.future_tokenizer.num_bins == 96 and config.history_tokenizer.num_bins == 160


def test_configs_are_frozen_and_hashable():
    config = tiny()
    with pytest.raises(AttributeError):
        config.text.hidden_size = 1  # type: ignore[misc]
    assert hash(config) == hash(tiny())


@pytest.mark.parametrize(
    "where, field",
    [
        ("top", "surprise_field"),
        ("expert_cfg", "rope_flavour"),
        ("expert_cfg", "mrope_section"),  # transformers reads it from rope_scaling only
        ("hist_traj_tokenizer_cfg", "ego_xyz_mid"),
        ("action_space_cfg", "jerk_lambda"),
        ("backbone", "audio_config"),
        ("text_config", "sliding_window"),
        ("vision_config", "window_size"),
    ],
)
def test_unknown_field_is_named(real_dicts, where, field):
    config, backbone = copy.deepcopy(real_dicts)
    target = {"top": config, "backbone": backbone, "text_config": backbone["text_config"],
              "vision_config": backbone["vision_config"]}.get(where, config.get(where))
    target[field] = 1
    with pytest.raises(ConfigError, match=f"unknown field.*{field}"):
        AlpamayoConfig.from_hf_config(config, backbone)


@pytest.mark.parametrize(
    "path",
    [("vocab_size",), ("action_in_proj_cfg",), ("hist_traj_tokenizer_cfg",),
     ("traj_token_ids", "future_start"), ("traj_tokenizer_cfg", "num_bins"), ("traj_tokenizer_cfg", "dims_min"),
     ("backbone", "text_config", "num_key_value_heads"), ("backbone", "vision_config", "depth")],
)
def test_missing_required_field_is_named(real_dicts, path):
    config, backbone = copy.deepcopy(real_dicts)
    container = backbone if path[0] == "backbone" else config
    keys = path[1:] if path[0] == "backbone" else path
    for key in keys[:-1]:
        container = container[key]
    del container[keys[-1]]
    with pytest.raises(ConfigError, match=f"missing required field '{keys[-1]}'"):
        AlpamayoConfig.from_hf_config(config, backbone)


@pytest.mark.parametrize(
    "override, named",
    [({"num_hidden_layers": 12}, "num_hidden_layers"),
     ({"num_key_value_heads": 4}, "num_key_value_heads"),
     ({"head_dim": 64}, "head_dim")],
)
def test_expert_must_share_cache_geometry(real_dicts, override, named):
    config, backbone = copy.deepcopy(real_dicts)
    config["expert_cfg"].update(override)
    with pytest.raises(ConfigError, match=named):
        AlpamayoConfig.from_hf_config(config, backbone)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c, b: c.update(model_type="llama"), "model_type"),
        (lambda c, b: c["action_in_proj_cfg"].update(_target_="x.PerWaypointActionInProj"), "_target_"),
        (lambda c, b: c["diffusion_cfg"].update(int_method="rk4"), "euler"),
        (lambda c, b: c.update(vocab_size="many"), "must be int"),
        (lambda c, b: b["text_config"]["rope_scaling"].update(mrope_interleaved=False), "interleaved"),
        (lambda c, b: b["text_config"].update(num_key_value_heads=7), "multiple"),
        (lambda c, b: b["vision_config"].update(out_hidden_size=1024), "out_hidden_size"),
        (lambda c, b: b.update(tie_word_embeddings=True), "tie_word_embeddings"),
        (lambda c, b: c.update(expert_non_causal_attention=False), "non_causal"),
        (lambda c, b: c.update(traj_vocab_size=3999), "traj_vocab_size"),
        (lambda c, b: c["hist_traj_tokenizer_cfg"].update(predict_yaw=True), "predict_yaw"),
        (lambda c, b: c["hist_traj_tokenizer_cfg"].update(ego_xyz_min=[-4, -4]), "ego_xyz_min"),
        (lambda c, b: c["hist_traj_tokenizer_cfg"].update(ego_xyz_min=[5, 5, 5]), "ego_xyz"),
        (lambda c, b: c["diffusion_cfg"].update(train_timestep_sampler="logit_normal"),
         "train_timestep_sampler"),
        (lambda c, b: c.update(hist_traj_tokenizer_cfg=None), "hist_traj_tokenizer_cfg.*future tokenizer"),
        (lambda c, b: c.update(traj_tokenizer_cfg=None), "traj_tokenizer_cfg"),
        (lambda c, b: c.update(add_special_tokens=False), "add_special_tokens"),
        (lambda c, b: c.pop("add_special_tokens"), "add_special_tokens"),
        (lambda c, b: c.update(vlm_backend="qwenvl2_5"), "vlm_backend"),
        (lambda c, b: c["expert_cfg"].update(attention_bias=True), "expert_cfg: attention_bias"),
        (lambda c, b: b["text_config"].update(attention_dropout=0.1), "attention_dropout"),
        (lambda c, b: b["text_config"].update(tie_word_embeddings=True), "tie_word_embeddings"),
    ],
)
def test_inconsistent_or_unsupported_values_are_rejected(real_dicts, mutate, message):
    config, backbone = copy.deepcopy(real_dicts)
    mutate(config, backbone)
    with pytest.raises(ConfigError, match=message):
        AlpamayoConfig.from_hf_config(config, backbone)


def test_ignored_fields_are_listed_in_one_place(real_dicts):
    config, backbone = real_dicts
    # Every top-level field of the real configs is either parsed or listed as ignored; dropping
    # the ignored ones must not change the result.
    stripped = {k: v for k, v in config.items() if k not in IGNORED_FIELDS["alpamayo_r1"]}
    stripped_backbone = {k: v for k, v in backbone.items() if k not in IGNORED_FIELDS["qwen3_vl"]}
    assert AlpamayoConfig.from_hf_config(stripped, stripped_backbone) == alpamayo_r1_10b()


# ---------------------------------------------------------------------------------------------
# Every constructor argument is honoured, rejected with a reason, or ignored
# ---------------------------------------------------------------------------------------------

HONOURED, REJECTED, IGNORED = "honoured", "rejected", "ignored"

# The constructor parameters of each class that the two config files describe, written out from
# NVlabs/alpamayo at commit 1cba38c and transformers 4.57.1, plus (marked "saved") the attributes
# and PretrainedConfig keys that real files carry. Each has a valid sample value other than the
# tiny fixture's (and than the reference default, where that differs from the fixture), and the
# expected outcome. A third entry, if any, holds the other edits {(section, field): value} that
# the sample needs to stay consistent. Hydra sections are sampled as null (the reference
# default); their contents have rows of their own.
DEEPER_ROPE = {"rope_type": "default", "mrope_section": [8, 4, 4], "mrope_interleaved": True}
OTHER_ROPE = {"rope_type": "default", "mrope_section": [6, 1, 1], "mrope_interleaved": True}
ACTION_SPACE_ROWS = {  # UnicycleAccelCurvatureActionSpace.__init__
    "accel_mean": (0.1, HONOURED),
    "accel_std": (0.5, HONOURED),
    "curvature_mean": (0.002, HONOURED),
    "curvature_std": (0.05, HONOURED),
    "accel_bounds": ([-5.0, 5.0], HONOURED),
    "curvature_bounds": ([-0.3, 0.3], HONOURED),
    "dt": (0.2, HONOURED),
    "n_waypoints": (32, HONOURED),
    "theta_lambda": (1e-5, HONOURED),
    "theta_ridge": (1e-7, HONOURED),
    "v_lambda": (1e-5, HONOURED),
    "v_ridge": (1e-3, HONOURED),
    "a_lambda": (1e-3, HONOURED),
    "a_ridge": (1e-3, HONOURED),
    "kappa_lambda": (1e-3, HONOURED),
    "kappa_ridge": (1e-3, HONOURED),
}
TEXT_ROWS = {  # Qwen3VLTextConfig.__init__, then PretrainedConfig keys
    "vocab_size": (600, IGNORED),
    "hidden_size": (48, HONOURED, {("vision_config", "out_hidden_size"): 48}),
    "intermediate_size": (96, HONOURED),
    "num_hidden_layers": (4, HONOURED),
    "num_attention_heads": (8, HONOURED),
    "num_key_value_heads": (1, HONOURED),
    "head_dim": (32, HONOURED, {("text_config", "rope_scaling"): DEEPER_ROPE}),
    "hidden_act": ("gelu", REJECTED),
    "max_position_embeddings": (8192, IGNORED),
    "initializer_range": (0.01, IGNORED),
    "rms_norm_eps": (1e-5, HONOURED),
    "use_cache": (False, IGNORED),
    "tie_word_embeddings": (True, REJECTED),
    "rope_theta": (1e6, HONOURED),
    "rope_scaling": (OTHER_ROPE, HONOURED),
    "attention_bias": (True, REJECTED),
    "attention_dropout": (0.1, REJECTED),
    "bos_token_id": (481, IGNORED),  # saved
    "eos_token_id": (483, HONOURED),  # saved
    "pad_token_id": (0, IGNORED),  # saved
    "model_type": ("qwen3", REJECTED),  # saved
    "dtype": ("bfloat16", IGNORED),  # saved
    "torch_dtype": ("bfloat16", IGNORED),  # saved
}
# expert_cfg: each key is set on a copy of the backbone's text config (AlpamayoR1.__init__).
EXPERT_ROWS = {
    **TEXT_ROWS,
    "vocab_size": (600, IGNORED),
    "hidden_size": (40, HONOURED),
    "intermediate_size": (80, HONOURED),
    "num_hidden_layers": (4, REJECTED),
    "num_attention_heads": (4, HONOURED),
    "num_key_value_heads": (1, REJECTED),
    "head_dim": (32, REJECTED, {("expert_cfg", "rope_scaling"): DEEPER_ROPE}),
    "tie_word_embeddings": (True, IGNORED),
    "eos_token_id": (483, IGNORED),
}
TABLE: dict[str, dict[str, tuple]] = {
    "config.json": {
        # AlpamayoR1Config.__init__
        "diffusion_cfg": (None, REJECTED),
        "action_space_cfg": (None, REJECTED),
        "action_in_proj_cfg": (None, REJECTED),
        "action_out_proj_cfg": (None, REJECTED),
        "expert_cfg": (None, HONOURED),  # no overrides: the expert copies the text decoder
        "keep_same_dtype": (False, REJECTED),
        "expert_non_causal_attention": (False, REJECTED),
        # ReasoningVLAConfig.__init__
        "vlm_name_or_path": ("Qwen/Qwen3-VL-2B-Instruct", IGNORED),
        "vlm_backend": ("qwenvl2_5", REJECTED),
        "traj_tokenizer_cfg": (None, REJECTED),
        "hist_traj_tokenizer_cfg": (None, REJECTED),
        "traj_vocab_size": (260, HONOURED),
        "tokens_per_history_traj": (30, HONOURED),
        "tokens_per_future_traj": (32, HONOURED),
        "model_dtype": ("bfloat16", IGNORED),
        "attn_implementation": ("eager", IGNORED),
        "min_pixels": (1536, HONOURED),
        "max_pixels": (4096, HONOURED),
        "add_special_tokens": (False, REJECTED),
        # computed by ReasoningVLAConfig from the extended tokenizer, and saved
        "vocab_size": (800, HONOURED),
        "traj_token_start_idx": (495, HONOURED),
        "traj_token_ids": ({"history_start": 755, "history_end": 757, "future_start": 762,
                            "future_end": 764, "history": 765, "future": 767}, HONOURED),
        # saved: PretrainedConfig keys and stray keys of the released config
        "model_type": ("alpamayo_reasoning_vla", REJECTED),
        "architectures": (["ReasoningVLA"], IGNORED),
        "transformers_version": ("4.56.0", IGNORED),
        "dtype": ("bfloat16", IGNORED),
        "torch_dtype": ("bfloat16", IGNORED),
        "image_height": (320, IGNORED),
        "image_width": (512, IGNORED),
        "hist_traj_embed_cfg": ({}, IGNORED),
    },
    "hist_traj_tokenizer_cfg": {  # DeltaTrajectoryTokenizer.__init__
        "ego_xyz_min": ([-5.0, -5.0, -12.0], HONOURED),
        "ego_xyz_max": ([5.0, 5.0, 12.0], HONOURED),
        "ego_yaw_min": (-1.0, IGNORED),
        "ego_yaw_max": (1.0, IGNORED),
        "num_bins": (150, HONOURED),
        "predict_yaw": (True, REJECTED),
        "load_weights": (True, IGNORED),
    },
    "traj_tokenizer_cfg": {  # DiscreteTrajectoryTokenizer.__init__ (+ load_weights, passed by the reference)
        "action_space_cfg": (None, REJECTED),
        "dims_min": ([-8.0, -8.0], HONOURED),
        "dims_max": ([8.0, 8.0], HONOURED),
        "num_bins": (90, HONOURED),
        "load_weights": (True, IGNORED),
    },
    "traj_tokenizer_cfg.action_space_cfg": ACTION_SPACE_ROWS,
    "action_space_cfg": ACTION_SPACE_ROWS,
    "action_in_proj_cfg": {  # PerWaypointActionInProjV2.__init__
        "in_dims": ([64, 2], IGNORED),
        "out_dim": (48, IGNORED),
        "num_enc_layers": (3, HONOURED),
        "hidden_size": (40, HONOURED),
        "max_freq": (50.0, HONOURED),
        "num_fourier_feats": (12, HONOURED),
    },
    "action_out_proj_cfg": {  # torch.nn.Linear.__init__
        "in_features": (48, IGNORED),
        "out_features": (2, IGNORED),
        "bias": (False, REJECTED),
        "device": ("cuda", IGNORED),
        "dtype": ("bfloat16", IGNORED),
    },
    "diffusion_cfg": {  # FlowMatching.__init__ and BaseDiffusion.__init__
        "x_dims": ([64, 2], IGNORED),
        "int_method": ("midpoint", REJECTED),
        "train_timestep_sampler": ("uniform", HONOURED),
        "num_inference_steps": (5, HONOURED),
        "train_ignore_guidance_rate": (0.2, IGNORED),
        "inference_guidance_weight": (2.0, IGNORED),
    },
    "expert_cfg": EXPERT_ROWS,
    "backbone config.json": {  # Qwen3VLConfig.__init__, then PretrainedConfig keys
        "text_config": (None, REJECTED),
        "vision_config": (None, REJECTED),
        "image_token_id": (491, HONOURED),
        "video_token_id": (400, IGNORED),
        "vision_start_token_id": (488, HONOURED),
        "vision_end_token_id": (487, HONOURED),
        "tie_word_embeddings": (True, REJECTED),
        "model_type": ("qwen2_5_vl", REJECTED),
        "architectures": (["Qwen3VLModel"], IGNORED),
        "transformers_version": ("4.56.0", IGNORED),
        "dtype": ("bfloat16", IGNORED),
        "torch_dtype": ("bfloat16", IGNORED),
    },
    "text_config": TEXT_ROWS,
    "vision_config": {  # Qwen3VLVisionConfig.__init__, then PretrainedConfig keys
        "depth": (4, HONOURED),
        "hidden_size": (48, HONOURED),
        "hidden_act": ("gelu", REJECTED),
        "intermediate_size": (96, HONOURED),
        "num_heads": (4, HONOURED),
        "in_channels": (1, HONOURED),
        "patch_size": (16, HONOURED),
        "spatial_merge_size": (1, HONOURED),
        "temporal_patch_size": (1, HONOURED),
        "out_hidden_size": (48, HONOURED, {("text_config", "hidden_size"): 48}),
        "num_position_embeddings": (64, HONOURED),
        "deepstack_visual_indexes": ([1, 2], HONOURED),
        "initializer_range": (0.01, IGNORED),
        "model_type": ("qwen2_vl", IGNORED),
        "dtype": ("bfloat16", IGNORED),
        "torch_dtype": ("bfloat16", IGNORED),
    },
}

# Which IGNORED_FIELDS sections apply to each table section.
IGNORED_SECTIONS = {
    "config.json": ("alpamayo_r1",),
    "backbone config.json": ("qwen3_vl",),
    "text_config": ("qwen3_vl_text",),
    "vision_config": ("qwen3_vl_vision",),
    "expert_cfg": ("qwen3_vl_text", "expert_cfg"),
    "traj_tokenizer_cfg.action_space_cfg": (),
    "action_space_cfg": (),
}


def _ignored(section: str) -> dict[str, str]:
    names = IGNORED_SECTIONS.get(section, (section,))
    return {k: v for name in names for k, v in IGNORED_FIELDS.get(name, {}).items()}


def _fixture_dicts() -> tuple[dict, dict]:
    return (json.loads((FIXTURE_DIR / "hf" / "config.json").read_text()),
            json.loads((FIXTURE_DIR / "vlm" / "config.json").read_text()))


def _section_dict(config: dict, backbone: dict, section: str) -> dict:
    if section == "config.json":
        return config
    if section == "backbone config.json":
        return backbone
    if section in ("text_config", "vision_config"):
        return backbone[section]
    container = config
    for key in section.split("."):
        container = container[key]
    return container


def _classify(section: str, name: str, row: tuple, base: AlpamayoConfig) -> tuple[str, str]:
    """What parsing the fixture with this row's sample does: (outcome, reason or message)."""
    value, _, *others = row
    config, backbone = _fixture_dicts()
    for (other_section, other_name), other_value in (others[0] if others else {}).items():
        _section_dict(config, backbone, other_section)[other_name] = copy.deepcopy(other_value)
    _section_dict(config, backbone, section)[name] = copy.deepcopy(value)
    ignored = _ignored(section)
    where = f"{section}.{name} = {value!r}"
    try:
        parsed = AlpamayoConfig.from_hf_config(config, backbone)
    except ConfigError as error:
        message = str(error)
        assert "unknown field" not in message, f"{where}: unaccounted for ({message})"
        assert name in message, f"{where}: the error does not name the field: {message}"
        assert name not in ignored, f"{where}: listed as ignored but rejected: {message}"
        return REJECTED, message
    if parsed == base:
        assert name in ignored, f"{where}: parsed with no effect, yet not listed in IGNORED_FIELDS"
        return IGNORED, ignored[name]
    assert name not in ignored, f"{where}: listed in IGNORED_FIELDS but changes the parsed config"
    return HONOURED, ""


def test_every_constructor_argument_is_honoured_rejected_or_ignored():
    base = AlpamayoConfig.from_hf_config(*_fixture_dicts())
    lines, wrong = [], []
    for section, rows in TABLE.items():
        for name, row in rows.items():
            outcome, why = _classify(section, name, row, base)
            lines.append(f"| {section} | {name} | {outcome} | {why} |")
            if outcome != row[1]:
                wrong.append(f"{section}.{name}: expected {row[1]}, got {outcome} ({why})")
    print("\n| section | field | outcome | why |\n|---|---|---|---|\n" + "\n".join(lines))
    assert not wrong, "\n".join(wrong)


def test_ignored_fields_all_have_rows():
    """IGNORED_FIELDS lists nothing that the table does not exercise."""
    for ignored_section in IGNORED_FIELDS:
        rows = {name for section, names in IGNORED_SECTIONS.items() if ignored_section in names
                for name in TABLE[section]}
        rows |= set(TABLE.get(ignored_section, {}))
        assert set(IGNORED_FIELDS[ignored_section]) <= rows, ignored_section


def test_table_has_every_transformers_constructor_argument():
    transformers = pytest.importorskip("transformers")
    if transformers.__version__ != "4.57.1":
        pytest.skip(f"the table was written from transformers 4.57.1, found {transformers.__version__}")
    import inspect

    from transformers.models.qwen3_vl import configuration_qwen3_vl as qwen3_vl

    for section, cls in (("backbone config.json", qwen3_vl.Qwen3VLConfig),
                         ("text_config", qwen3_vl.Qwen3VLTextConfig),
                         ("expert_cfg", qwen3_vl.Qwen3VLTextConfig),
                         ("vision_config", qwen3_vl.Qwen3VLVisionConfig)):
        parameters = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        assert parameters <= set(TABLE[section]), (section, parameters - set(TABLE[section]))


# ---------------------------------------------------------------------------------------------
# Values other than the fixture's take effect
# ---------------------------------------------------------------------------------------------


def _reference_history_bins(xyz: np.ndarray, lo, hi, num_bins: int) -> np.ndarray:
    """The reference DeltaTrajectoryTokenizer restated: per-step deltas after a zero point,
    q = clip(round_half_even((d - min) / (max - min) * (num_bins - 1)), 0, num_bins - 1)."""
    xyz = xyz.astype(np.float32)
    deltas = np.diff(np.concatenate([np.zeros((1, 3), np.float32), xyz]), axis=0)
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    scaled = (deltas - lo) / (hi - lo) * np.float32(num_bins - 1)
    return np.clip(np.round(scaled), 0, num_bins - 1).astype(np.int64).reshape(-1)


def test_ego_xyz_range_sets_the_history_tokens():
    rng = np.random.default_rng(0)
    steps = rng.normal(0.0, [0.8, 0.5, 0.05], size=(16, 3))
    xyz = (np.cumsum(steps, axis=0) - np.sum(steps, axis=0)).astype(np.float32)  # ends near t0
    config, backbone = _fixture_dicts()
    lo, hi = [-2.0, -1.5, -0.25], [2.5, 1.0, 0.5]
    config["hist_traj_tokenizer_cfg"].update(ego_xyz_min=lo, ego_xyz_max=hi)
    history = AlpamayoConfig.from_hf_config(config, backbone).history_tokenizer
    assert (history.xyz_min, history.xyz_max) == (tuple(lo), tuple(hi))
    bins = np.asarray(encode_history(jnp.asarray(xyz), history))
    expected = _reference_history_bins(xyz, lo, hi, history.num_bins)
    np.testing.assert_array_equal(bins, expected)
    assert np.any((expected > 0) & (expected < history.num_bins - 1))  # not all saturated
    default_range = np.asarray(encode_history(jnp.asarray(xyz), tiny().history_tokenizer))
    np.testing.assert_array_equal(default_range, _reference_history_bins(xyz, (-4, -4, -10), (4, 4, 10), 160))
    assert np.any(default_range != bins)


def test_uniform_timestep_sampler_draws_uniform_times():
    config, backbone = _fixture_dicts()
    config["diffusion_cfg"]["train_timestep_sampler"] = "uniform"
    flow = AlpamayoConfig.from_hf_config(config, backbone).flow_matching
    assert flow.train_timestep_sampler == "uniform" and tiny().flow_matching.train_timestep_sampler == "beta"

    key = jax.random.key(0)
    t = np.sort(np.asarray(sample_timesteps(key, (20000,), flow.train_timestep_sampler)))
    assert t.dtype == np.float32 and t[0] >= 0.0 and t[-1] < 1.0
    # Kolmogorov-Smirnov distance to U[0, 1): 0.0115 is the 1% critical value for n = 20000.
    n = t.size
    ks = max(np.max(np.arange(1, n + 1) / n - t), np.max(t - np.arange(n) / n))
    assert ks < 0.0115
    beta = np.asarray(sample_timesteps(key, (20000,), "beta"))
    assert abs(float(beta.mean()) - 0.999 * 0.4) < 0.01  # the default is still Beta-based

    # The loss draws its times with the configured sampler, jitted or not.
    seen = []

    def velocity(x, t):
        seen.append(t)
        return jnp.zeros_like(x)

    actions = jnp.zeros((8192, 4, 2))
    flow_matching_loss(velocity, actions, key, flow)
    uniform_t = np.asarray(seen.pop())
    assert 0.0 <= uniform_t.min() and uniform_t.max() < 1.0 and abs(uniform_t.mean() - 0.5) < 0.01
    flow_matching_loss(velocity, actions, key, sampler="beta")
    assert abs(float(np.asarray(seen.pop()).mean()) - 0.999 * 0.4) < 0.01

    def loss(velocity_scale, key):
        return flow_matching_loss(lambda x, t: velocity_scale * t[:, None, None] * jnp.ones_like(x),
                                  actions, key, flow)

    np.testing.assert_allclose(float(jax.jit(loss)(1.0, key)), float(loss(1.0, key)), rtol=1e-6)
    with pytest.raises(TypeError, match="not both"):
        flow_matching_loss(velocity, actions, key, flow, sampler="beta")
    with pytest.raises(ValueError, match="timestep sampler"):
        sample_timesteps(key, (4,), "logit_normal")


# ---------------------------------------------------------------------------------------------
# Absent fields take the reference constructors' defaults
# ---------------------------------------------------------------------------------------------


def test_absent_section_fields_take_reference_defaults():
    assert HistoryTokenizerConfig.from_hf_config({"_target_": "x.DeltaTrajectoryTokenizer"}) == (
        HistoryTokenizerConfig(num_bins=1000, xyz_min=(-4.0, -4.0, -10.0), xyz_max=(4.0, 4.0, 10.0))
    )
    assert ActionSpaceConfig.from_hf_config({"_target_": "x.UnicycleAccelCurvatureActionSpace"}) == (
        ActionSpaceConfig(
            accel_mean=0.0, accel_std=1.0, curvature_mean=0.0, curvature_std=1.0,
            accel_bounds=(-9.8, 9.8), curvature_bounds=(-0.2, 0.2), dt=0.1, n_waypoints=64,
            theta_lambda=1e-6, theta_ridge=1e-8, v_lambda=1e-6, v_ridge=1e-4,
            a_lambda=1e-4, a_ridge=1e-4, kappa_lambda=1e-4, kappa_ridge=1e-4,
        )
    )
    assert ActionInProjConfig.from_hf_config({"_target_": "x.PerWaypointActionInProjV2"}) == (
        ActionInProjConfig(hidden_size=1024, num_enc_layers=4, num_fourier_feats=20, max_freq=100.0)
    )
    assert FlowMatchingConfig.from_hf_config({"_target_": "x.FlowMatching"}) == (
        FlowMatchingConfig(num_inference_steps=10, train_timestep_sampler="beta")
    )
    text = dict(load_preset_json("qwen3_vl_8b_backbone")["text_config"], rope_scaling={})
    for name in ("eos_token_id", "hidden_act", "attention_bias", "attention_dropout", "tie_word_embeddings"):
        text.pop(name, None)
    parsed = TextConfig.from_hf_config(text)
    assert parsed.mrope_section == (24, 20, 20) and parsed.eos_token_id is None
    assert parsed == TextConfig.from_hf_config(dict(text, hidden_act="silu", attention_bias=False,
                                                    attention_dropout=0.0, tie_word_embeddings=False))


def test_absent_top_level_fields_take_reference_defaults():
    config, backbone = _fixture_dicts()
    for name in ("traj_vocab_size", "tokens_per_history_traj", "tokens_per_future_traj", "min_pixels",
                 "max_pixels", "expert_cfg", "keep_same_dtype", "expert_non_causal_attention", "vlm_backend"):
        del config[name]
    for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings"):
        del backbone[name]
    config["vocab_size"] = config["traj_token_start_idx"] + 768  # room for the default 768 <i*> tokens
    parsed = AlpamayoConfig.from_hf_config(config, backbone)
    assert parsed.traj_vocab_size == 768
    assert (parsed.tokens_per_history_traj, parsed.tokens_per_future_traj) == (16, 64)
    # null pixel budgets: the reference inference helper's constants
    assert (parsed.min_pixels, parsed.max_pixels) == (163_840, 196_608)
    assert (parsed.image_token_id, parsed.vision_start_token_id, parsed.vision_end_token_id) == (
        151655, 151652, 151653)
    # no expert_cfg: the expert is the language model's decoder
    assert all(getattr(parsed.expert, f.name) == getattr(parsed.text, f.name)
               for f in dataclasses.fields(DecoderConfig))
    config.update(min_pixels=None, max_pixels=None)
    assert AlpamayoConfig.from_hf_config(config, backbone) == parsed


# ---------------------------------------------------------------------------------------------
# expert_cfg is the text config with keys replaced
# ---------------------------------------------------------------------------------------------


def test_expert_cfg_overrides_text_config_fields():
    config, backbone = _fixture_dicts()
    config["expert_cfg"]["rope_scaling"] = {"rope_type": "default", "mrope_section": [6, 1, 1]}
    config["expert_cfg"]["rms_norm_eps"] = 1e-5
    parsed = AlpamayoConfig.from_hf_config(config, backbone)
    assert parsed.expert.mrope_section == (6, 1, 1) and parsed.expert.rms_norm_eps == 1e-5
    assert parsed.text == tiny().text  # the language model keeps its own
    # The whole rope_scaling is replaced, as setattr does: no mrope_section means transformers' default.
    config["expert_cfg"]["rope_scaling"] = {"rope_type": "default"}
    with pytest.raises(ConfigError, match=r"mrope_section \(24, 20, 20\)"):
        AlpamayoConfig.from_hf_config(config, backbone)
    config["expert_cfg"]["rope_scaling"] = {"rope_type": "yarn", "mrope_section": [4, 2, 2]}
    with pytest.raises(ConfigError, match="expert_cfg.rope_scaling: rope_type 'yarn'"):
        AlpamayoConfig.from_hf_config(config, backbone)
