"""Fine-tuning verification: NVIDIA's own PyTorch training code and ours on the same batch,
gradient by gradient (`alpamayo-jax verify --stage 1` and `--stage 2`).

Stage 1 (`verify_stage1`). The reference side is NVIDIA's `TrainableReasoningVLA`, built as its
stage-1 recipe builds it (`from_alpamayo_checkpoint` on the Hugging Face checkpoint, float32,
train mode), fed by its own data path on the same clips (with the `cot` component when they carry
Chain-of-Causation text), its loss (a sum of two means) run backward; every VLM parameter's
gradient is compared. Its loader reads only sharded checkpoints: a single `model.safetensors` is
handed to it through a one-shard index in a scratch directory (weights linked, not copied). One
thing in its data path is changed, and only where it would otherwise miss: its mask of the
assistant's `<|im_end|>` looks the role "assistant" up as one token, which a small tokenizer (the
fixture's) may not have; the turn is then found by the role's first token, as the fixture's
recording did (`_structural_assistant_role`, noted in the report). Qwen's tokenizer has the token
and nothing changes.

Stage 2 (`verify_stage2`). The reference side is the stage-2 model of an NVlabs/alpamayo source tree (`reference_src`; the
fixture's numbers come from commit 1cba38c): its trainable class built from the Hugging Face
checkpoint directory with the VLM frozen (`cotrain_vlm=False`, `stop_grad_from_vlm=True`), in
float32 and train mode, fed by the reference's own data path on the same clips (the preprocessing
its `vla_processor.yaml` configures and the collate its `sft_base.yaml` names, left padding), its
loss run backward. Our side is `alpamayo_jax.training.stage2.stage2_gradients` on our collate of
the clips, float32 with the highest matmul precision.

Randomness. The reference draws the flow time and the noise inside its flow-matching module; to
inject the given values, exactly two draws are replaced and nothing else:

* the timestep draw: for the beta sampler, `sample` of the model's `FlowMatching.beta_dist`
  (an instance attribute, replaced for the duration of the forward) returns the beta value whose
  `0.999 - 0.999 beta` is the given flow time (an exact float32 match is searched; where none
  exists the nearest is taken, our side is fed the flow time the reference then computes, and a
  note says by how much it moved); for the uniform sampler, `rand` of the flow-matching module's
  `torch` returns the given times;
* the noise draw: `randn_like` of the flow-matching module's `torch` returns the given noise.

"The flow-matching module's `torch`" is the module-global name `torch` of the module defining the
model's diffusion class, swapped for the duration of the forward with a proxy that answers those
one or two names and forwards every other attribute to torch. Each replaced draw must be called
exactly once (checked). The clean actions x that the reference computes reach the noise draw as
its argument and are recorded there; forward hooks (observation only) record the VLM's inputs,
the expert's input actions and times and the prediction.

Clean actions. `actions="reference"` (the default) feeds our loss the reference's x, so that the
gradient rows measure the VLM cache, the expert and the loss, where float32 implementations
agree to ~1e-6; the `clean actions x` row compares our `traj_to_action` with the reference's on
its own. `actions="ours"` runs ours end to end on our own x: `traj_to_action` is ill-conditioned
in float32 (regularised least squares), so the gradients then differ by up to a few 1e-3 relative
and need a tolerance like 5e-2 (see tests/fixtures/tiny_ar1_dev/train/README.md).

Expert attention. The reference's training code passes its expert no attention mask, so the 64
action tokens attend causally and the left padding of shorter prompts stays visible;
`expert_attention="reference"` reproduces that. Our `"default"` mode (bidirectional, padding
masked, as at inference) is expected to FAIL against the reference: the report then shows by how
much the two trainings differ.

Environment. NVIDIA's code needs hydra-core, omegaconf (with antlr4-python3-runtime) and
colorlog, and transformers' Qwen3-VL processor, which the reference builds, needs torchvision;
install them into a directory of their own and put it on PYTHONPATH, keeping them out of the
project's environment (`check_reference` names what is missing). A torchvision wheel built for a
different torch variant (e.g. a CUDA build next to a CPU torch) is fine: its compiled operators
are never used, but its import registers fake kernels for two of them (`torchvision::nms`,
`torchvision::qnms`) and fails when the extension did not load; `import_torchvision` then
declares those two operator schemas, without any kernel, and imports it again (noted in the
report). The reference tree's `src/` and root are prepended to `sys.path` and stay there.

CPU kernels. PyTorch picks its CPU kernels by instruction set, so the reference's own float32
numbers move by a few 1e-7 relative between machines (not between thread counts). The training
fixture was produced with AVX2 kernels: on an AVX-512 machine, `ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2` in the environment reproduces its stage-2 loss, prediction and gradients
bit for bit. Our side is unaffected by these variables.

Configuration values the reference reads from the checkpoint's config.json are kept, except
`vlm_name_or_path` (set to `processor_dir`: the stored value is a hub id or a relative path),
`model_dtype` (float32) and an `attn_implementation` other than "sdpa"/"eager" (set to "sdpa":
flash attention does not run in float32 on a CPU); each change is noted.

In stage 2 the reference's assistant-role lookup is left as it is: the labels mask only affects
the VLM's own loss, which stage 2 discards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import re
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from alpamayo_reference.verify import StageError, compare

# (module, what to install) for everything NVIDIA's fine-tuning code imports beyond torch and
# transformers; the versions are those the training fixture was produced with.
REFERENCE_DEPENDENCIES = (
    ("hydra", "hydra-core==1.3.8"),
    ("omegaconf", "omegaconf==2.3.0"),
    ("antlr4", "antlr4-python3-runtime==4.9.3"),
    ("colorlog", "colorlog"),
    ("torchvision", "torchvision==0.28.0"),
    ("einops", "einops"),
    ("scipy", "scipy"),
    ("rich", "rich"),
)
# Files of the NVlabs/alpamayo tree this tool reads or imports.
REFERENCE_FILES = (
    "src/alpamayo_r1/models/alpamayo_r1.py",
    "src/alpamayo_r1/config.py",
    "src/alpamayo_r1/processor/qwen_processor.py",
    "finetune/sft/models/sft_alpamayo_r1.py",
    "finetune/sft/models/sft_base_model.py",
    "finetune/sft/configs/vla_processor.yaml",
    "finetune/sft/configs/sft_base.yaml",
)
REFERENCE_COMMIT = "1cba38c"
ACTION_MODES = ("reference", "ours")
# The camera index the reference's clip loader gives each of our canonical cameras
# (`alpamayo_jax.processing.clip.CAMERA_NAMES`); only their order matters (it sorts by index).
CAMERA_INDICES = {"cross_left_120fov": 0, "front_wide_120fov": 1, "cross_right_120fov": 2, "front_tele_30fov": 6}
# torchvision operators whose fake kernels its import registers unconditionally.
_TORCHVISION_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


class ReferenceUnavailable(RuntimeError):
    """NVIDIA's source tree or one of its Python dependencies is missing; the message says what to
    get and how."""


def check_reference(reference_src: str | Path | None) -> Path:
    """The reference source tree as a path, after checking that it is an NVlabs/alpamayo tree and
    that the packages its fine-tuning code imports are importable (nothing is imported here). Raises
    `ReferenceUnavailable` naming everything that is missing."""
    clone = f"an NVlabs/alpamayo source tree (git clone https://github.com/NVlabs/alpamayo, commit {REFERENCE_COMMIT})"
    if reference_src is None:
        raise ReferenceUnavailable(f"fine-tuning verification runs NVIDIA's training code: pass --reference-src, {clone}")
    root = Path(reference_src)
    if not root.is_dir():
        raise ReferenceUnavailable(f"--reference-src {root} is not a directory; it must be {clone}")
    missing_files = [name for name in REFERENCE_FILES if not (root / name).is_file()]
    if missing_files:
        raise ReferenceUnavailable(f"--reference-src {root} is not {clone}: missing {', '.join(missing_files)}")
    missing = [(module, package) for module, package in REFERENCE_DEPENDENCIES
               if importlib.util.find_spec(module) is None]
    if missing:
        names = ", ".join(f"{module} ({package})" for module, package in missing)
        packages = " ".join(package for _, package in missing)
        raise ReferenceUnavailable(
            f"NVIDIA's training code needs Python packages that are not importable here: {names}. Install "
            f"them into a directory of their own, not the project's environment, and put it on PYTHONPATH: "
            f"`pip install --no-deps --target DIR {packages}`, then `PYTHONPATH=DIR alpamayo-jax verify "
            f"--stage 1|2 ...`. (torchvision is what transformers' Qwen3-VL processor needs; a wheel built for "
            f"another torch variant works, its compiled operators are not used.)")
    return root


def import_torchvision(notes: list[str]) -> None:
    """Imports torchvision; when its compiled extension did not load and its import fails on the
    fake kernels it registers for `nms`/`qnms`, declares those operator schemas (no kernel, so
    calling them raises) and imports it again."""
    import torch

    if "torchvision" in sys.modules:
        return
    try:
        import torchvision
        return
    except RuntimeError as error:
        if not re.search(r"operator torchvision::\w+ does not exist", str(error)):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    declared = []
    for op, schema in _TORCHVISION_SCHEMAS.items():
        try:
            getattr(torch.ops.torchvision, op)
        except (AttributeError, RuntimeError):
            torch.library.define(f"torchvision::{op}", schema)
            declared.append(op)
    import torchvision

    notes.append(f"torchvision {torchvision.__version__}: its compiled extension does not load with torch "
                 f"{torch.__version__}; declared the operator schema(s) {', '.join(declared)} (no kernel) so that "
                 "its Python transforms, used by the Qwen3-VL image processor, import")


def _prepend_path(*paths: Path) -> None:
    for path in reversed(paths):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


@dataclasses.dataclass
class ReferenceRun:
    """What NVIDIA's stage-2 code computed on the batch (float32 numpy)."""

    loss: float
    gradients: dict[str, np.ndarray]  # checkpoint key -> d loss / d parameter, every trainable parameter
    actions: np.ndarray  # (B, W, C) clean normalised actions x (its traj_to_action)
    noisy_actions: np.ndarray  # (B, W, C) the expert's input t x + (1 - t) eps
    timesteps: np.ndarray  # (B,) flow times the expert saw
    prediction: np.ndarray  # (B, W, C) predicted velocity
    vlm_inputs: dict[str, np.ndarray]  # input_ids (history fused), attention_mask, pixel_values, image_grid_thw
    notes: list[str]


