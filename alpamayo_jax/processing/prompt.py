"""The Alpamayo prompt on the host: chat messages, tokenisation, image-token expansion and
history-token fusion. Produces the same ids as the reference's
`processor.apply_chat_template(..., tokenize=True, continue_final_message=True)` followed by
`fuse_traj_tokens`.

The prompt (SPEC §2.1) is a system message, a user message with every camera image followed by
`<|traj_history_start|>`, one `<|traj_history|>` placeholder per history token,
`<|traj_history_end|>` and the instruction, and an assistant message `<|cot_start|>` that the
model continues: the rendered text (`alpamayo_jax.processing.chat_template`) ends right after
`<|cot_start|>`.

Each `<|image_pad|>` is then expanded to the number of merged patches of its image
(t * h * w / merge^2) and the text is tokenised; finally the placeholders are replaced, in order,
by the history bins + `history_token_start_idx` (`fuse_history_tokens`).

Shapes: C clips, L prompt tokens, N images (= n_cameras * n_frames), S patches over all images,
T history steps (16), K = 3 T history tokens (48).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from alpamayo_jax.action.tokenizers import encode_history
from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.processing.chat_template import PromptError, render_chat
from alpamayo_jax.processing.image import flatten_camera_frames, preprocess_clip, preprocess_images
from alpamayo_jax.processing.tokenizer import ExtendedTokenizer, special_token

SYSTEM_PROMPT = "You are a driving assistant that generates safe and accurate actions."
INSTRUCTION = (
    "output the chain-of-thought reasoning of the driving process, then output the future trajectory."
)
IMAGE_TOKEN = "<|image_pad|>"


# ---------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------


def alpamayo_messages(num_images: int, *, num_history_tokens: int = 48) -> list[dict[str, Any]]:
    """The reference's chat messages for `num_images` images (camera-major order) and
    `num_history_tokens` history placeholders. Image items carry a name instead of pixels:
    chat templates only test for their presence."""
    if num_images < 1:
        raise PromptError(f"the prompt needs at least one image, got {num_images}")
    history = (
        special_token("traj_history_start")
        + special_token("traj_history") * num_history_tokens
        + special_token("traj_history_end")
    )
    images = [{"type": "image", "image": f"image_{i}"} for i in range(num_images)]
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [*images, {"type": "text", "text": history + INSTRUCTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": special_token("cot_start")}]},
    ]


def render_prompt(
    num_images: int, *, tokenizer: ExtendedTokenizer, chat_template: str, num_history_tokens: int = 48
) -> str:
    """The reference prompt text before image-token expansion (one `<|image_pad|>` per image),
    ending right after `<|cot_start|>`."""
    return render_chat(
        alpamayo_messages(num_images, num_history_tokens=num_history_tokens),
        chat_template,
        add_generation_prompt=False,
        continue_final_message=True,
        **tokenizer.special_tokens_map,
    )


# ---------------------------------------------------------------------------------------------
# Tokenisation, image tokens, history fusion
# ---------------------------------------------------------------------------------------------


def tokenize_prompt(
    text: str,
    image_grid_thw: np.ndarray,  # (N, 3) patches per image
    *,
    tokenizer: ExtendedTokenizer,
    image_token_id: int,
    spatial_merge_size: int,
) -> np.ndarray:  # (L,) int64
    """Expands the i-th image token of `text` to prod(image_grid_thw[i]) / merge^2 copies and
    tokenises the result, as the Qwen3-VL processor does."""
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    image_token = tokenizer.id_to_token(image_token_id)
    pieces = text.split(image_token)
    if len(pieces) - 1 != len(grids):
        raise PromptError(
            f"the prompt has {len(pieces) - 1} image tokens {image_token} but {len(grids)} images were given"
        )
    counts = [int(np.prod(g)) // spatial_merge_size**2 for g in grids]
    expanded = pieces[0] + "".join(image_token * n + piece for n, piece in zip(counts, pieces[1:]))
    bos = tokenizer.bos_token
    ids = np.asarray(
        tokenizer.encode(expanded, add_special_tokens=not (bos and expanded.startswith(bos))), np.int64
    )
    if int(np.sum(ids == image_token_id)) != sum(counts):
        raise PromptError(
            f"tokenisation produced {int(np.sum(ids == image_token_id))} image tokens, expected "
            f"{sum(counts)}: {image_token} is not an atomic token of this tokenizer"
        )
    return ids


# The history tokens of inputs without frames (recorded inputs); a clip's are computed with its
# pixels (`encode_clip`). One compiled program per history length rather than eager ops.
_encode_history = jax.jit(encode_history, static_argnames="cfg")


def check_history(
    ego_history_xyz,  # (T, 3) positions in the t0 ego frame, oldest first
    ego_history_rot,  # (T, 3, 3) rotations (checked, not used by the history tokenizer)
    config: AlpamayoConfig,
) -> np.ndarray:  # (T, 3) float32
    """The ego history's positions as the history tokenizer takes them; raises `PromptError`
    naming what does not fit the model."""
    xyz = np.asarray(ego_history_xyz)
    rot = np.asarray(ego_history_rot)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise PromptError(f"ego_history_xyz must be (T, 3), got shape {xyz.shape}")
    if rot.shape != (xyz.shape[0], 3, 3):
        raise PromptError(
            f"ego_history_rot must be (T, 3, 3) = {(xyz.shape[0], 3, 3)}, got shape {rot.shape}"
        )
    if 3 * xyz.shape[0] != config.tokens_per_history_traj:
        raise PromptError(
            f"ego history has {xyz.shape[0]} steps ({3 * xyz.shape[0]} tokens) but the model expects "
            f"tokens_per_history_traj = {config.tokens_per_history_traj}"
        )
    if not np.all(np.isfinite(xyz)):
        raise PromptError("ego_history_xyz contains NaN or infinite values")
    return xyz.astype(np.float32)


def history_tokens(
    ego_history_xyz,  # (T, 3) positions in the t0 ego frame, oldest first
    ego_history_rot,  # (T, 3, 3) rotations (checked, not used by the history tokenizer)
    config: AlpamayoConfig,
) -> np.ndarray:  # (K,) int64 bins in [0, history_tokenizer.num_bins)
    """The quantised xyz deltas of the ego history (`DeltaTrajectoryTokenizer`), before the id
    offset; interleaved (dx, dy, dz) per step (`check_history` first)."""
    xyz = check_history(ego_history_xyz, ego_history_rot, config)
    return np.asarray(_encode_history(xyz, config.history_tokenizer)).astype(np.int64)


def fuse_history_tokens(
    input_ids: np.ndarray,  # (C, L) with placeholders
    history_ids: np.ndarray,  # (C, K) token ids (offset already added), one row per prompt
    *,
    placeholder_id: int,
) -> np.ndarray:  # (C, L)
    """Replaces the placeholders of each prompt, in order, by its own row of `history_ids`; every
    prompt must hold exactly K placeholders."""
    input_ids = np.asarray(input_ids)
    history_ids = np.asarray(history_ids, dtype=input_ids.dtype)
    if input_ids.ndim != 2 or history_ids.ndim != 2 or history_ids.shape[0] != input_ids.shape[0]:
        raise PromptError(f"expected (C, L) prompts and (C, K) history ids, got {input_ids.shape} and "
                          f"{history_ids.shape}")
    mask = input_ids == placeholder_id
    counts = mask.sum(axis=-1)
    if np.any(counts != history_ids.shape[1]):
        raise PromptError(
            f"expected {history_ids.shape[1]} history placeholders (id {placeholder_id}) per prompt, "
            f"found {sorted(set(counts.tolist()))}"
        )
    fused = input_ids.copy()
    fused[mask] = history_ids.reshape(-1)  # boolean indexing is row-major, like the placeholders
    return fused


def _encode(
    camera_frames,  # (n_cameras, n_frames, 3, H, W) uint8, or nested sequences of images
    render_text: Callable[[int], str],  # number of images -> the chat text, one image token per image
    ego_history: tuple | None,  # (ego_history_xyz, ego_history_rot) or None
    *,
    tokenizer: ExtendedTokenizer,
    config: AlpamayoConfig,
    float_resize: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids, pixel_values, image_grid_thw, history bins or None) of one clip; the pixels and the
    history bins come from one program (`image.preprocess_clip`)."""
    images = flatten_camera_frames(camera_frames)
    budget = {"vision": config.vision, "min_pixels": config.min_pixels, "max_pixels": config.max_pixels,
              "float_resize": float_resize}
    if ego_history is None:
        (pixel_values, image_grid_thw), bins = preprocess_images(images, **budget), None
    else:
        xyz = check_history(*ego_history, config)
        pixel_values, image_grid_thw, bins = preprocess_clip(
            images, xyz, history_tokenizer=config.history_tokenizer, **budget)
    input_ids = tokenize_prompt(
        render_text(len(images)),
        image_grid_thw,
        tokenizer=tokenizer,
        image_token_id=config.image_token_id,
        spatial_merge_size=config.vision.spatial_merge_size,
    )
    return input_ids, pixel_values, image_grid_thw, bins


