"""Checkpoint conversion: the tiny reference checkpoint converts, loads and reproduces NVIDIA's
outputs; export round-trips byte for byte; sharded checkpoints saved by transformers load; every
kind of malformed checkpoint fails with an error naming the tensor or file, leaving no output."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from alpamayo_jax.config import ConfigError, tiny
from alpamayo_jax.io import safetensors as safetensors_module
from alpamayo_jax.io.assign import (
    WeightMapError,
    describe,
    export_plan,
    load_tensors_into,
    plan_assignment,
    read_assignment,
)
from alpamayo_jax.io.bundle import load_bundle
from alpamayo_jax.io.convert import convert_checkpoint
from alpamayo_jax.io.hf import load_hf_checkpoint, save_hf_checkpoint
from alpamayo_jax.io.safetensors import CheckpointFormatError, CheckpointReader, write_safetensors
from alpamayo_jax.nn.variables import module_variables
from alpamayo_jax.io.weight_map import alpamayo_rules, qwen3_vl_rules
from alpamayo_jax.models.alpamayo import AlpamayoR1
from alpamayo_jax.models.vlm import Qwen3VL
from alpamayo_jax.processing.rope_index import get_rope_index
from alpamayo_jax.processing.tokenizer import load_tokenizer
from tests.parity import assert_close, fixture_cache


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, fixture_dir):
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    report = convert_checkpoint(fixture_dir / "hf", fixture_dir / "vlm", out)
    return out, report


def test_report(bundle, checkpoint):
    out, report = bundle
    assert json.loads((out / "conversion_report.json").read_text()) == report
    assert report["num_tensors"] == len(checkpoint) == len(report["sha256"])
    assert report["sha256"] == {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in checkpoint.items()}
    parameters = sum(v.size for k, v in checkpoint.items())
    assert report["num_parameters"] == parameters == sum(report["parameters_per_module"].values())
    assert set(report["parameters_per_module"]) >= {"vlm.visual", "vlm.language_model", "expert"}
    assert (out / "processor" / "chat_template.jinja").is_file()
    tokenizer = load_tokenizer(out / "processor", tiny())
    assert len(tokenizer) == tiny().text.vocab_size


def test_bundle_reproduces_reference_outputs(bundle, golden):
    model, config = load_bundle(bundle[0])
    ids = golden["fused.input_ids"]
    positions, _ = get_rope_index(ids, golden["processor.image_grid_thw"],
                                  spatial_merge_size=config.vision.spatial_merge_size,
                                  image_token_id=config.image_token_id,
                                  vision_start_token_id=config.vision_start_token_id)
    out = model.vlm(jnp.asarray(ids), pixel_values=jnp.asarray(golden["processor.pixel_values"]),
                    image_grid_thw=golden["processor.image_grid_thw"], position_ids=jnp.asarray(positions))
    assert_close(out.logits, golden["vlm.logits"], rel=1e-4, name="vlm.logits from the bundle")
    # The prompt's keys are the first positions of the reference's generation cache.
    assert_close(out.k, fixture_cache(golden, "k", ids.shape[1]), rel=1e-5, name="prompt keys from the bundle")


def test_export_round_trip_is_byte_identical(bundle, fixture_dir, tmp_path, checkpoint):
    model, _ = load_bundle(bundle[0])
    config = json.loads((fixture_dir / "hf" / "config.json").read_text())
    exported = CheckpointReader(save_hf_checkpoint(model, tmp_path / "hf", config))
    assert sorted(exported) == sorted(checkpoint)
    for key, value in checkpoint.items():
        again = exported[key]
        assert again.dtype == value.dtype and again.shape == value.shape, key
        assert again.tobytes() == value.tobytes(), key


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_blockwise_reads_give_the_in_memory_result(fixture_dir, tmp_path, checkpoint, monkeypatch, dtype):
    # Blocks far smaller than the tensors: every tensor is read in many pieces, transposed ones
    # through a view of the parameter, cast ones through the block buffer.
    monkeypatch.setattr(safetensors_module, "READ_BLOCK_BYTES", 1000)
    report = convert_checkpoint(fixture_dir / "hf", fixture_dir / "vlm", tmp_path / "bundle", dtype=dtype)
    assert report["sha256"] == {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in checkpoint.items()}
    converted, _ = load_bundle(tmp_path / "bundle")
    param_dtype = jnp.bfloat16 if dtype else jnp.float32
    expected = AlpamayoR1(tiny(), param_dtype=param_dtype, rngs=nnx.Rngs(0))
    load_tensors_into(expected, checkpoint, alpamayo_rules())
    expected = module_variables(expected)
    for path, variable in module_variables(converted).items():
        value, want = np.asarray(variable.get_value()), np.asarray(expected[path].get_value())
        assert value.dtype == want.dtype and value.tobytes() == want.tobytes(), path


def test_stored_bytes_need_a_checkpoint_reader(tiny_model, checkpoint):
    variables = module_variables(tiny_model)
    item = plan_assignment(variables, describe(checkpoint), alpamayo_rules())[0]
    with pytest.raises(ValueError, match="on_bytes needs a CheckpointReader"):
        read_assignment(item, checkpoint, variables[item.path], on_bytes=lambda data: None)


def test_bf16_conversion_keeps_bf16(fixture_dir, tmp_path, checkpoint):
    source = tmp_path / "hf_bf16"
    source.mkdir()
    shutil.copy(fixture_dir / "hf" / "config.json", source / "config.json")
    write_safetensors(source / "model.safetensors",
                      {k: v.astype(ml_dtypes.bfloat16) for k, v in checkpoint.items()})
    report = convert_checkpoint(source, fixture_dir / "vlm", tmp_path / "out")
    assert report["dtype"] == "bfloat16" and report["source_dtypes"] == ["bfloat16"]
    model, _ = load_bundle(tmp_path / "out")
    values = module_variables(model)
    assert {v.dtype for v in values.values()} == {jnp.dtype(jnp.bfloat16)}
    freqs = np.asarray(values["action_in_proj.sinus.0.freqs"].get_value())
    np.testing.assert_array_equal(freqs, checkpoint["action_in_proj.sinus.0.freqs"].astype(ml_dtypes.bfloat16))
    float32_model, _ = load_bundle(tmp_path / "out", dtype=jnp.float32)
    assert module_variables(float32_model)["expert.norm.scale"].dtype == jnp.float32


def test_sharded_transformers_checkpoint_loads(tmp_path):
    """A backbone saved by transformers itself, in several shards with an index."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from alpamayo_jax.config import TextConfig, VisionConfig

    text = {"model_type": "qwen3_vl_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True}}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2, "out_hidden_size": 32,
              "num_position_embeddings": 16, "deepstack_visual_indexes": [0], "patch_size": 4,
              "temporal_patch_size": 2, "spatial_merge_size": 2}
    torch.manual_seed(0)
    reference = transformers.Qwen3VLForConditionalGeneration(
        transformers.Qwen3VLConfig(text_config=text, vision_config=vision))
    reference.save_pretrained(tmp_path, max_shard_size="20KB", safe_serialization=True)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    reader = CheckpointReader(tmp_path)
    assert len(reader.files) > 2
    model = nnx.eval_shape(lambda: Qwen3VL(VisionConfig.from_hf_config(vision), TextConfig.from_hf_config(text),
                                           image_token_id=60, rngs=nnx.Rngs(0)))
    load_tensors_into(model, reader, qwen3_vl_rules())
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel.get_value()), state["lm_head.weight"].T)
    np.testing.assert_array_equal(np.asarray(model.visual.patch_embed.proj.kernel.get_value()),
                                  state["model.visual.patch_embed.proj.weight"].reshape(16, -1).T)