@dataclasses.dataclass
class TrainingReport:
    """Per-tensor errors of one fine-tuning forward/backward, ours against the reference's."""

    errors: list[StageError]
    notes: list[str]
    loss: float  # ours
    reference: ReferenceRun | Stage1ReferenceRun

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.errors)


def _reference_config(hf_dir: Path, processor_dir: Path, notes: list[str]) -> dict:
    config = json.loads((hf_dir / "config.json").read_text())
    config["vlm_name_or_path"] = str(Path(processor_dir).absolute())
    if config.get("model_dtype") != "float32":
        notes.append(f"reference config: model_dtype {config.get('model_dtype')!r} -> 'float32'")
        config["model_dtype"] = "float32"
    if config.get("attn_implementation") not in ("sdpa", "eager"):
        notes.append(f"reference config: attn_implementation {config.get('attn_implementation')!r} -> 'sdpa'")
        config["attn_implementation"] = "sdpa"
    return config


def _reference_sample(clip) -> dict:
    """One clip as the reference's dataset returns a sample (before its preprocessing): camera
    frames (C, F, 3, H, W) uint8, camera indices, frame times relative to the earliest frame,
    ego poses (1, T, ...)."""
    import torch

    from alpamayo_jax.processing.clip import CAMERA_NAMES, FRAME_TIMESTAMPS

    sizes = {np.shape(camera)[-2:] for camera in clip.camera_frames}
    if len(sizes) > 1:
        raise ValueError(f"the reference's data path stacks a clip's cameras: all cameras of a clip must share "
                         f"one image size, got {sorted(sizes)}")
    frames = np.array(np.stack(list(clip.camera_frames)), np.uint8)
    cameras, num_frames = frames.shape[:2]
    names = clip.camera_names or CAMERA_NAMES[:cameras]
    times = np.asarray(FRAME_TIMESTAMPS if clip.timestamps is None else clip.timestamps, np.float64)
    if times.shape != (num_frames,):
        times = np.arange(num_frames) * 0.1
    times = np.tile(times - times.min(), (cameras, 1)).astype(np.float32)

    def ego(array) -> torch.Tensor:
        return torch.from_numpy(np.array(array, np.float32))[None]

    return {"image_frames": torch.from_numpy(frames),
            "camera_indices": torch.tensor([CAMERA_INDICES[name] for name in names], dtype=torch.int64),
            "relative_timestamps": torch.from_numpy(times),
            "ego_history_xyz": ego(clip.ego_history_xyz), "ego_history_rot": ego(clip.ego_history_rot),
            "ego_future_xyz": ego(clip.ego_future_xyz), "ego_future_rot": ego(clip.ego_future_rot)}


