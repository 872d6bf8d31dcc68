"""The trajectory-only training prompt on the host: chat messages, rendering, tokenisation, the
ground-truth future tokens and the mask of the supervised tokens.

This is the conversation the reference's fine-tuning recipe trains on (SPEC §16; components
`image, traj_history, prompt, traj_future`), not the Chain-of-Causation inference prompt of
`alpamayo_jax.processing.prompt`:

* system: the driving-assistant instruction (`prompt.SYSTEM_PROMPT`);
* user: every camera image (camera-major), then `<|traj_history_start|>`, one
  `<|traj_history|>` placeholder per history token, `<|traj_history_end|>`, then
  "output the future trajectory.";
* assistant: `<|traj_future_start|>`, one `<|traj_future|>` placeholder per future token,
  `<|traj_future_end|>`, closed by the template's end of turn (`<|im_end|>`): the whole turn
  is rendered (no generation prompt, no continued final message).

A clip with Chain-of-Causation text (`Clip.cot`) gets the reference's `cot` component as well
(components `image, traj_history, prompt, cot, traj_future`): the instruction names both outputs,
"output the chain-of-thought reasoning of the driving process, then output the future
trajectory." (the inference prompt's instruction), and the assistant turn starts with
`<|cot_start|>` + the text + `<|cot_end|>` before the trajectory span. The text must be plain
text (`check_cot`).

Image tokens are expanded and the text tokenised by `prompt.tokenize_prompt`; the pixels come
from the training processor's float path (`image.preprocess_images(float_resize=True)`). The
history placeholders are filled by `model_inputs.assemble_inputs`, the future placeholders by
the batch (`collate.TrainingBatch.fused_input_ids`) with `future_tokens`.

`labels_mask` marks what the loss supervises: the span `<|traj_future_start|>` ...
`<|traj_future_end|>` inclusive, the span `<|cot_start|>` ... `<|cot_end|>` inclusive where a
clip has one (the reference's `label_components` with `cot` listed), and the end-of-turn token
of the assistant turn. The assistant
turn is found by its header (the role's tokens right after `<|im_start|>`), which works for any
vocabulary; the reference looks the role name up as a single token, which only works where the
vocabulary has it as one (Qwen's does).

Shapes: B prompts, L tokens, N images, S patch rows, T history poses (16), K = 3 T history
tokens (48), W future waypoints (64), F = 2 W future tokens (128).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alpamayo_jax.action.tokenizers import encode_future
from alpamayo_jax.action.unicycle import ActionStats
from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.processing.chat_template import PromptError, render_chat
from alpamayo_jax.processing.clip import ClipError, check_cot_text
from alpamayo_jax.processing.prompt import SYSTEM_PROMPT, encode_with_images
from alpamayo_jax.processing.tokenizer import ExtendedTokenizer, special_token

# What the user turn asks for, per assistant component, joined in the assistant's order.
COMPONENT_INSTRUCTIONS = {
    "cot": "output the chain-of-thought reasoning of the driving process",
    "traj_future": "output the future trajectory",
}
# The assistant components whose `<|{name}_start|>` ... `<|{name}_end|>` spans are supervised.
LABEL_COMPONENTS = ("cot", "traj_future")
TRAINING_INSTRUCTION = COMPONENT_INSTRUCTIONS["traj_future"] + "."
# Qwen chat-template turn delimiters: every turn is <|im_start|>{role}\n ... <|im_end|>.
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
ASSISTANT_ROLE = "assistant"
IGNORE_INDEX = -100  # label of the tokens the loss skips


def _placeholder_span(name: str, count: int) -> str:
    """`<|{name}_start|>` + count x `<|{name}|>` + `<|{name}_end|>`."""
    return special_token(f"{name}_start") + special_token(name) * count + special_token(f"{name}_end")


def instruction(components: tuple[str, ...]) -> str:
    """The user's request for these assistant components, e.g. ("cot", "traj_future") ->
    "output the chain-of-thought reasoning of the driving process, then output the future
    trajectory."."""
    return ", then ".join(COMPONENT_INSTRUCTIONS[c] for c in components) + "."


