"""The Alpamayo prompt: chat messages, chat-template rendering, tokenisation, image-token
expansion and history-token fusion, on the host. Produces the same ids as the reference's
`processor.apply_chat_template(..., tokenize=True, continue_final_message=True)` followed by
`fuse_traj_tokens`.

The prompt (SPEC §2.1) is a system message, a user message with every camera image followed by
`<|traj_history_start|>`, one `<|traj_history|>` placeholder per history token,
`<|traj_history_end|>` and the instruction, and an assistant message `<|cot_start|>` that the
model continues: the rendered text ends right after `<|cot_start|>`.

Rendering follows Hugging Face's chat-template semantics: a sandboxed Jinja environment with
`trim_blocks` and `lstrip_blocks`, the `raise_exception`, `strftime_now` and `tojson` helpers,
the tokenizer's special tokens as template variables, and `continue_final_message` implemented by
rendering the final text with a marker after it and cutting the output at the marker.

Each `<|image_pad|>` is then expanded to the number of merged patches of its image
(t * h * w / merge^2) and the text is tokenised; finally the placeholders are replaced, in order,
by the history bins + `history_token_start_idx`.

Shapes: L prompt tokens, N images (= n_cameras * n_frames), S patches over all images,
T history steps (16), K = 3 T history tokens (48).
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from alpamayo_jax.action.tokenizers import encode_history
from alpamayo_jax.config import AlpamayoConfig
from alpamayo_jax.processing.image import flatten_camera_frames, preprocess_images
from alpamayo_jax.processing.tokenizer import ExtendedTokenizer, special_token

SYSTEM_PROMPT = "You are a driving assistant that generates safe and accurate actions."
INSTRUCTION = (
    "output the chain-of-thought reasoning of the driving process, then output the future trajectory."
)
IMAGE_TOKEN = "<|image_pad|>"

CHAT_TEMPLATE_JSON = "chat_template.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"

# Appended to the final message's text when continuing it; the rendered chat is cut here.
_CONTINUE_MARKER = "CONTINUE_FINAL_MESSAGE_TAG "


class PromptError(ValueError):
    """A chat template, prompt or model input that cannot produce the reference prompt."""


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


# ---------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------


def _default_template(value: Any, where: str) -> str:
    """A chat template entry: a string, or named templates ({name: template} or
    [{"name", "template"}]) of which "default" is taken."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        value = {item.get("name"): item.get("template") for item in value if isinstance(item, Mapping)}
    if isinstance(value, Mapping):
        if isinstance(value.get("default"), str):
            return value["default"]
        raise PromptError(f"{where}: several chat templates {sorted(value)} but none named 'default'")
    raise PromptError(f"{where}: chat_template must be a string, got {type(value).__name__}")