# The reference's prompt components for a batch without and with Chain-of-Causation text (its
# vla_processor.yaml lists the first; the cot component is its own, placed as our training prompt
# places it: alpamayo_jax/processing/training_prompt.py).
TRAJECTORY_COMPONENTS = {"components_order": ["image", "traj_history", "prompt", "traj_future"],
                         "components_prompt": ["traj_future"], "label_components": ["traj_future"]}
COT_COMPONENTS = {"components_order": ["image", "traj_history", "prompt", "cot", "traj_future"],
                  "components_prompt": ["cot", "traj_future"], "label_components": ["cot", "traj_future"]}


@contextlib.contextmanager
def _structural_assistant_role(notes: list[str]):
    """Within the block, the reference's assistant-`<|im_end|>` mask finds the assistant turn by
    the first token of "assistant" when the tokenizer has no single token for it (the fixture's
    toy tokenizer; Qwen's has one, and nothing changes). Without this the reference silently drops
    the assistant's `<|im_end|>` from the labels (fixture README: `labels_mask_toy_unpatched`)."""
    from alpamayo_r1.processor import qwen_processor

    original = qwen_processor.get_role_eos_mask

    def get_role_eos_mask(input_ids, tokenizer, *args, role="assistant", **kwargs):
        role_id = tokenizer.convert_tokens_to_ids(role)
        if role_id is None or role_id == tokenizer.unk_token_id:
            first = tokenizer.encode(role, add_special_tokens=False)[0]
            note = (f"reference labels: the tokenizer has no single token {role!r}; its assistant turn is found by "
                    f"its first token (id {first}), as in the fixture")
            if note not in notes:
                notes.append(note)
            tokenizer = _TokenLookup(tokenizer, {role: first})
        return original(input_ids, tokenizer, *args, role=role, **kwargs)

    qwen_processor.get_role_eos_mask = get_role_eos_mask
    try:
        yield
    finally:
        qwen_processor.get_role_eos_mask = original