def training_messages(
    num_images: int, *, num_history_tokens: int, num_future_tokens: int, cot: str | None = None
) -> list[dict[str, Any]]:
    """The reference's training chat messages for `num_images` images (camera-major order),
    `num_history_tokens` history and `num_future_tokens` future placeholders, and with `cot` the
    Chain-of-Causation text before the trajectory. Image items carry a name instead of pixels:
    chat templates only test for their presence."""
    if num_images < 1:
        raise PromptError(f"the prompt needs at least one image, got {num_images}")
    for name, count in (("num_history_tokens", num_history_tokens), ("num_future_tokens", num_future_tokens)):
        if count < 1:
            raise PromptError(f"{name} must be >= 1, got {count}")
    components = ("traj_future",) if cot is None else ("cot", "traj_future")
    images = [{"type": "image", "image": f"image_{i}"} for i in range(num_images)]
    user = [
        *images,
        {"type": "text", "text": _placeholder_span("traj_history", num_history_tokens)},
        {"type": "text", "text": instruction(components)},
    ]
    assistant = [{"type": "text", "text": _placeholder_span("traj_future", num_future_tokens)}]
    if cot is not None:
        check_cot_text(cot)
        cot_span = special_token("cot_start") + cot + special_token("cot_end")
        assistant.insert(0, {"type": "text", "text": cot_span})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]


def render_training_prompt(
    num_images: int,
    *,
    tokenizer: ExtendedTokenizer,
    chat_template: str,
    num_history_tokens: int,
    num_future_tokens: int,
    cot: str | None = None,
) -> str:
    """The training prompt text before image-token expansion (one `<|image_pad|>` per image):
    all three turns, the assistant's closed by its end-of-turn token."""
    return render_chat(
        training_messages(
            num_images, num_history_tokens=num_history_tokens, num_future_tokens=num_future_tokens,
            cot=cot,
        ),
        chat_template,
        add_generation_prompt=False,
        continue_final_message=False,
        **tokenizer.special_tokens_map,
    )


def check_future_token_count(config: AlpamayoConfig) -> int:
    """The number of future tokens F of a training prompt (`config.tokens_per_future_traj`),
    checked against what the future tokenizer makes (2 per waypoint)."""
    made = 2 * config.future_tokenizer.action_space.n_waypoints
    if config.tokens_per_future_traj != made:
        raise PromptError(
            f"tokens_per_future_traj = {config.tokens_per_future_traj} future placeholders, but the future "
            f"tokenizer makes {made} tokens (accel, curvature for each of "
            f"{config.future_tokenizer.action_space.n_waypoints} waypoints)"
        )
    return made


