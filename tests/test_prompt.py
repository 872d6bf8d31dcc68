"""Extended tokenizer, chat-template prompt and history fusion against the reference fixture and
transformers."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import tokenizers

from alpamayo_jax.config import alpamayo_r1_10b, tiny
from alpamayo_jax.processing.chat_template import PromptError, load_chat_template, render_chat
from alpamayo_jax.processing.clip import Clip
from alpamayo_jax.processing.model_inputs import assemble_inputs, prepare_inputs
from alpamayo_jax.processing.prompt import (
    alpamayo_messages,
    encode_prompt,
    fuse_history_tokens,
    history_tokens,
    render_prompt,
    tokenize_prompt,
)
from alpamayo_jax.processing.tokenizer import (
    SPECIAL_TOKEN_NAMES,
    ExtendedTokenizer,
    TokenizerError,
    build_tokenizer,
    extract_between,
    extract_cot,
    extract_text_fields,
    load_tokenizer,
    special_token,
    traj_token,
    validate_token_ids,
)

CFG = tiny()

# Strings mixing text, Qwen special tokens, Alpamayo special tokens and trajectory bins.
SAMPLES = [
    "output the chain-of-thought reasoning of the driving process",
    "<|cot_start|>Slow down: a pedestrian crosses ahead.<|cot_end|>",
    "<i0><i1><i255> <i17>x<i95>\n<|traj_history|><|traj_future_start|><|traj_future_end|>",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Héllo  wörld 123<|im_end|>\n",
    "<|answer_start|> 42 <|answer_end|><|route_pad|><|endoftext|><i256><|unknown|>",
]


@pytest.fixture(scope="module")
def vlm_dir(fixture_dir):
    return fixture_dir / "vlm"


@pytest.fixture(scope="module")
def tok(vlm_dir):
    return build_tokenizer(vlm_dir, CFG)


@pytest.fixture(scope="module")
def template(vlm_dir):
    return load_chat_template(vlm_dir)


@pytest.fixture(scope="module")
def hf_tok(vlm_dir):
    """The reference's extension, done with transformers."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(vlm_dir))
    discrete = [f"<i{v}>" for v in range(CFG.traj_vocab_size)]
    assert hf.add_tokens(discrete) == len(discrete)
    hf.add_tokens(["<|" + name + "|>" for name in SPECIAL_TOKEN_NAMES], special_tokens=True)
    return hf


@pytest.fixture(scope="module")
def prompt(golden, tok, template):
    return encode_prompt(golden["input.image_frames"], tokenizer=tok, chat_template=template, config=CFG)


@pytest.fixture(scope="module")
def inputs(golden, tok, template):
    clip = Clip.create(golden["input.image_frames"], golden["input.ego_history_xyz"][0, 0],
                       golden["input.ego_history_rot"][0, 0])
    return prepare_inputs([clip], tokenizer=tok, chat_template=template, config=CFG)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def test_token_ids_match_fixture_and_config(tok, golden_meta):
    ids = golden_meta["meta"]["token_ids"]
    assert len(tok) == ids["len(tokenizer)"] == CFG.text.vocab_size
    assert tok.traj_token_start_idx == ids["traj_token_start_idx(<i0>)"] == CFG.traj_token_start_idx
    assert tok.traj_vocab_size == ids["traj_vocab_size"] == CFG.traj_vocab_size
    assert tok.special_token_ids() == ids["special_token_ids"]
    for field, value in ids["traj_token_ids"].items():
        assert getattr(CFG.traj_token_ids, field) == value
    assert tok.pad_token_id == ids["pad_token_id"]
    assert tok.eos_token_id == ids["im_end(eos of text_config)"]
    for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(CFG, name) == ids[name]
    assert ids["hist_token_start_idx"] == CFG.history_token_start_idx
    assert tok.token_to_id(traj_token(CFG.traj_vocab_size - 1)) == 494 + 255
    # Qwen's own special tokens keep their ids.
    for token, index in golden_meta["vlm_dir_info"]["qwen_special_token_ids"].items():
        assert tok.token_to_id(token) == index