class _TokenLookup:
    """A tokenizer whose `convert_tokens_to_ids` answers a few tokens itself."""

    def __init__(self, tokenizer, ids: dict[str, int]):
        self._tokenizer, self._ids = tokenizer, ids

    def convert_tokens_to_ids(self, token):
        return self._ids[token] if token in self._ids else self._tokenizer.convert_tokens_to_ids(token)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _reference_batch(root: Path, model_config, clips: Sequence, notes: list[str], *,
                     structural_assistant: bool = False) -> dict:
    """The reference's data path on `clips`: the preprocessing of its training dataset
    (vla_processor.yaml with generation_mode false, as sft_base.yaml sets for training; with the cot
    component when the clips carry Chain-of-Causation text), then the collate sft_base.yaml names
    (left padding). `structural_assistant`: see `_structural_assistant_role`."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    with_cot = {clip.cot is not None for clip in clips}
    if len(with_cot) > 1:
        raise ValueError("the reference supervises one set of components per batch: either every clip carries "
                         "Chain-of-Causation text (cot) or none does")
    configs = root / "finetune" / "sft" / "configs"
    preprocess_config = OmegaConf.load(configs / "vla_processor.yaml")
    preprocess_config.generation_mode = False
    preprocess_config.update(COT_COMPONENTS if with_cot == {True} else TRAJECTORY_COMPONENTS)
    preprocess = instantiate(preprocess_config, model_config=model_config)
    collate = instantiate(OmegaConf.load(configs / "sft_base.yaml").data.collate_fn, _convert_="partial",
                          model_config=model_config)
    samples = []
    for clip in clips:
        sample = _reference_sample(clip)
        if clip.cot is not None:
            sample["cot"] = clip.cot
        sample["tokenized_data"] = preprocess(data=sample)
        samples.append(sample)
    with _structural_assistant_role(notes) if structural_assistant else contextlib.nullcontext():
        return collate(samples)


def _beta_for(timesteps: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(beta, t) float32: per row the beta value whose `scale - beta * scale` (in torch float32, as
    the reference computes it) is the given flow time, or the nearest one, and that flow time."""
    import torch

    def time_of(beta: np.ndarray) -> np.ndarray:
        return (scale - torch.from_numpy(beta) * scale).numpy()

    betas, times = [], []
    for t in np.asarray(timesteps, np.float32):
        guess = np.float32((scale - np.float64(t)) / scale)
        candidates = [guess]
        for direction in (np.float32(-np.inf), np.float32(np.inf)):
            value = guess
            for _ in range(8):
                value = np.nextafter(value, direction, dtype=np.float32)
                candidates.append(value)
        candidates = np.asarray(candidates, np.float32)
        reached = time_of(candidates)
        best = int(np.argmin(np.abs(reached.astype(np.float64) - np.float64(t))))
        betas.append(candidates[best])
        times.append(reached[best])
    return np.asarray(betas, np.float32), np.asarray(times, np.float32)


class _TorchProxy(types.ModuleType):
    """Stands for `torch` in one module: a few names answered here, every other one torch's."""

    def __init__(self, torch_module, overrides: dict):
        super().__init__("torch")
        self._torch = torch_module
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(self._torch, name)


@contextlib.contextmanager
def torch_overrides(diffusion, overrides: dict):
    """Within the block, `torch.<name>` for each name of `overrides` is the given function in the
    module of `diffusion`'s class (NVIDIA's flow matching), every other name torch's own."""
    import torch

    module = sys.modules[type(diffusion).__module__]
    if getattr(module, "torch", None) is not torch:
        raise RuntimeError(f"{module.__name__} does not use torch as a module global: cannot inject the draws")
    module.torch = _TorchProxy(torch, overrides)
    try:
        yield
    finally:
        module.torch = torch