def encode_training_prompt(
    camera_frames,  # (n_cameras, n_frames, 3, H, W) uint8, or nested sequences of images
    *,
    tokenizer: ExtendedTokenizer,
    chat_template: str,
    config: AlpamayoConfig,
    cot: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One clip's training prompt before any placeholder is filled, as the reference's training
    processor makes it: ids (L,) int64 with history and future placeholders, pixel_values
    (S, C*T*P*P) float32 (float path) and image_grid_thw (N, 3) int64. With `cot`, the
    Chain-of-Causation text goes before the trajectory (checked by `check_cot`)."""
    if cot is not None:
        check_cot(cot, tokenizer)

    def render(num_images: int) -> str:
        return render_training_prompt(num_images, tokenizer=tokenizer, chat_template=chat_template,
                                      num_history_tokens=config.tokens_per_history_traj,
                                      num_future_tokens=check_future_token_count(config), cot=cot)

    return encode_with_images(camera_frames, render, tokenizer=tokenizer, config=config, float_resize=True)


def check_cot(cot: str, tokenizer: ExtendedTokenizer) -> None:
    """Raises `ClipError` unless `cot` is plain Chain-of-Causation text for this tokenizer: what
    `processing.clip.check_cot_text` checks, and no token of it one of the vocabulary's added
    tokens (special tokens such as `<|im_end|>`, the trajectory bins `<i0>` ..., the backbone's
    control tokens), which would put control or trajectory ids into the supervised text."""
    check_cot_text(cot)
    added = tokenizer.tokenizer.get_added_tokens_decoder()
    found = sorted({added[i].content for i in tokenizer.encode(cot, add_special_tokens=False) if i in added})
    if found:
        raise ClipError(f"cot: contains the tokenizer's special token(s) {found}; Chain-of-Causation text is "
                        "plain text")


def future_tokens(
    ego_history_xyz,  # (..., T, 3) t0 ego frame
    ego_history_rot,  # (..., T, 3, 3)
    ego_future_xyz,  # (..., W, 3) same frame
    ego_future_rot,  # (..., W, 3, 3)
    config: AlpamayoConfig,
) -> np.ndarray:  # (..., F) int64 bins in [0, future_tokenizer.num_bins)
    """The quantised actions of the ground-truth future (`DiscreteTrajectoryTokenizer`), before
    the id offset: `traj_to_action` of history and future, then each (accel, curvature) rounded
    half to even into its bin, interleaved per waypoint. The action statistics come from the
    config as float32 (`ActionStats.from_config`), as the reference's tokenizer builds them."""
    action_space = config.future_tokenizer.action_space
    arrays = {
        "ego_history_xyz": np.asarray(ego_history_xyz, np.float32),
        "ego_history_rot": np.asarray(ego_history_rot, np.float32),
        "ego_future_xyz": np.asarray(ego_future_xyz, np.float32),
        "ego_future_rot": np.asarray(ego_future_rot, np.float32),
    }
    waypoints = action_space.n_waypoints
    if arrays["ego_future_xyz"].shape[-2:] != (waypoints, 3):
        raise PromptError(
            f"ego_future_xyz must be (..., {waypoints}, 3), got shape {arrays['ego_future_xyz'].shape}"
        )
    if arrays["ego_future_rot"].shape != arrays["ego_future_xyz"].shape + (3,):
        raise PromptError(
            f"ego_future_rot must be {arrays['ego_future_xyz'].shape + (3,)} (one rotation per position), "
            f"got shape {arrays['ego_future_rot'].shape}"
        )
    for name, array in arrays.items():
        if not np.isfinite(array).all():
            raise PromptError(f"{name} contains NaN or infinite values")
    bins = encode_future(
        arrays["ego_history_xyz"],
        arrays["ego_history_rot"],
        arrays["ego_future_xyz"],
        arrays["ego_future_rot"],
        config.future_tokenizer,
        ActionStats.from_config(action_space),
    )
    return np.asarray(bins).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The supervised tokens
# ---------------------------------------------------------------------------------------------


def _pairs(row: np.ndarray, start_id: int, end_id: int, what: str, b: int) -> list[tuple[int, int]]:
    """(start, end) positions of the spans `start_id` ... `end_id` of one row, in order; an
    unclosed last span is dropped (a prompt that ends inside a turn). Nested or unopened spans
    are errors."""
    starts = np.flatnonzero(row == start_id).tolist()
    ends = np.flatnonzero(row == end_id).tolist()
    if len(ends) > len(starts) or len(starts) > len(ends) + 1:
        raise PromptError(f"row {b}: {len(starts)} {what} starts but {len(ends)} ends")
    pairs = list(zip(starts, ends))
    bounds = [p for pair in pairs for p in pair] + starts[len(ends) :]
    if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
        raise PromptError(f"row {b}: {what} spans are nested or out of order (starts {starts}, ends {ends})")
    return pairs


def labels_mask(
    input_ids: np.ndarray,  # (B, L) tokenised training prompts (placeholders filled or not)
    *,
    tokenizer: ExtendedTokenizer,
    config: AlpamayoConfig,
    role: str = ASSISTANT_ROLE,
    components: tuple[str, ...] = LABEL_COMPONENTS,
) -> np.ndarray:  # (B, L) bool
    """The tokens the training loss supervises: each `<|{c}_start|>` ... `<|{c}_end|>` span
    inclusive for every component c (`<|cot_start|>` ... `<|cot_end|>` where a row has one,
    `<|traj_future_start|>` ... `<|traj_future_end|>`), and the `<|im_end|>` that closes each
    turn of `role`.

    A turn is `<|im_start|>` ... `<|im_end|>`; it is `role`'s when the tokens right after its
    `<|im_start|>` are the tokenisation of `role` (one token in Qwen's vocabulary, several in
    smaller ones), so the rule does not depend on the vocabulary having the role as one token.
    Raises `PromptError` when a row's spans or turns do not pair up.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise PromptError(f"input_ids must be (B, L), got shape {ids.shape}")
    role_ids = np.asarray(tokenizer.encode(role, add_special_tokens=False), ids.dtype)
    if role_ids.size == 0:
        raise PromptError(f"role {role!r} tokenises to nothing")
    turn_start, turn_end = tokenizer.token_to_id(TURN_START), tokenizer.token_to_id(TURN_END)
    spans = []
    for component in components:
        start_token = special_token(f"{component}_start")
        ids_of = (tokenizer.token_to_id(start_token), tokenizer.token_to_id(special_token(f"{component}_end")))
        spans.append((*ids_of, start_token))
    token_ids = config.traj_token_ids
    if "traj_future" in components and spans[components.index("traj_future")][:2] != (
        token_ids.future_start, token_ids.future_end
    ):
        raise PromptError("the tokenizer's <|traj_future_start|>/<|traj_future_end|> ids are not the config's")
    mask = np.zeros(ids.shape, bool)
    for b, row in enumerate(ids):
        for start_id, end_id, what in spans:
            for start, end in _pairs(row, start_id, end_id, what, b):
                mask[b, start : end + 1] = True
        for start, end in _pairs(row, turn_start, turn_end, "turn", b):
            header = row[start + 1 : start + 1 + role_ids.size]
            if start + 1 + role_ids.size <= end and np.array_equal(header, role_ids):
                mask[b, end] = True
    return mask