def encode_with_images(
    camera_frames,  # (n_cameras, n_frames, 3, H, W) uint8, or nested sequences of images
    render_text: Callable[[int], str],  # number of images -> the chat text, one image token per image
    *,
    tokenizer: ExtendedTokenizer,
    config: AlpamayoConfig,
    float_resize: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One clip's pixels and the tokenised text around them: ids (L,) int64 (placeholders not
    filled), pixel_values (S, C*T*P*P) float32 and image_grid_thw (N, 3) int64
    (`preprocess_images`; `float_resize` for the reference's training path)."""
    return _encode(camera_frames, render_text, None, tokenizer=tokenizer, config=config,
                   float_resize=float_resize)[:3]


def _inference_text(tokenizer: ExtendedTokenizer, chat_template: str, config: AlpamayoConfig):
    def render(num_images: int) -> str:
        return render_prompt(num_images, tokenizer=tokenizer, chat_template=chat_template,
                             num_history_tokens=config.tokens_per_history_traj)

    return render


def encode_prompt(
    camera_frames,  # (n_cameras, n_frames, 3, H, W) uint8, or nested sequences of images
    *,
    tokenizer: ExtendedTokenizer,
    chat_template: str,
    config: AlpamayoConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One clip's inference prompt before history fusion, as the reference's processor makes it
    (`encode_with_images`)."""
    return encode_with_images(camera_frames, _inference_text(tokenizer, chat_template, config),
                              tokenizer=tokenizer, config=config)


def encode_clip(
    camera_frames,  # (n_cameras, n_frames, 3, H, W) uint8, or nested sequences of images
    ego_history_xyz,  # (T, 3) positions in the t0 ego frame, oldest first
    ego_history_rot,  # (T, 3, 3)
    *,
    tokenizer: ExtendedTokenizer,
    chat_template: str,
    config: AlpamayoConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`encode_prompt` and `history_tokens` of one clip: ids (L,), pixel_values, image_grid_thw
    and the history bins (K,) int64, the pixels and bins from one compiled program."""
    return _encode(camera_frames, _inference_text(tokenizer, chat_template, config),
                   (ego_history_xyz, ego_history_rot), tokenizer=tokenizer, config=config, float_resize=False)