def test_matches_transformers(tok, hf_tok):
    assert len(tok) == len(hf_tok)
    assert tok.get_vocab() == hf_tok.get_vocab()
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"], text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    # Special and trajectory tokens are single ids.
    assert tok.encode("<i3><|cot_start|>") == [CFG.traj_token_start_idx + 3, tok.token_to_id("<|cot_start|>")]
    assert tok.special_tokens_map == hf_tok.special_tokens_map


def test_10b_token_table():
    """A stand-in for the Qwen3 tokenizer (151643 BPE entries + its 26 added tokens, image/vision
    tokens at their real ids) extended the reference's way gives SPEC §0.1's id table."""
    qwen_added = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|quad_start|>",
        "<|quad_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    ]
    base = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({f"w{i}": i for i in range(151643)}, unk_token="w0")
    )
    base.add_special_tokens(qwen_added)
    assert base.get_vocab_size() == 151669 and base.token_to_id("<|image_pad|>") == 151655

    base.add_tokens([traj_token(i) for i in range(4000)])
    base.add_special_tokens([special_token(name) for name in SPECIAL_TOKEN_NAMES])
    extended = ExtendedTokenizer(base)
    validate_token_ids(extended, alpamayo_r1_10b())
    expected = {name: 155669 + i for i, name in enumerate(n for n in SPECIAL_TOKEN_NAMES if n != "image_pad")}
    expected["image_pad"] = 151655
    assert extended.special_token_ids() == expected
    assert (expected["cot_start"], expected["traj_future_start"], expected["answer_end"]) == (
        155677,
        155681,
        155696,
    )
    assert len(extended) == 155697 and extended.token_to_id("<i0>") == 151669


def test_save_load_round_trip(tok, hf_tok, tmp_path):
    tok.save(tmp_path / "ours")
    loaded = load_tokenizer(tmp_path / "ours", CFG)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.special_tokens_map == tok.special_tokens_map
    assert loaded.tokenizer.to_str() == tok.tokenizer.to_str()
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    # transformers reads our saved directory, and we read the reference's saved tokenizer.
    transformers = pytest.importorskip("transformers")
    hf_loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    hf_tok.save_pretrained(str(tmp_path / "hf"))
    from_hf = load_tokenizer(tmp_path / "hf", CFG)
    for text in SAMPLES:
        assert hf_loaded(text)["input_ids"] == tok.encode(text) == from_hf.encode(text)


def test_cot_extraction(tok, golden, golden_meta):
    generation = golden_meta["meta"]["generation"]
    assert tok.decode(golden["gen.new_tokens"][0]) == generation["generated_text"]
    assert extract_cot(tok, golden["gen.sequences"]) == [generation["extracted_cot"]]

    # A prompt (ending in <|cot_start|>) continued with reasoning, a meta action and the trajectory.
    generated = tok.encode(
        "  The light turns red, so decelerate. <|cot_end|><|meta_action_start|>stop<|meta_action_end|>"
        "<|traj_future_start|>"
    )
    rows = [golden["fused.input_ids"][0].tolist() + generated, tok.encode("no end token<|cot_start|>x")]
    fields = extract_text_fields(tok, rows)
    assert fields == {
        "cot": ["The light turns red, so decelerate.", ""],
        "meta_action": ["stop", ""],
        "answer": ["", ""],
    }
    texts = [
        "a<|cot_start|>first<|cot_start|> second <|cot_end|>",  # last start before the end
        "<|cot_start|>one<|cot_end|><|cot_start|>two<|cot_end|>",  # first end
        "  no start <|cot_end|>",  # no start: everything before the end
        "<|cot_end|><|cot_start|>after<|cot_end|>",  # first end comes first
    ]
    assert extract_between(texts, "cot") == ["second", "one", "no start", ""]


