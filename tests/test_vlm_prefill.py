"""Multimodal forward (prefill) of Qwen3-VL: parity with the reference fixture and with
transformers' `Qwen3VLForConditionalGeneration` on a second, differently shaped tiny config with
images of different sizes; placeholder checks; prefill into a KV cache."""

import copy

import jax
import numpy as np
import pytest
from flax import nnx

from alpamayo_jax.config import TextConfig, VisionConfig, tiny
from alpamayo_jax.io.assign import load_tensors_into
from alpamayo_jax.io.weight_map import qwen3_vl_rules
from alpamayo_jax.models.vlm import Qwen3VL
from tests.jitted import encode_images, multimodal_forward
from tests.parity import assert_close

jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------------------------------------
# The reference fixture (NVIDIA's code, float32)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_model(checkpoint):  # `checkpoint` and `golden` come from conftest.py
    model = Qwen3VL.from_config(tiny(), rngs=nnx.Rngs(0))
    tensors = {k: v for k, v in checkpoint.items() if k.startswith("vlm.")}
    load_tensors_into(model, tensors, [r.mount("vlm.", "") for r in qwen3_vl_rules()])
    return model


@pytest.fixture(scope="module")
def fixture_inputs(golden):
    return (golden["fused.input_ids"], golden["processor.pixel_values"], golden["processor.image_grid_thw"],
            golden["rope.position_ids"])


@pytest.fixture(scope="module")
def fixture_output(fixture_model, fixture_inputs):
    return multimodal_forward(fixture_model, *fixture_inputs, return_layer_outputs=True)


def test_inputs_embeds_match_reference(fixture_model, fixture_inputs, golden):
    ids, pixels, grid, _ = fixture_inputs
    embed = nnx.jit(lambda m, i, p: m.embed_multimodal(i, p, grid.tolist()))
    mm = embed(fixture_model, ids, pixels)
    assert_close(mm.inputs_embeds, golden["vlm.inputs_embeds"], 1e-5, "vlm.inputs_embeds")
    assert int(mm.visual_mask.sum()) == golden["vision.merged_embeds"].shape[0]
    # DeepStack features sit exactly on the image rows, in order, and are zero elsewhere.
    for j in range(mm.deepstack_embeds.shape[0]):
        assert_close(mm.deepstack_embeds[j][mm.visual_mask], golden[f"vision.deepstack.{j}"], 1e-5,
                     f"deepstack {j} at image rows")
        assert not np.asarray(mm.deepstack_embeds[j][~mm.visual_mask]).any()


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_layer_outputs_match_reference(fixture_output, golden, layer):
    assert_close(fixture_output.layer_outputs[layer], golden[f"vlm.layer_out.{layer}"], 1e-5,
                 f"vlm.layer_out.{layer}")


def test_final_norm_and_logits_match_reference(fixture_output, golden):
    assert_close(fixture_output.hidden_states, golden["vlm.final_norm_out"], 1e-5, "vlm.final_norm_out")
    assert_close(fixture_output.logits, golden["vlm.logits"], 1e-4, "vlm.logits")


def test_prefill_fills_kv_cache(fixture_model, fixture_inputs, golden):
    ids, pixels, grid, positions = fixture_inputs
    prompt_len = ids.shape[1]
    cache = fixture_model.init_cache(batch=1, capacity=prompt_len + 6)
    out = multimodal_forward(fixture_model, ids, pixels, grid, positions, cache=cache, num_logits=1)
    assert int(out.cache.length) == prompt_len
    assert_close(out.logits[:, 0], golden["vlm.logits"][:, -1], 1e-4, "last prefill logits")
    for layer in range(fixture_model.config.num_hidden_layers):
        for kind in ("k", "v"):
            # the reference's layout (B, K, S, H) is the cache's per layer
            expected = golden[f"gen.kv_cache.{kind}.{layer}"][:, :, :prompt_len]
            actual = getattr(out.cache, kind)[layer, :, :, :prompt_len]
            assert_close(actual, expected, 1e-5, f"prefill cache {kind} layer {layer}")
    assert not np.asarray(out.cache.k[:, :, :, prompt_len:]).any()


def test_placeholder_count_mismatch_raises(fixture_model, fixture_inputs):
    ids, pixels, grid, positions = fixture_inputs
    image_token = fixture_model.image_token_id
    fewer = ids.copy()
    fewer[0, int(np.argmax(ids[0] == image_token))] = 0
    with pytest.raises(ValueError, match=r"hold 95 <\|image_pad\|> tokens .* give 96 visual tokens"):
        fixture_model(fewer, pixel_values=pixels, image_grid_thw=grid, position_ids=positions)
    with pytest.raises(ValueError, match="do not match"):  # one image fewer than placeholders
        fixture_model.embed_multimodal(ids, pixels[:-24], grid[:-1])
    with pytest.raises(ValueError, match="position_ids"):
        fixture_model(ids, pixel_values=pixels, image_grid_thw=grid)