def test_10b_checkpoint_layout_through_the_weight_map(abstract_10b):
    """`eval_shape` of the 10B model yields exactly the reference checkpoint's 1166 keys (SPEC §11)."""
    shapes = {key: shape for key, (_, _, shape) in export_plan(abstract_10b, alpamayo_rules()).items()}
    assert len(shapes) == 1166
    assert sum(k.startswith("vlm.") for k in shapes) == 750 and sum(k.startswith("expert.") for k in shapes) == 397
    buffers = [k for k in shapes if k.endswith("freqs") or k.startswith("action_space.")]
    assert len(buffers) == 7
    assert sum(int(np.prod(s)) for k, s in shapes.items() if k not in buffers) == 11_078_526_194
    expected = {
        "vlm.model.visual.patch_embed.proj.weight": (1152, 3, 2, 16, 16),
        "vlm.model.visual.pos_embed.weight": (2304, 1152),
        "vlm.model.visual.blocks.26.attn.qkv.weight": (3456, 1152),
        "vlm.model.visual.merger.linear_fc2.weight": (4096, 4608),
        "vlm.model.visual.deepstack_merger_list.2.norm.weight": (4608,),
        "vlm.model.language_model.embed_tokens.weight": (155697, 4096),
        "vlm.model.language_model.layers.35.self_attn.k_proj.weight": (1024, 4096),
        "vlm.model.language_model.layers.0.self_attn.o_proj.weight": (4096, 4096),
        "vlm.model.language_model.layers.0.self_attn.q_norm.weight": (128,),
        "vlm.lm_head.weight": (155697, 4096),
        "expert.layers.35.mlp.down_proj.weight": (2048, 8256),
        "expert.layers.0.self_attn.q_proj.weight": (2048, 2048),
        "expert.norm.weight": (2048,),
        "action_in_proj.sinus.1.freqs": (1, 10),
        "action_in_proj.encoder.trunk.0.weight": (512, 60),
        "action_in_proj.encoder.trunk.5.weight": (512,),
        "action_in_proj.encoder.trunk.6.weight": (2048, 512),
        "action_out_proj.weight": (2, 2048),
        "action_space.accel_std": (),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "expert.embed_tokens.weight" not in shapes and "expert.lm_head.weight" not in shapes


# --- malformed checkpoints ----------------------------------------------------------------------


def _write_checkpoint(directory: Path, tensors: dict, fixture_dir: Path, config: dict | None = None,
                      shards: int = 1) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = config or json.loads((fixture_dir / "hf" / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config))
    if shards == 1:
        write_safetensors(directory / "model.safetensors", tensors)
        return
    keys = sorted(tensors)
    weight_map = {}
    for index in range(shards):
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[index::shards]
        write_safetensors(directory / name, {k: tensors[k] for k in part})
        weight_map.update({k: name for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length:])


Q_PROJ = "vlm.model.language_model.layers.0.self_attn.q_proj.weight"
GATE = "vlm.model.language_model.layers.1.mlp.gate_proj.weight"
SHARD_1 = "model-00001-of-00002.safetensors"


def _mutations():
    """name -> (mutate(directory, tensors, fixture_dir) writing the bad checkpoint, error type,
    pattern the message must contain)."""

    def tensors_edit(edit, shards=1):
        def mutate(d, t, fx):
            t = dict(t)
            edit(t)
            _write_checkpoint(d, t, fx, shards=shards)
        return mutate

    def after_write(edit, shards=1):
        def mutate(d, t, fx):
            _write_checkpoint(d, t, fx, shards=shards)
            edit(d)
        return mutate

    def config_edit(edit, backbone=False):
        def mutate(d, t, fx):
            config = json.loads((fx / "hf" / "config.json").read_text())
            if backbone:
                vlm = d.parent / "vlm_bad"
                shutil.copytree(fx / "vlm", vlm)
                backbone_config = json.loads((vlm / "config.json").read_text())
                edit(backbone_config)
                (vlm / "config.json").write_text(json.dumps(backbone_config))
            else:
                edit(config)
            _write_checkpoint(d, t, fx, config=config)
        return mutate

    def truncate(d):
        path = d / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-100])

    def duplicate_across_shards(d):
        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        other = next(p for p in sorted(d.glob("*.safetensors")) if p.name != index[Q_PROJ])
        write_safetensors(other, {**CheckpointReader(other), Q_PROJ: np.zeros((64, 64), np.float32)})

    def extra_shard(d):
        write_safetensors(d / "model-00003-of-00002.safetensors", {"extra": np.zeros(2, np.float32)})

    def drop_shard(d):
        (d / SHARD_1).unlink()

    def index_moves_key(d):
        index = json.loads((d / "model.safetensors.index.json").read_text())
        index["weight_map"][Q_PROJ] = "model-00002-of-00002.safetensors" if index["weight_map"][Q_PROJ] == SHARD_1 \
            else SHARD_1
        (d / "model.safetensors.index.json").write_text(json.dumps(index))

    def set_dtype(name):
        def edit(header):
            header[Q_PROJ]["dtype"] = name
        return edit

    def overlap(header):
        header[GATE]["data_offsets"] = header[Q_PROJ]["data_offsets"]
        header[GATE]["shape"] = header[Q_PROJ]["shape"]

    def bf16(t):
        t[Q_PROJ] = t[Q_PROJ].astype(ml_dtypes.bfloat16)

    def header_edit(edit):
        return lambda d: _rewrite_header(d / "model.safetensors", edit)

    return {
        "missing tensor": (tensors_edit(lambda t: t.pop(Q_PROJ)), WeightMapError, "missing parameter.*q_proj"),
        "unexpected tensor": (tensors_edit(lambda t: t.update({"vlm.model.extra.weight": np.zeros(3, np.float32)})),
                              WeightMapError, "unexpected checkpoint key 'vlm.model.extra.weight'"),
        "renamed key": (tensors_edit(lambda t: t.update({Q_PROJ.replace("q_proj", "qproj"): t.pop(Q_PROJ)})),
                        WeightMapError, "qproj.*no rule claims it"),
        "wrong shape": (tensors_edit(lambda t: t.update({Q_PROJ: np.zeros((65, 64), np.float32)})), WeightMapError,
                        "q_proj.*shape \\(65, 64\\) does not fit"),
        "transposed matrix": (tensors_edit(lambda t: t.update({GATE: t[GATE].T.copy()})), WeightMapError,
                              "gate_proj.*shape \\(64, 128\\) does not fit"),
        "integer dtype": (tensors_edit(lambda t: t.update({Q_PROJ: t[Q_PROJ].astype(np.int32)})), WeightMapError,
                          "q_proj.*not a floating type"),
        "mixed dtypes": (tensors_edit(bf16), ValueError, "mixes floating dtypes"),
        "truncated file": (after_write(truncate), CheckpointFormatError, "model.safetensors.*truncated"),
        "empty file": (after_write(lambda d: (d / "model.safetensors").write_bytes(b"")), CheckpointFormatError,
                       "model.safetensors.*too short"),
        "corrupt header": (after_write(lambda d: (d / "model.safetensors").write_bytes(
            struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64)), CheckpointFormatError,
            "model.safetensors: unreadable header"),
        "header longer than file": (after_write(lambda d: (d / "model.safetensors").write_bytes(
            struct.pack("<Q", 10**6) + b"{}")), CheckpointFormatError, "header length.*exceeds"),
        "bf16 data claimed as f32": (_bf16_claimed_f32, CheckpointFormatError, "q_proj.*spans .* bytes but F32"),
        "unsupported dtype": (after_write(header_edit(set_dtype("F8_E5M2"))), CheckpointFormatError,
                              "q_proj.*unsupported dtype 'F8_E5M2'"),
        "overlapping tensors": (after_write(header_edit(overlap)), CheckpointFormatError, "overlap"),
        "malformed header entry": (after_write(header_edit(lambda h: h.update({Q_PROJ: {"dtype": "F32"}}))),
                                   CheckpointFormatError, "q_proj.*malformed header entry"),
        "index names a missing shard": (after_write(drop_shard, shards=2), CheckpointFormatError,
                                        f"names shard {SHARD_1}, which does not exist"),
        "extra shard": (after_write(extra_shard, shards=2), CheckpointFormatError,
                        "model-00003-of-00002.safetensors is not referenced"),
        "duplicated across shards": (after_write(duplicate_across_shards, shards=2), CheckpointFormatError,
                                     "q_proj.*(stored twice|index places it)"),
        "index places key in the wrong shard": (after_write(index_moves_key, shards=2), CheckpointFormatError,
                                                "q_proj"),
        "unreadable index": (after_write(lambda d: (d / "model.safetensors.index.json").write_text("{"), shards=2),
                             CheckpointFormatError, "unreadable index"),
        "no weights": (after_write(lambda d: (d / "model.safetensors").unlink()), CheckpointFormatError,
                       "neither model.safetensors nor"),
        "config sizes disagree with weights": (
            config_edit(lambda b: b["text_config"].update(intermediate_size=96), backbone=True), ConfigError,
            "text_config.intermediate_size = 96, but the weights have 128 .*up_proj.weight"),
        "expert config disagrees with weights": (
            config_edit(lambda c: c["expert_cfg"].update(num_attention_heads=4)), ConfigError,
            "expert_cfg.num_attention_heads = 4, but the weights have 6"),
        "layer count disagrees with weights": (
            config_edit(lambda b: b["text_config"].update(num_hidden_layers=2), backbone=True), ConfigError,
            "num_hidden_layers = 2, but the weights have 3"),
        "unknown config field": (config_edit(lambda c: c.update(surprise=1)), ConfigError, "surprise"),
        "missing config": (after_write(lambda d: (d / "config.json").unlink()), FileNotFoundError, "config.json"),
    }