def test_tokenizer_errors(vlm_dir, tok, tmp_path):
    wrong_start = dataclasses.replace(CFG, traj_token_start_idx=CFG.traj_token_start_idx + 1)
    with pytest.raises(TokenizerError, match=r"<i0> \(traj_token_start_idx\): config expects id 495"):
        build_tokenizer(vlm_dir, wrong_start)
    wrong_ids = dataclasses.replace(CFG, traj_token_ids=dataclasses.replace(CFG.traj_token_ids, history=700))
    with pytest.raises(TokenizerError, match=r"<\|traj_history\|> \(traj_token_ids.history\).*has id 765"):
        validate_token_ids(tok, wrong_ids)
    wrong_size = dataclasses.replace(CFG, text=dataclasses.replace(CFG.text, vocab_size=800))
    with pytest.raises(TokenizerError, match="vocabulary size: tokenizer has 778 ids"):
        validate_token_ids(tok, wrong_size)
    with pytest.raises(TokenizerError, match="does not exist"):
        build_tokenizer(tmp_path / "missing", CFG)
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        build_tokenizer(tmp_path, CFG)
    tok.save(tmp_path / "extended")
    with pytest.raises(TokenizerError, match="already extended"):
        build_tokenizer(tmp_path / "extended", CFG)
    with pytest.raises(TokenizerError, match="not an extended Alpamayo tokenizer"):
        load_tokenizer(vlm_dir)
    with pytest.raises(TypeError):
        build_tokenizer(vlm_dir)
    with pytest.raises(KeyError, match="<i9999>"):
        tok.token_to_id("<i9999>")
    # A config listing an added token that tokenizer.json lacks (transformers would add it silently).
    broken = tmp_path / "broken"
    shutil.copytree(vlm_dir, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["494"] = {"content": "<|extra|>", "special": True}
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"<\|extra\|>"):
        build_tokenizer(broken, CFG)


# ---------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------


def test_prompt_text(tok, template, golden_meta):
    text = render_prompt(16, tokenizer=tok, chat_template=template)
    assert text == golden_meta["meta"]["prompt_text"]
    assert text.endswith("<|im_start|>assistant\n<|cot_start|>")


def test_model_inputs_match_reference(prompt, inputs, golden):
    ids, pixels, grid = prompt
    np.testing.assert_array_equal(ids[None], golden["processor.input_ids"])
    np.testing.assert_array_equal(grid, golden["processor.image_grid_thw"])
    np.testing.assert_array_equal(pixels, golden["processor.pixel_values"])
    assert golden["processor.attention_mask"].all()  # one prompt: nothing padded
    np.testing.assert_array_equal(inputs.input_ids, golden["fused.input_ids"])
    np.testing.assert_array_equal(inputs.pixel_values, golden["processor.pixel_values"])
    assert inputs.image_grid == tuple(map(tuple, golden["processor.image_grid_thw"].tolist()))
    np.testing.assert_array_equal(inputs.position_ids, golden["rope.position_ids"])
    np.testing.assert_array_equal(inputs.rope_deltas, golden["gen.rope_deltas"][:, 0])
    history = history_tokens(golden["input.ego_history_xyz"][0, 0], golden["input.ego_history_rot"][0, 0], CFG)
    np.testing.assert_array_equal(history[None], golden["hist_tokens.raw"])
    assert ids.dtype == np.int64 and inputs.input_ids.dtype == np.int32


