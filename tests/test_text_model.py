"""The Qwen3-VL language model against transformers 4.57.1 and against NVIDIA's reference fixture.

float32, highest matmul precision (conftest). Tolerances: 1e-5 relative per layer, 1e-4 on logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alpamayo_jax.config import TextConfig, tiny
from alpamayo_jax.io.assign import load_tensors_into
from alpamayo_jax.io.weight_map import causal_lm_rules
from alpamayo_jax.models.text import CausalLM
from tests.parity import assert_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# A tiny backbone unlike the fixture's: 3 layers, GQA 4:2, head_dim 8, mrope_section summing to 4.
BACKBONE = {
    "model_type": "qwen3_vl",
    "tie_word_embeddings": False,
    "image_token_id": 90,
    "video_token_id": 91,
    "vision_start_token_id": 88,
    "vision_end_token_id": 89,
    "text_config": {
        "model_type": "qwen3_vl_text",
        "vocab_size": 97,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 5_000_000.0,
        "rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        "max_position_embeddings": 4096,
        "attention_bias": False,
    },
    "vision_config": {
        "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
        "num_position_embeddings": 16, "deepstack_visual_indexes": [0], "patch_size": 4,
        "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
    },
}
BATCH, LENGTH = 2, 13


def _scaled_init_(model, seed: int) -> None:
    """O(1)-scale random weights, so logits are well separated and errors are not hidden by tiny
    activations: linear std 1/sqrt(fan_in), embeddings std 1, norm scales 1 + 0.1 N."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=generator))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) / p.shape[1] ** 0.5)


@pytest.fixture(scope="module")
def reference():
    """transformers' Qwen3-VL text path with per-layer outputs, logits and cache, plus the inputs."""
    config = transformers.Qwen3VLConfig(**BACKBONE)
    config.text_config._attn_implementation = "sdpa"
    model = transformers.Qwen3VLForConditionalGeneration(config).eval().float()
    _scaled_init_(model, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 88, size=(BATCH, LENGTH))
    # Independent positions on the three MRoPE axes (t != h != w) exercise the interleave.
    positions = np.sort(rng.integers(0, 40, size=(3, BATCH, LENGTH)), axis=-1)
    layer_outputs = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: layer_outputs.append(out.detach().clone()))
             for layer in model.model.language_model.layers]
    with torch.no_grad():
        # An explicit all-ones attention mask keeps transformers from reading non-consecutive
        # positions as packed sequences.
        out = model(input_ids=torch.tensor(ids), position_ids=torch.tensor(positions),
                    attention_mask=torch.ones(BATCH, LENGTH, dtype=torch.long), use_cache=True)
    for hook in hooks:
        hook.remove()
    state = {k: v.numpy() for k, v in model.state_dict().items() if not k.startswith("model.visual.")}
    cache = out.past_key_values
    return {
        "ids": ids,
        "positions": positions,
        "state": state,
        "layer_outputs": [t.numpy() for t in layer_outputs],
        "logits": out.logits.numpy(),
        "k": np.stack([layer.keys.numpy() for layer in cache.layers]),  # (L, B, K, T, H)
        "v": np.stack([layer.values.numpy() for layer in cache.layers]),
    }


@pytest.fixture(scope="module")
def model(reference):
    config = TextConfig.from_hf_config(BACKBONE["text_config"])
    lm = CausalLM(config, rngs=nnx.Rngs(0))
    load_tensors_into(lm, reference["state"], causal_lm_rules())
    return lm


def test_matches_transformers_per_layer_logits_and_cache(model, reference):
    out = model(jnp.asarray(reference["ids"]), position_ids=jnp.asarray(reference["positions"]),
                return_layer_outputs=True)
    for index, (ours, theirs) in enumerate(zip(out.layer_outputs, reference["layer_outputs"], strict=True)):
        assert_close(ours, theirs, rel=1e-5, name=f"layer {index} output")
    # The cache's layout (L, B, K, T, H): transformers keeps (B, K, T, H) per layer.
    assert_close(out.k, reference["k"], rel=1e-5, name="keys")
    assert_close(out.v, reference["v"], rel=1e-5, name="values")
    assert_close(out.logits, reference["logits"], rel=1e-4, name="logits")