def _bf16_claimed_f32(d, t, fx):
    """A bf16 tensor whose header claims F32."""
    t = dict(t)
    t[Q_PROJ] = t[Q_PROJ].astype(ml_dtypes.bfloat16)
    _write_checkpoint(d, t, fx)

    def claim(header):
        header[Q_PROJ]["dtype"] = "F32"
    _rewrite_header(d / "model.safetensors", claim)


@pytest.mark.parametrize("name", list(_mutations()))
def test_malformed_checkpoint_fails_cleanly(name, tmp_path, checkpoint, fixture_dir):
    mutate, error, pattern = _mutations()[name]
    source = tmp_path / "hf"
    mutate(source, checkpoint, fixture_dir)
    out = tmp_path / "converted"
    processor = tmp_path / "vlm_bad" if (tmp_path / "vlm_bad").is_dir() else fixture_dir / "vlm"
    with pytest.raises(error, match=pattern) as raised:
        convert_checkpoint(source, processor, out)
    print(f"{name}: {str(raised.value).splitlines()[-1][:200]}")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")]
    assert len(_mutations()) >= 20


def test_existing_output_is_kept_without_force(bundle, fixture_dir, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        convert_checkpoint(fixture_dir / "hf", fixture_dir / "vlm", out)
    assert (out / "precious.txt").read_text() == "keep me"
    convert_checkpoint(fixture_dir / "hf", fixture_dir / "vlm", out, force=True)
    assert not (out / "precious.txt").exists() and (out / "params").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_processor_directory_must_be_complete(fixture_dir, tmp_path):
    processor = tmp_path / "processor"
    shutil.copytree(fixture_dir / "vlm", processor)
    (processor / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        convert_checkpoint(fixture_dir / "hf", processor, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_direct_load_from_hf_directory(fixture_dir, tiny_model):
    model, _ = load_hf_checkpoint(fixture_dir / "hf")
    ours, reference = module_variables(model), module_variables(tiny_model)
    assert ours.keys() == reference.keys()
    for path in ours:
        np.testing.assert_array_equal(np.asarray(ours[path].get_value()), np.asarray(reference[path].get_value()))


def test_command_line(fixture_dir, tmp_path, checkpoint):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "alpamayo_jax.cli", *args], capture_output=True, text=True,
                              timeout=300)

    out = tmp_path / "bundle"
    convert = ["convert", "--hf-dir", str(fixture_dir / "hf"), "--processor-dir", str(fixture_dir / "vlm"),
               "--out", str(out), "--quiet"]
    first = run(*convert)
    assert first.returncode == 0, first.stderr
    assert "converted 146 tensors" in first.stdout and (out / "conversion_report.json").is_file()
    again = run(*convert)
    assert again.returncode == 1 and "already exists" in again.stderr
    exported = run("export", "--model", str(out), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    assert sorted(CheckpointReader(tmp_path / "hf")) == sorted(checkpoint)
    missing = run("convert", "--hf-dir", str(tmp_path / "nowhere"), "--processor-dir", str(fixture_dir / "vlm"),
                  "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


def test_verify_against_pytorch_reference(bundle, fixture_dir, tmp_path, checkpoint):
    """`alpamayo-jax verify` passes on a faithful bundle and names the stage that breaks when the
    reference checkpoint differs from what was converted (here: one expert weight)."""
    pytest.importorskip("torch")
    from alpamayo_reference.verify import verify

    errors = verify(bundle[0], fixture_dir / "hf", processor_dir=fixture_dir / "vlm")
    print("\n".join(f"{e.stage}: max abs {e.max_abs:.3e}, relative {e.relative:.3e}" for e in errors))
    assert [e.stage for e in errors][:2] == ["vision tokens", "prefill logits"]
    assert all(e.ok for e in errors)

    altered = tmp_path / "hf"
    altered.mkdir()
    shutil.copy(fixture_dir / "hf" / "config.json", altered / "config.json")
    key = "expert.layers.1.mlp.down_proj.weight"
    write_safetensors(altered / "model.safetensors", {**checkpoint, key: checkpoint[key] * 1.01})
    failed = {e.stage for e in verify(bundle[0], altered, processor_dir=fixture_dir / "vlm") if not e.ok}
    assert failed == {"expert velocity (t=0.0)", "expert velocity (t=0.7)"}

    result = subprocess.run([sys.executable, "-m", "alpamayo_jax.cli", "verify", "--model", str(bundle[0]),
                             "--hf-dir", str(altered), "--processor-dir", str(fixture_dir / "vlm")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "verification FAILED: expert velocity" in result.stdout