@contextlib.contextmanager
def _injected_flow_draws(model, timesteps: np.ndarray, noise: np.ndarray, record: dict, notes: list[str]):
    """Replaces the reference's flow-time and noise draws with the given values (module docstring)."""
    import torch

    diffusion = model.diffusion
    calls = {"timesteps": 0, "noise": 0}

    def randn_like(x, *args, **kwargs):
        calls["noise"] += 1
        if tuple(x.shape) != noise.shape:
            raise ValueError(f"flow noise must be {tuple(x.shape)} (B, waypoints, action dims) for this batch, got "
                             f"{noise.shape}")
        record["actions"] = x.detach().to(torch.float32).numpy().copy()
        return torch.from_numpy(np.array(noise)).to(dtype=x.dtype, device=x.device)

    overrides = {"randn_like": randn_like}
    sampler = getattr(diffusion, "train_timestep_sampler", None)
    saved_beta = None
    if sampler == "beta":
        scale = float(diffusion.beta_scale_constant)
        beta, reached = _beta_for(timesteps, scale)
        moved = float(np.max(np.abs(reached.astype(np.float64) - timesteps)))
        if moved > 0:
            notes.append(f"flow times: no float32 beta draw gives them exactly; the reference used times up to "
                         f"{moved:.3g} away, and ours was fed the same")
        record["timesteps_injected"] = reached

        class _Draw:
            def sample(self, shape=()):
                calls["timesteps"] += 1
                if tuple(shape) != beta.shape:
                    raise ValueError(f"the reference drew {tuple(shape)} flow times for {beta.shape[0]} given")
                return torch.from_numpy(beta.copy())

        saved_beta = diffusion.beta_dist
        diffusion.beta_dist = _Draw()
    elif sampler == "uniform":
        def rand(*size, **kwargs):
            calls["timesteps"] += 1
            return torch.from_numpy(np.array(timesteps, np.float32))

        overrides["rand"] = rand
        record["timesteps_injected"] = np.asarray(timesteps, np.float32)
    else:
        raise ValueError(f"unknown reference train_timestep_sampler {sampler!r}")
    try:
        with torch_overrides(diffusion, overrides):
            yield
    finally:
        if saved_beta is not None:
            diffusion.beta_dist = saved_beta
    if calls != {"timesteps": 1, "noise": 1}:
        raise RuntimeError(f"expected one flow-time and one noise draw in the reference's forward, got {calls}")


def _open_reference(reference_src: str | Path, hf_dir: str | Path) -> tuple[Path, Path, list[str]]:
    """(tree root, checkpoint directory, notes) once the tree is checked and importable and
    `hf_dir` is a Hugging Face checkpoint; the notes start with what importing torchvision took."""
    root = check_reference(reference_src).absolute()
    _prepend_path(root / "src", root)
    notes: list[str] = []
    import_torchvision(notes)
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{hf_dir} is not a Hugging Face checkpoint directory (no config.json): the reference "
                         "loads one")
    return root, hf_dir, notes


def _trainable_gradients(model, notes: list[str]) -> dict[str, np.ndarray]:
    """name -> float32 gradient of every trainable parameter after `backward`; a note names those
    that got none."""
    import torch

    gradients, missing = {}, []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.grad is None:
            missing.append(name)
        else:
            gradients[name] = parameter.grad.detach().to(torch.float32).numpy().copy()
    if missing:
        notes.append(f"reference: {len(missing)} trainable parameter(s) got no gradient: {', '.join(missing[:5])}")
    return gradients


def reference_stage2(hf_dir: str | Path, clips: Sequence, *, processor_dir: str | Path,
                     reference_src: str | Path, flow_timesteps: np.ndarray, flow_noise: np.ndarray) -> ReferenceRun:
    """NVIDIA's stage-2 model from the Hugging Face checkpoint `hf_dir`, its data path on `clips`
    (`alpamayo_jax.processing.clip.Clip` with ground truth), the given flow draws injected, its loss
    backward in float32: the loss, every trainable parameter's gradient keyed by checkpoint key, and
    what it computed on the way."""
    root, hf_dir, notes = _open_reference(reference_src, hf_dir)
    import torch
    from alpamayo_r1.config import AlpamayoR1Config
    from finetune.sft.models.sft_alpamayo_r1 import TrainableAlpamayoR1

    config = AlpamayoR1Config(**_reference_config(hf_dir, Path(processor_dir), notes))
    model = TrainableAlpamayoR1.from_pretrained(str(hf_dir), config=config, dtype=torch.float32,
                                                cotrain_vlm=False, stop_grad_from_vlm=True)
    model.train()  # as the Trainer runs it

    batch = _reference_batch(root, model.config, clips, notes)

    record: dict = {}

    def vlm_inputs(module, args, kwargs):
        record["vlm"] = {key: kwargs[key].detach().numpy().copy()
                         for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}

    def expert_inputs(module, args):
        record["noisy_actions"] = args[0].detach().to(torch.float32).numpy().copy()
        record["timesteps"] = args[1].detach().to(torch.float32).numpy().reshape(-1).copy()

    def prediction(module, args, output):
        record["prediction"] = output.detach().to(torch.float32).numpy().copy()

    hooks = [model.vlm.register_forward_pre_hook(vlm_inputs, with_kwargs=True),
             model.action_in_proj.register_forward_pre_hook(expert_inputs),
             model.action_out_proj.register_forward_hook(prediction)]
    timesteps = np.asarray(flow_timesteps, np.float32)
    if timesteps.shape != (len(clips),):
        raise ValueError(f"flow timesteps must be ({len(clips)},), one per example, got {timesteps.shape}")
    try:
        with _injected_flow_draws(model, timesteps, np.asarray(flow_noise, np.float32), record, notes):
            output = model(**batch)
        output.loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    gradients = _trainable_gradients(model, notes)
    actions = record["actions"]
    return ReferenceRun(loss=float(output.loss.detach()), gradients=gradients, actions=actions,
                        noisy_actions=record["noisy_actions"], timesteps=record["timesteps"],
                        prediction=record["prediction"].reshape(actions.shape), vlm_inputs=record["vlm"],
                        notes=notes)