def test_input_embeddings_path_equals_token_ids_path(model, reference):
    ids, positions = jnp.asarray(reference["ids"]), jnp.asarray(reference["positions"])
    from_ids = model(ids, position_ids=positions).logits
    from_embeds = model(inputs_embeds=model.embed(ids), position_ids=positions).logits
    np.testing.assert_array_equal(np.asarray(from_ids), np.asarray(from_embeds))


def test_prefill_then_decode_equals_full_forward(model, reference):
    ids, positions = jnp.asarray(reference["ids"]), jnp.asarray(reference["positions"])
    full = model(ids, position_ids=positions)
    prompt = 6
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids, positions, cache):
        out = nnx.merge(graphdef, state)(ids, position_ids=positions, cache=cache)
        return out.logits, out.cache

    cache = model.init_cache(BATCH, capacity=LENGTH + 3)
    logits, cache = step(state, ids[:, :prompt], positions[:, :, :prompt], cache)
    pieces = [logits]
    for t in range(prompt, LENGTH):
        logits, cache = step(state, ids[:, t:t + 1], positions[:, :, t:t + 1], cache)
        pieces.append(logits)
    assert step._cache_size() == 2  # one compile for the prompt, one for every decode step
    assert int(cache.length) == LENGTH
    assert_close(jnp.concatenate(pieces, axis=1), full.logits, rel=1e-5, name="decoded logits")
    assert_close(cache.k[:, :, :, :LENGTH], full.k, rel=1e-5, name="cached keys")
    np.testing.assert_array_equal(np.asarray(cache.k[:, :, :, LENGTH:]), 0)


def test_default_positions_continue_from_the_cache(model, reference):
    ids = jnp.asarray(reference["ids"])
    text_positions = jnp.broadcast_to(jnp.arange(LENGTH), (3, BATCH, LENGTH))
    full = model(ids, position_ids=text_positions)
    cache = model(ids[:, :5], cache=model.init_cache(BATCH, LENGTH)).cache
    rest = model(ids[:, 5:], cache=cache)
    assert_close(rest.logits, full.logits[:, 5:], rel=1e-5, name="logits after cache")


def test_cache_overflow_is_an_error(model, reference):
    cache = model.init_cache(BATCH, capacity=4)
    with pytest.raises(ValueError, match="overflow"):
        model(jnp.asarray(reference["ids"])[:, :5], cache=cache)


def test_bad_arguments_are_errors(model, reference):
    ids = jnp.asarray(reference["ids"])
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.embed(ids))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=jnp.zeros((BATCH, LENGTH), jnp.int32))


@pytest.fixture(scope="module")
def fixture_lm(checkpoint):
    config = tiny()
    lm = CausalLM(config.text, rngs=nnx.Rngs(0))
    text_keys = {k.removeprefix("vlm."): v for k, v in checkpoint.items()
                 if k.startswith(("vlm.model.language_model.", "vlm.lm_head."))}
    load_tensors_into(lm, text_keys, causal_lm_rules())
    return lm


def test_reproduces_reference_fixture(fixture_lm, golden):
    """Given the reference's input embeddings, positions and DeepStack features, the language model
    reproduces NVIDIA's per-layer outputs, final norm and logits."""
    config = tiny()
    image_rows = golden["fused.input_ids"] == config.image_token_id  # (1, T)
    num_deepstack = len(config.vision.deepstack_visual_indexes)
    deepstack = np.zeros((num_deepstack, *golden["vlm.inputs_embeds"].shape), np.float32)
    for j in range(num_deepstack):
        deepstack[j][image_rows] = golden[f"vision.deepstack.{j}"]
    out = fixture_lm(inputs_embeds=jnp.asarray(golden["vlm.inputs_embeds"]),
                     position_ids=jnp.asarray(golden["rope.position_ids"]),
                     deepstack_embeds=jnp.asarray(deepstack), return_layer_outputs=True)
    for index, ours in enumerate(out.layer_outputs):
        assert_close(ours, golden[f"vlm.layer_out.{index}"], rel=1e-5, name=f"vlm.layer_out.{index}")
    assert_close(out.hidden_states, golden["vlm.final_norm_out"], rel=1e-5, name="vlm.final_norm_out")
    assert_close(out.logits, golden["vlm.logits"], rel=1e-4, name="vlm.logits")