def test_history_fusion(prompt, inputs, golden):
    placeholders = np.flatnonzero(prompt[0] == CFG.traj_token_ids.history)
    assert placeholders.size == CFG.tokens_per_history_traj
    assert np.all(np.diff(placeholders) == 1)  # one contiguous run
    fused = inputs.input_ids[0]
    np.testing.assert_array_equal(
        fused[placeholders], golden["hist_tokens.raw"][0] + CFG.history_token_start_idx
    )
    others = np.ones(fused.size, bool)
    others[placeholders] = False
    np.testing.assert_array_equal(fused[others], prompt[0][others])
    assert fused[placeholders[0] - 1] == CFG.traj_token_ids.history_start
    assert fused[placeholders[-1] + 1] == CFG.traj_token_ids.history_end
    hist = fused[placeholders]
    assert np.all(
        (hist >= CFG.history_token_start_idx) & (hist < CFG.traj_token_start_idx + CFG.traj_vocab_size)
    )


def test_image_token_expansion(prompt):
    ids, _, grid = prompt
    per_image = grid.prod(axis=1) // CFG.vision.spatial_merge_size**2
    assert np.sum(ids == CFG.image_token_id) == per_image.sum()
    starts = np.flatnonzero(ids == CFG.vision_start_token_id)
    assert starts.size == 16
    for start, n in zip(starts, per_image):
        assert np.all(ids[start + 1 : start + 1 + n] == CFG.image_token_id)
        assert ids[start + 1 + n] == CFG.vision_end_token_id


