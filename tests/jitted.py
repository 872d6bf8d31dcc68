"""Jitted forwards of single modules for the per-module parity tests, written with the library's
one jitting helper (`module_jit`): the module is split per call here, which tests can afford."""

from __future__ import annotations

from alpamayo_jax.models.vision import as_image_grid
from alpamayo_jax.nn.module_jit import SplitModule, module_jit


def _vision(model, pixel_values, image_grid, return_intermediates=False):
    return model(pixel_values, image_grid, return_intermediates=return_intermediates)


def _multimodal(model, input_ids, pixel_values, image_grid, position_ids, cache=None, num_logits=None,
                return_layer_outputs=False):
    return model(input_ids, pixel_values=pixel_values, image_grid_thw=image_grid, position_ids=position_ids,
                 cache=cache, num_logits=num_logits, return_layer_outputs=return_layer_outputs)


vision_jit = module_jit(_vision, static_argnames=("image_grid", "return_intermediates"))
multimodal_jit = module_jit(_multimodal, static_argnames=("image_grid", "num_logits", "return_layer_outputs"))


def encode_images(model, pixel_values, image_grid_thw, *, return_intermediates=False):
    """`VisionModel` forward, compiled once per image grid."""
    return vision_jit(SplitModule.of(model), pixel_values, as_image_grid(image_grid_thw),
                      return_intermediates=return_intermediates)


def multimodal_forward(model, input_ids, pixel_values, image_grid_thw, position_ids, *, cache=None,
                       num_logits=None, return_layer_outputs=False):
    """`Qwen3VL` multimodal forward (a prefill when `cache` is given)."""
    return multimodal_jit(SplitModule.of(model), input_ids, pixel_values, as_image_grid(image_grid_thw),
                          position_ids, cache, num_logits=num_logits,
                          return_layer_outputs=return_layer_outputs)
