"""Vision tower: parity with the reference fixture, torch's linspace, structure, sharding metadata,
full-size shapes through `eval_shape`, and compile-once behaviour of the jitted entry point."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alpamayo_jax.config import tiny
from alpamayo_jax.io.assign import load_tensors_into
from alpamayo_jax.io.weight_map import vision_rules
from alpamayo_jax.models import vision as vision_lib
from alpamayo_jax.models.vision import VisionModel
from alpamayo_jax.numerics import torch_linspace_f32
from tests.jitted import encode_images, vision_jit
from tests.parity import assert_close

jax.config.update("jax_default_matmul_precision", "highest")

CHECKPOINT_PREFIX = "vlm.model.visual."


@pytest.fixture(scope="module")
def model(checkpoint):  # `checkpoint` and `golden` come from conftest.py
    vision = VisionModel(tiny().vision, rngs=nnx.Rngs(0))
    tensors = {k: v for k, v in checkpoint.items() if k.startswith(CHECKPOINT_PREFIX)}
    load_tensors_into(vision, tensors, [r.mount(CHECKPOINT_PREFIX, "") for r in vision_rules()])
    return vision


@pytest.fixture(scope="module")
def output(model, golden):
    return encode_images(model, golden["processor.pixel_values"], golden["processor.image_grid_thw"],
                         return_intermediates=True)


def _fixture_stage(output, name):
    inter = output.intermediates
    if name == "vision.patch_embed_out":
        return inter.patch_embeds
    if name == "vision.pos_embed_interp":
        return inter.position_embeds
    if name == "vision.rot_pos_emb":
        return inter.rotary_angles
    if name.startswith("vision.block_out."):
        return inter.block_outputs[int(name.rsplit(".", 1)[1])]
    if name == "vision.merged_embeds":
        return output.image_embeds
    if name.startswith("vision.deepstack."):
        return output.deepstack_embeds[int(name.rsplit(".", 1)[1])]
    raise KeyError(name)


STAGES = ["vision.patch_embed_out", "vision.pos_embed_interp", "vision.rot_pos_emb",
          "vision.block_out.0", "vision.block_out.1", "vision.block_out.2",
          "vision.merged_embeds", "vision.deepstack.0", "vision.deepstack.1"]


@pytest.mark.parametrize("name", STAGES)
def test_matches_reference_fixture(output, golden, name):
    assert_close(_fixture_stage(output, name), golden[name], 1e-5, name)


def test_output_shapes(output, golden):
    config = tiny().vision
    patches = golden["processor.pixel_values"].shape[0]
    assert output.image_embeds.shape == (patches // 4, config.out_hidden_size)
    assert output.deepstack_embeds.shape == (len(config.deepstack_visual_indexes), patches // 4,
                                             config.out_hidden_size)


def test_linspace_is_torch_bit_exact():
    torch = pytest.importorskip("torch")
    for end in (5, 47):
        for steps in (*range(1, 40), 48, 64, 100):
            expected = torch.linspace(0, end, steps).numpy()
            np.testing.assert_array_equal(torch_linspace_f32(0, end, steps), expected,
                                          err_msg=f"linspace(0, {end}, {steps})")


def test_attention_segments_batch_equal_images():
    grid = ((1, 4, 6),) * 3 + ((1, 2, 2), (2, 2, 2), (1, 4, 6))
    assert vision_lib.attention_segments(grid) == ((0, 3, 24), (72, 3, 4), (84, 1, 24))


def test_rejects_bad_grids(model):
    with pytest.raises(ValueError, match="spatial merge size"):
        model(jnp.zeros((15, model.config.patch_dim)), ((1, 3, 5),))
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(jnp.zeros((10, model.config.patch_dim)), ((1, 4, 6),))


def test_jitted_entry_compiles_once_per_grid(model):
    rng = np.random.default_rng(0)
    patch_dim = model.config.patch_dim
    grid_a = np.array([[1, 2, 4], [1, 2, 4]])
    pixels_a = jnp.asarray(rng.normal(size=(16, patch_dim)), jnp.float32)
    before = vision_jit._cache_size()
    first = encode_images(model, pixels_a, grid_a)
    after_first = vision_jit._cache_size()
    second = encode_images(model, pixels_a, grid_a.tolist())  # same grid, other container: no retrace
    assert vision_jit._cache_size() == after_first <= before + 1
    np.testing.assert_array_equal(np.asarray(first.image_embeds), np.asarray(second.image_embeds))
    encode_images(model, jnp.asarray(rng.normal(size=(16, patch_dim)), jnp.float32), ((1, 4, 4),))
    assert vision_jit._cache_size() == after_first + 1


def test_images_are_encoded_independently(model):
    """Attention stays within each image: changing one image's pixels leaves the other image's
    visual tokens and DeepStack features untouched."""
    rng = np.random.default_rng(1)
    patch_dim = model.config.patch_dim
    grid = ((1, 2, 4), (1, 4, 6))
    a, a2, b = (jnp.asarray(rng.normal(size=(n, patch_dim)), jnp.float32) for n in (8, 8, 24))
    first = encode_images(model, jnp.concatenate([a, b]), grid)
    second = encode_images(model, jnp.concatenate([a2, b]), grid)
    np.testing.assert_array_equal(np.asarray(first.image_embeds[2:]), np.asarray(second.image_embeds[2:]))
    np.testing.assert_array_equal(np.asarray(first.deepstack_embeds[:, 2:]),
                                  np.asarray(second.deepstack_embeds[:, 2:]))
    assert not np.allclose(np.asarray(first.image_embeds[:2]), np.asarray(second.image_embeds[:2]))


def test_bfloat16_weights_keep_bfloat16_activations(model, output, golden):
    """With bf16 parameters the tower runs in bf16 (no silent float32 promotion) and stays close
    to the float32 result."""
    bf16 = VisionModel(model.config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(bf16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
    out = encode_images(bf16, golden["processor.pixel_values"], golden["processor.image_grid_thw"],
                        return_intermediates=True)
    assert out.image_embeds.dtype == out.deepstack_embeds.dtype == jnp.bfloat16
    assert {b.dtype for b in out.intermediates.block_outputs} == {jnp.dtype(jnp.bfloat16)}
    assert_close(out.image_embeds.astype(jnp.float32), golden["vision.merged_embeds"], 5e-2, "bf16 merged")