# A Qwen-style template exercising what the renderer must reproduce: trim/lstrip of blocks,
# namespaces, `{%- ... -%}` whitespace control, tojson, raise_exception, generation blocks.
QWEN_LIKE_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' + (tools | tojson) + '<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' }}
    {%- for item in messages[0].content %}
        {%- if 'text' in item %}{{- item.text }}{%- endif %}
    {%- endfor %}
    {{- '<|im_end|>\\n' }}
{%- endif %}
{%- set seen = namespace(images=0) %}
{%- for message in messages %}
    {%- if message.role == 'user' or message.role == 'assistant' %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for item in message.content %}
                {%- if item.type == 'image' or 'image' in item %}
                    {%- set seen.images = seen.images + 1 %}
                    {%- if add_vision_id %}Picture {{ seen.images }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif 'text' in item %}
                    {% generation %}{{- item.text }}{% endgeneration %}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role != 'system' %}
        {{- raise_exception('unknown role ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' + eos_token }}
{%- endif %}
"""


@pytest.mark.parametrize("template_name", ["fixture", "qwen_like"])
def test_render_matches_transformers(template_name, template, tok):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    chat_template = template if template_name == "fixture" else QWEN_LIKE_TEMPLATE
    messages = alpamayo_messages(3, num_history_tokens=4)
    string_final = messages[:2] + [{"role": "assistant", "content": "Reasoning so far  "}]
    cases = [
        (messages, {"continue_final_message": True}),
        (messages, {"add_generation_prompt": True}),
        (messages, {"add_vision_id": True, "continue_final_message": True}),
        (string_final, {"continue_final_message": True}),
        (messages[:2], {}),
    ]
    for chat, flags in cases:
        expected, _ = chat_template_utils.render_jinja_template(
            conversations=[chat], chat_template=chat_template, **flags, **tok.special_tokens_map
        )
        assert render_chat(chat, chat_template, **flags, **tok.special_tokens_map) == expected[0], flags


def test_prompt_errors(tok, template, golden, prompt, tmp_path):
    frames = golden["input.image_frames"]
    xyz, rot = golden["input.ego_history_xyz"][0, 0], golden["input.ego_history_rot"][0, 0]
    ids, pixels, grid = prompt

    def build(ego_history_xyz=xyz, ego_history_rot=rot, pixel_values=pixels, image_grid_thw=grid):
        return assemble_inputs(ids[None], pixel_values, image_grid_thw, ego_history_xyz[None], ego_history_rot[None],
                               config=CFG)

    with pytest.raises(PromptError, match="ego_history_xyz must be \\(1, T, 3\\)"):
        build(ego_history_xyz=xyz[None])
    with pytest.raises(PromptError, match="15 steps"):
        build(ego_history_xyz=xyz[1:], ego_history_rot=rot[1:])
    with pytest.raises(PromptError, match="ego_history_rot must be"):
        build(ego_history_rot=rot[:, :2])
    with pytest.raises(PromptError, match="NaN"):
        build(ego_history_xyz=np.where(np.arange(16)[:, None] == 3, np.nan, xyz))
    with pytest.raises(PromptError, match="pixel_values must be float32"):
        build(pixel_values=pixels.astype(np.float64))
    with pytest.raises(PromptError, match="pixel_values must be"):
        build(pixel_values=pixels[:-1])
    with pytest.raises(PromptError, match="NaN or infinite"):
        build(pixel_values=np.where(np.arange(len(pixels))[:, None] == 5, np.inf, pixels).astype(np.float32))
    with pytest.raises(ValueError, match="image grid|image tokens|placeholders"):
        build(pixel_values=pixels[:-24], image_grid_thw=grid[:-1])  # one image fewer than placeholders
    with pytest.raises(ValueError, match="expected \\(n_cameras, n_frames, 3, H, W\\)"):
        encode_prompt(frames[0], tokenizer=tok, chat_template=template, config=CFG)
    with pytest.raises(PromptError, match="a chat template"):
        encode_prompt(frames, tokenizer=tok, chat_template="", config=CFG)

    # A template without images or without the assistant message cannot give the reference prompt.
    no_images = "{% for m in messages %}{% for c in m.content %}{{ c.text }}{% endfor %}{% endfor %}"
    with pytest.raises(PromptError, match="0 image tokens .* but 16 images"):
        encode_prompt(frames, tokenizer=tok, chat_template=no_images, config=CFG)
    drops_last = "{% for m in messages[:-1] %}{{ m.role }}{% endfor %}"
    with pytest.raises(PromptError, match="dropped part of the final message"):
        render_prompt(16, tokenizer=tok, chat_template=drops_last)
    with pytest.raises(PromptError, match="unknown role tool"):
        render_chat([{"role": "tool", "content": "x"}], QWEN_LIKE_TEMPLATE)
    with pytest.raises(PromptError, match="syntax error"):
        render_chat(alpamayo_messages(1), "{% for m in messages %}")
    with pytest.raises(PromptError, match="cannot be used together"):
        render_chat(alpamayo_messages(1), template, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(PromptError, match="no text to continue"):
        render_chat([{"role": "user", "content": [{"type": "image"}]}], template, continue_final_message=True)

    # Placeholder counts must match the history token count.
    ids = tokenize_prompt(
        render_prompt(16, tokenizer=tok, chat_template=template, num_history_tokens=47),
        golden["processor.image_grid_thw"],
        tokenizer=tok,
        image_token_id=CFG.image_token_id,
        spatial_merge_size=CFG.vision.spatial_merge_size,
    )
    with pytest.raises(PromptError, match="expected 48 history placeholders .* found \\[47\\]"):
        fuse_history_tokens(ids[None], np.zeros((1, 48), np.int64), placeholder_id=CFG.traj_token_ids.history)
    with pytest.raises(PromptError, match="16 image tokens .* but 15 images"):
        tokenize_prompt(
            render_prompt(16, tokenizer=tok, chat_template=template),
            golden["processor.image_grid_thw"][:15],
            tokenizer=tok,
            image_token_id=CFG.image_token_id,
            spatial_merge_size=CFG.vision.spatial_merge_size,
        )
    with pytest.raises(PromptError, match="at least one image"):
        alpamayo_messages(0)
    assert history_tokens(xyz, rot, CFG).shape == (48,)

    with pytest.raises(PromptError, match="no chat template"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": {"a": "x", "b": "y"}}))
    with pytest.raises(PromptError, match="none named 'default'"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.json").write_text(
        json.dumps({"chat_template": [{"name": "default", "template": "T"}]})
    )
    assert load_chat_template(tmp_path) == "T"