def load_chat_template(directory: str | Path) -> str:
    """The chat template of a processor directory, looked up where Hugging Face's processor
    looks: `chat_template.json` (legacy, takes precedence), then `chat_template.jinja`; as a
    last resort the tokenizer's `chat_template` in `tokenizer_config.json`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PromptError(f"processor directory {directory} does not exist")
    legacy = directory / CHAT_TEMPLATE_JSON
    if legacy.is_file():
        data = json.loads(legacy.read_text(encoding="utf-8"))
        if "chat_template" not in data:
            raise PromptError(f"{legacy} has no 'chat_template' entry")
        return _default_template(data["chat_template"], str(legacy))
    raw = directory / CHAT_TEMPLATE_JINJA
    if raw.is_file():
        return raw.read_text(encoding="utf-8")
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        if data.get("chat_template") is not None:
            return _default_template(data["chat_template"], str(tokenizer_config))
    raise PromptError(
        f"no chat template in {directory}: expected {CHAT_TEMPLATE_JINJA}, {CHAT_TEMPLATE_JSON} or a "
        "'chat_template' entry in tokenizer_config.json"
    )


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks in some
    templates): renders its body unchanged."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Plain json.dumps: Jinja's own filter would HTML-escape the text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile(chat_template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(chat_template)
    except jinja2.TemplateSyntaxError as e:
        raise PromptError(f"chat template syntax error, line {e.lineno}: {e.message}") from None


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    chat_template: str,
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    **variables: Any,
) -> str:
    """Renders `messages` with a Jinja chat template as Hugging Face's `apply_chat_template`
    does. `variables` (e.g. the tokenizer's special tokens, `add_vision_id`) are passed to the
    template. With `continue_final_message` the text ends where the final message's last text
    item ends (no end-of-turn token), so the model continues that message."""
    if not isinstance(chat_template, str) or not chat_template:
        raise PromptError("a chat template (a non-empty string) is required")
    if continue_final_message and add_generation_prompt:
        raise PromptError("continue_final_message and add_generation_prompt cannot be used together")
    messages = list(messages)
    if not messages:
        raise PromptError("no messages to render")
    final_text = None
    if continue_final_message:
        messages = copy.deepcopy(messages)
        content = messages[-1]["content"]
        if isinstance(content, str):
            final_text = content
            messages[-1]["content"] = content + _CONTINUE_MARKER
        else:
            for item in reversed(content):
                if "text" in item:
                    final_text = item["text"]
                    item["text"] = item["text"] + _CONTINUE_MARKER
                    break
            else:
                raise PromptError("continue_final_message: the final message has no text to continue")
    try:
        rendered = _compile(chat_template).render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as e:
        raise PromptError(f"chat template failed: {e}") from e
    if continue_final_message:
        marker = _CONTINUE_MARKER.strip()
        if final_text.strip() not in rendered or marker not in rendered:
            raise PromptError(
                "continue_final_message: the chat template dropped part of the final message, "
                "so the prompt cannot end inside it"
            )
        at = rendered.rindex(marker)
        if rendered[at : at + len(_CONTINUE_MARKER)] == _CONTINUE_MARKER:
            rendered = rendered[:at]
        else:  # the template trimmed the whitespace after the marker; trim before it too
            rendered = rendered[:at].rstrip()
    return rendered


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


def history_tokens(
    ego_history_xyz,  # (T, 3) positions in the t0 ego frame, oldest first
    ego_history_rot,  # (T, 3, 3) rotations (checked, not used by the history tokenizer)
    config: AlpamayoConfig,
) -> np.ndarray:  # (K,) int64 bins in [0, history_tokenizer.num_bins)
    """The quantised xyz deltas of the ego history (`DeltaTrajectoryTokenizer`), before the id
    offset; interleaved (dx, dy, dz) per step."""
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
    bins = np.asarray(encode_history(xyz.astype(np.float32), config.history_tokenizer)).astype(np.int64)
    return bins.reshape(-1)


def fuse_history_tokens(
    input_ids: np.ndarray,  # (..., L) with placeholders
    history_ids: np.ndarray,  # (K,) token ids (offset already added)
    *,
    placeholder_id: int,
) -> np.ndarray:  # (..., L)
    """Replaces the placeholders of each row, in order, by `history_ids`; the number of
    placeholders per row must equal K."""
    input_ids = np.asarray(input_ids)
    history_ids = np.asarray(history_ids, dtype=input_ids.dtype).reshape(-1)
    mask = input_ids == placeholder_id
    counts = mask.reshape(-1, input_ids.shape[-1]).sum(axis=-1)
    if np.any(counts != history_ids.size):
        raise PromptError(
            f"expected {history_ids.size} history placeholders (id {placeholder_id}) per prompt, "
            f"found {sorted(set(counts.tolist()))}"
        )
    fused = input_ids.copy()
    fused[mask] = np.tile(history_ids, counts.size)
    return fused


def build_model_inputs(
    camera_frames,  # (n_cameras, n_frames, 3, H, W) uint8, or nested sequences of images
    ego_history_xyz,  # (T, 3) float
    ego_history_rot,  # (T, 3, 3) float
    *,
    tokenizer: ExtendedTokenizer,
    chat_template: str,
    config: AlpamayoConfig,
) -> dict[str, np.ndarray]:
    """The model inputs of one sample, as the reference builds them.

    Returns (all numpy):
      input_ids (1, L) int64: the tokenised prompt with the history placeholders;
      fused_input_ids (1, L) int64: the same with the placeholders replaced by the history tokens;
      attention_mask (1, L) int64: all ones;
      pixel_values (S, C*T*P*P) float32, image_grid_thw (N, 3) int64: see `preprocess_images`;
      history_tokens (1, K) int64: the history bins before the id offset.
    """
    images = flatten_camera_frames(camera_frames)
    pixel_values, image_grid_thw = preprocess_images(
        images, vision=config.vision, min_pixels=config.min_pixels, max_pixels=config.max_pixels
    )
    text = render_prompt(
        len(images),
        tokenizer=tokenizer,
        chat_template=chat_template,
        num_history_tokens=config.tokens_per_history_traj,
    )
    input_ids = tokenize_prompt(
        text,
        image_grid_thw,
        tokenizer=tokenizer,
        image_token_id=config.image_token_id,
        spatial_merge_size=config.vision.spatial_merge_size,
    )[None]
    bins = history_tokens(ego_history_xyz, ego_history_rot, config)
    fused = fuse_history_tokens(
        input_ids, bins + config.history_token_start_idx, placeholder_id=config.traj_token_ids.history
    )
    return {
        "input_ids": input_ids,
        "fused_input_ids": fused,
        "attention_mask": np.ones_like(input_ids),
        "pixel_values": pixel_values,
        "image_grid_thw": image_grid_thw,
        "history_tokens": bins[None],
    }