# ---------------------------------------------------------------------------------------------
# transformers parity on a second tiny config, two image sizes, batch of 2
# ---------------------------------------------------------------------------------------------

IMAGE, VIDEO, VISION_START, VISION_END = 97, 98, 95, 96
HF_CONFIG = {
    "model_type": "qwen3_vl",
    "image_token_id": IMAGE,
    "video_token_id": VIDEO,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_vl_text",
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000.0,
        "rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        "max_position_embeddings": 512,
        "attention_bias": False,
    },
    "vision_config": {
        "depth": 2,
        "hidden_size": 24,
        "intermediate_size": 40,
        "num_heads": 2,
        "out_hidden_size": 32,
        "num_position_embeddings": 25,
        "deepstack_visual_indexes": [1],
        "patch_size": 4,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
        "hidden_act": "gelu_pytorch_tanh",
    },
}
# Row 0: a 6x10-patch image then a 10x4 one; row 1 the other way round.
GRID = ((1, 6, 10), (1, 10, 4), (1, 10, 4), (1, 6, 10))
ROW_LAYOUT = [(3, 0, 4, 1, 5), (5, 2, 2, 3, 5)]  # text, image, text, image, text


def _reinitialise(model, torch, seed=0):
    """O(1)-scale random weights (the default 0.02-std init makes every stage near-trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif p.ndim == 1:  # norm scales
                p.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name or "pos_embed" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))


def _input_ids(rng):
    tokens_per_image = [t * h * w // 4 for t, h, w in GRID]
    rows = []
    for row, layout in enumerate(ROW_LAYOUT):
        ids = []
        for part, count in enumerate(layout):
            if part % 2:  # image
                ids += [VISION_START] + [IMAGE] * tokens_per_image[count] + [VISION_END]
            else:
                ids += rng.integers(0, 90, size=count).tolist()
        rows.append(ids)
    assert len(rows[0]) == len(rows[1])
    return np.array(rows, np.int64)


@pytest.fixture(scope="module")
def hf_parity():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    reference = transformers.Qwen3VLForConditionalGeneration(
        transformers.Qwen3VLConfig(**copy.deepcopy(HF_CONFIG), attn_implementation="sdpa")
    ).eval().float()
    _reinitialise(reference, torch)

    rng = np.random.default_rng(0)
    ids = _input_ids(rng)
    patch_dim = 3 * 2 * 4 * 4
    pixels = rng.normal(size=(sum(t * h * w for t, h, w in GRID), patch_dim)).astype(np.float32)
    grid = np.array(GRID, np.int64)
    with torch.no_grad():
        ids_t, pixels_t, grid_t = torch.from_numpy(ids), torch.from_numpy(pixels), torch.from_numpy(grid)
        positions, _ = reference.model.get_rope_index(ids_t, grid_t)
        merged, deepstack = reference.model.visual(pixels_t, grid_thw=grid_t)
        # An explicit all-ones mask: without one, transformers reads multimodal positions as
        # packed sequences and masks across them.
        logits = reference(input_ids=ids_t, pixel_values=pixels_t, image_grid_thw=grid_t,
                           position_ids=positions, attention_mask=torch.ones_like(ids_t),
                           use_cache=False).logits
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}

    model = Qwen3VL(VisionConfig.from_hf_config(HF_CONFIG["vision_config"]),
                    TextConfig.from_hf_config(HF_CONFIG["text_config"]),
                    image_token_id=HF_CONFIG["image_token_id"], rngs=nnx.Rngs(0))
    load_tensors_into(model, state, qwen3_vl_rules())
    return {
        "model": model, "ids": ids, "pixels": pixels, "positions": positions.numpy(),
        "merged": merged.numpy(), "deepstack": np.stack([d.numpy() for d in deepstack]),
        "logits": logits.numpy(),
    }


def test_transformers_vision_parity(hf_parity):
    out = encode_images(hf_parity["model"].visual, hf_parity["pixels"], GRID)
    assert_close(out.image_embeds, hf_parity["merged"], 1e-5, "merged visual tokens")
    assert_close(out.deepstack_embeds, hf_parity["deepstack"], 1e-5, "deepstack features")


def test_transformers_logits_parity(hf_parity):
    out = multimodal_forward(hf_parity["model"], hf_parity["ids"], hf_parity["pixels"], GRID,
                             hf_parity["positions"])
    assert_close(out.logits, hf_parity["logits"], 1e-4, "logits")
