"""Config parsing: presets load, and every kind of bad field is rejected with a named error."""

from __future__ import annotations

import copy
import json

import pytest

from alpamayo_jax.config import (
    IGNORED_FIELDS,
    AlpamayoConfig,
    ConfigError,
    alpamayo_r1_10b,
    load_preset_json,
    tiny,
)


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
    [("vocab_size",), ("expert_cfg",), ("traj_token_ids", "future_start"),
     ("action_space_cfg", "accel_std"), ("backbone", "text_config", "num_key_value_heads"),
     ("backbone", "vision_config", "depth")],
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