@dataclasses.dataclass
class Stage1ReferenceRun:
    """What NVIDIA's stage-1 code computed on the batch (float32 numpy)."""

    loss: float
    terms: dict[str, float]  # "future_traj", "others": the two means the loss sums
    gradients: dict[str, np.ndarray]  # checkpoint key -> d loss / d parameter, every VLM parameter
    vlm_inputs: dict[str, np.ndarray]  # input_ids (history and future fused), labels, attention_mask, pixel_values,
    #                                    image_grid_thw
    supervised_logits: np.ndarray  # (N, V) logits that predict a supervised label, row-major over the batch
    notes: list[str]


def _stage1_checkpoint(hf_dir: Path, processor_dir: Path, directory: Path, notes: list[str]) -> Path:
    """A directory the reference's stage-1 loader reads `hf_dir` from: its config (float32, see
    `_reference_config`) and its weights through a shard index (the loader reads only sharded
    checkpoints; a single `model.safetensors` becomes a one-shard index), the weight files linked."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(_reference_config(hf_dir, processor_dir, notes)))
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (hf_dir / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(hf_dir / "model.safetensors", "np") as weights:
            weight_map = dict.fromkeys(weights.keys(), "model.safetensors")
        notes.append("reference stage-1 loader: model.safetensors given to it through a one-shard index")
    else:
        raise ValueError(f"{hf_dir} holds no model.safetensors or model.safetensors.index.json")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in set(weight_map.values()):
        (directory / name).symlink_to((hf_dir / name).absolute())
    return directory


def reference_stage1(hf_dir: str | Path, clips: Sequence, *, processor_dir: str | Path,
                     reference_src: str | Path) -> Stage1ReferenceRun:
    """NVIDIA's stage-1 model (`TrainableReasoningVLA.from_alpamayo_checkpoint`, as its
    configs/models/ar1_base.yaml builds it) from the Hugging Face checkpoint `hf_dir`, its data
    path on `clips` (with ground truth; with or without Chain-of-Causation text), float32 and train
    mode, its loss backward: the loss and its two terms, every VLM parameter's gradient keyed by
    checkpoint key, and what it computed on the way. Observation only (hooks and a recording
    wrapper of its term function); the one change to its data path is `_structural_assistant_role`."""
    import tempfile

    root, hf_dir, notes = _open_reference(reference_src, hf_dir)
    import torch
    from finetune.sft.models.sft_base_model import TrainableReasoningVLA

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = _stage1_checkpoint(hf_dir, Path(processor_dir), Path(scratch) / "checkpoint", notes)
        model = TrainableReasoningVLA.from_alpamayo_checkpoint(str(checkpoint),
                                                               str(Path(processor_dir).absolute()))
    model = model.to(torch.float32)
    model.train()  # as the Trainer runs it
    batch = _reference_batch(root, model.config, clips, notes, structural_assistant=True)

    record: dict = {}

    def vlm_inputs(module, args, kwargs):
        record["vlm"] = {key: kwargs[key].detach().numpy().copy()
                         for key in ("input_ids", "labels", "attention_mask", "pixel_values", "image_grid_thw")}

    terms = []
    compute_term = model._compute_next_token_loss

    def recorded_term(*args, **kwargs):
        value = compute_term(*args, **kwargs)
        terms.append(float(value.detach()))
        return value

    hook = model.vlm.register_forward_pre_hook(vlm_inputs, with_kwargs=True)
    model._compute_next_token_loss = recorded_term
    try:
        output = model(**batch)
        output.loss.backward()
    finally:
        hook.remove()
        del model._compute_next_token_loss
    if len(terms) != 2:
        raise RuntimeError(f"expected the reference's loss to be two terms (future_traj, others), got {len(terms)}")
    labels = torch.from_numpy(record["vlm"]["labels"])
    from alpamayo_jax.processing.training_prompt import IGNORE_INDEX

    supervised = labels[:, 1:] != IGNORE_INDEX
    logits = output.logits.detach().to(torch.float32)[:, :-1][supervised].numpy().copy()
    gradients = _trainable_gradients(model, notes)
    return Stage1ReferenceRun(loss=float(output.loss.detach()), terms=dict(zip(("future_traj", "others"), terms)),
                              gradients=gradients, vlm_inputs=record["vlm"], supervised_logits=logits, notes=notes)


def _missing_row(stage: str, tolerance: float) -> StageError:
    return StageError(stage, math.inf, math.inf, tolerance)


def verify_stage2(model_dir: str | Path, examples: Sequence[str | Path], *, processor_dir: str | Path,
                  reference_src: str | Path | None, flow_timesteps: np.ndarray, flow_noise: np.ndarray,
                  expert_attention: str = "reference", actions: str = "reference",
                  hf_dir: str | Path | None = None, tolerance: float = 1e-4) -> TrainingReport:
    """The same batch (the clip files `examples`, in order) through NVIDIA's stage-2 training code
    and through `stage2_gradients`, with the flow draws `flow_timesteps` (B,) and `flow_noise`
    (B, W, 2) injected into both; per-tensor errors max |ours - theirs| / max |theirs| for the batch,
    the clean actions, the expert's inputs, the prediction, the loss and every trainable gradient.

    `model_dir` is ours (a bundle or a Hugging Face checkpoint); the reference loads `hf_dir`
    (default `model_dir`, which must then be a Hugging Face checkpoint). Integer tensors must match
    exactly, every other row to `tolerance`. Raises `ReferenceUnavailable` when the reference tree
    or its dependencies are missing (before anything loads)."""
    import jax
    import jax.numpy as jnp

    from alpamayo_jax.inference.pipeline import Pipeline
    from alpamayo_jax.nn.module_jit import module_jit
    from alpamayo_jax.processing.collate import collate
    from alpamayo_jax.training.data import load_training_clips
    from alpamayo_jax.training.stage2 import (
        EXPERT_ATTENTION_MODES,
        FlowDraw,
        fit_actions,
        stage2_gradients,
        stage2_loss,
    )

    check_reference(reference_src)
    if expert_attention not in EXPERT_ATTENTION_MODES:
        raise ValueError(f"expert_attention must be one of {EXPERT_ATTENTION_MODES}, got {expert_attention!r}")
    if actions not in ACTION_MODES:
        raise ValueError(f"actions must be one of {ACTION_MODES}, got {actions!r}")
    hf_dir = _reference_checkpoint(model_dir, hf_dir)
    clips = load_training_clips(list(examples))
    flow_timesteps = np.asarray(flow_timesteps, np.float32)
    flow_noise = np.asarray(flow_noise, np.float32)

    reference = reference_stage2(hf_dir, clips, processor_dir=processor_dir, reference_src=reference_src,
                                 flow_timesteps=flow_timesteps, flow_noise=flow_noise)

    jax.config.update("jax_default_matmul_precision", "highest")
    pipeline = Pipeline.load(model_dir, dtype=jnp.float32, processor_dir=processor_dir)
    batch = collate(clips, tokenizer=pipeline.tokenizer, chat_template=pipeline.chat_template,
                    config=pipeline.config)
    fitted = np.asarray(fit_actions(pipeline.split, batch.inputs, batch.ego_future_xyz, batch.ego_future_rot))
    used = reference.actions if actions == "reference" else fitted
    draw = FlowDraw(jnp.asarray(reference.timesteps), jnp.asarray(flow_noise))
    loss, gradients = stage2_gradients(pipeline.model, batch.inputs, jnp.asarray(used), draw,
                                       expert_attention=expert_attention)
    _, aux = module_jit(stage2_loss, static_argnames=("expert_attention",))(
        pipeline.split, batch.inputs, jnp.asarray(used), draw, expert_attention=expert_attention)

    exact = 0.0
    theirs = reference.vlm_inputs
    errors = [
        compare("batch input_ids (history fused)", batch.inputs.input_ids, theirs["input_ids"], exact),
        compare("batch attention_mask", batch.inputs.attention_mask, theirs["attention_mask"], exact),
        compare("batch image_grid_thw", np.asarray(batch.inputs.image_grid), theirs["image_grid_thw"], exact),
        compare("batch pixel_values", batch.inputs.pixel_values, theirs["pixel_values"], tolerance),
        compare("clean actions x", fitted, reference.actions, tolerance),
        compare("noisy actions x_t", aux.x_t, reference.noisy_actions, tolerance),
        compare("prediction", aux.prediction, reference.prediction, tolerance),
        compare("loss", loss, reference.loss, tolerance),
    ]
    errors += _gradient_rows(gradients, reference.gradients, tolerance)
    notes = [*reference.notes,
             f"ours: expert_attention={expert_attention!r}, clean actions from "
             + ("the reference (its traj_to_action)" if actions == "reference" else "our traj_to_action"),
             f"loss: ours {loss:.7g}, reference {reference.loss:.7g}"]
    return TrainingReport(errors=errors, notes=notes, loss=loss, reference=reference)


def _gradient_rows(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], tolerance: float) -> list[StageError]:
    """One row per parameter either side trains; a parameter only one side trains is a failed row."""
    rows = []
    for key in sorted(theirs.keys() | ours.keys()):
        if key not in ours:
            rows.append(_missing_row(f"grad {key} (not trained by ours)", tolerance))
        elif key not in theirs:
            rows.append(_missing_row(f"grad {key} (not trained by the reference)", tolerance))
        else:
            rows.append(compare(f"grad {key}", ours[key], theirs[key], tolerance))
    return rows


def verify_stage1(model_dir: str | Path, examples: Sequence[str | Path], *, processor_dir: str | Path,
                  reference_src: str | Path | None, hf_dir: str | Path | None = None,
                  tolerance: float = 1e-4) -> TrainingReport:
    """The same batch (the clip files `examples`, in order; with or without Chain-of-Causation text)
    through NVIDIA's stage-1 training code and through `stage1_gradients`: per-tensor errors
    max |ours - theirs| / max |theirs| of the batch (ids with history and future fused, labels,
    attention mask, image grid exactly; pixels), the logits at the supervised positions, the loss
    and its two terms, and every VLM parameter's gradient.

    `model_dir` is ours (a bundle or a Hugging Face checkpoint); the reference loads `hf_dir`
    (default `model_dir`, which must then be a Hugging Face checkpoint). Raises
    `ReferenceUnavailable` when the reference tree or its dependencies are missing (before
    anything loads)."""
    import jax
    import jax.numpy as jnp

    from alpamayo_jax.inference.pipeline import Pipeline
    from alpamayo_jax.nn.module_jit import module_jit
    from alpamayo_jax.processing.collate import collate
    from alpamayo_jax.training.data import check_cot_texts, load_training_clips
    from alpamayo_jax.training.stage1 import stage1_gradients, stage1_loss, supervised_logits

    check_reference(reference_src)
    hf_dir = _reference_checkpoint(model_dir, hf_dir)
    clips = load_training_clips(list(examples))
    reference = reference_stage1(hf_dir, clips, processor_dir=processor_dir, reference_src=reference_src)

    jax.config.update("jax_default_matmul_precision", "highest")
    pipeline = Pipeline.load(model_dir, dtype=jnp.float32, processor_dir=processor_dir)
    check_cot_texts(clips, pipeline.tokenizer)
    batch = collate(clips, tokenizer=pipeline.tokenizer, chat_template=pipeline.chat_template,
                    config=pipeline.config)
    inputs, labels = batch.fused_inputs(), batch.labels()
    terms, gradients = stage1_gradients(pipeline.model, inputs, labels)
    _, (_, aux) = module_jit(stage1_loss)(pipeline.split, inputs, jnp.asarray(labels))

    exact = 0.0
    theirs = reference.vlm_inputs
    errors = [
        compare("batch input_ids (history and future fused)", inputs.input_ids, theirs["input_ids"], exact),
        compare("batch labels", labels, theirs["labels"], exact),
        compare("batch attention_mask", inputs.attention_mask, theirs["attention_mask"], exact),
        compare("batch image_grid_thw", np.asarray(inputs.image_grid), theirs["image_grid_thw"], exact),
        compare("batch pixel_values", inputs.pixel_values, theirs["pixel_values"], tolerance),
        compare("logits at the supervised positions", np.concatenate(supervised_logits(aux)),
                reference.supervised_logits, tolerance),
        compare("loss.future_traj", terms["loss.future_traj"], reference.terms["future_traj"], tolerance),
        compare("loss.others", terms["loss.others"], reference.terms["others"], tolerance),
        compare("loss", terms["loss"], reference.loss, tolerance),
        *_gradient_rows(gradients, reference.gradients, tolerance),
    ]
    ours = (f"loss: ours {terms['loss']:.7g} (future_traj {terms['loss.future_traj']:.7g} + others "
            f"{terms['loss.others']:.7g}), reference {reference.loss:.7g}")
    notes = [*reference.notes, ours]
    return TrainingReport(errors=errors, notes=notes, loss=terms["loss"], reference=reference)


def _reference_checkpoint(model_dir: str | Path, hf_dir: str | Path | None) -> str | Path:
    """What the reference loads: `hf_dir`, else `model_dir` when that is a Hugging Face checkpoint."""
    from alpamayo_jax.io.bundle import is_bundle

    if hf_dir is not None:
        return hf_dir
    if is_bundle(model_dir):
        raise ValueError(f"{model_dir} is a bundle: the reference needs the Hugging Face checkpoint it was converted "
                         "from (hf_dir / --hf-dir)")
    return model_dir


def report_json(report: TrainingReport) -> str:
    """The report as JSON (a missing gradient's infinite errors as null)."""
    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    rows = [{"stage": e.stage, "max_abs": finite(e.max_abs), "relative": finite(e.relative),
             "tolerance": e.tolerance, "ok": e.ok} for e in report.errors]
    return json.dumps({"ok": report.ok, "loss": report.loss, "reference_loss": report.reference.loss,
                       "notes": report.notes, "errors": rows}, indent=2)
