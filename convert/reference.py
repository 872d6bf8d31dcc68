"""A PyTorch Alpamayo-R1 built from a Hugging Face checkpoint directory, for verification.

The backbone and the expert decoder are transformers 4.57.1's own Qwen3-VL modules, built the way
NVIDIA's reference builds them (the expert is the text config with `expert_cfg` overrides and no
token embedding). The small action input projection is restated here in PyTorch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from torch import nn


class FourierEncoder(nn.Module):
    def __init__(self, num_features: int, max_freq: float):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(0, math.log10(max_freq), num_features // 2)[None, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arg = x[..., None] * self.freqs * 2 * torch.pi
        return torch.cat([torch.sin(arg), torch.cos(arg)], -1) * math.sqrt(2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class ActionInProj(nn.Module):
    """PerWaypointActionInProjV2: per-waypoint Fourier features, MLP trunk, LayerNorm."""

    def __init__(self, action_dim: int, out_dim: int, hidden: int, num_layers: int, num_features: int,
                 max_freq: float):
        super().__init__()
        self.sinus = nn.ModuleList(FourierEncoder(num_features, max_freq) for _ in range(action_dim))
        self.timestep_fourier_encoder = FourierEncoder(num_features, max_freq)
        trunk: list[nn.Module] = [nn.Linear((action_dim + 1) * num_features, hidden), nn.SiLU()]
        for _ in range(num_layers - 1):
            trunk += [RMSNorm(hidden, 1e-5), nn.Linear(hidden, hidden), nn.SiLU()]
        trunk += [RMSNorm(hidden, 1e-5), nn.Linear(hidden, out_dim)]
        self.encoder = nn.Module()
        self.encoder.trunk = nn.Sequential(*trunk)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, t = x.float(), t.float()
        features = torch.cat([encode(x[:, :, i]) for i, encode in enumerate(self.sinus)], dim=-1)
        time = self.timestep_fourier_encoder(t[:, None]).repeat(1, x.shape[1], 1)
        return self.norm(self.encoder.trunk(torch.cat([features, time], dim=-1)))


class TorchAlpamayo(nn.Module):
    """vlm (Qwen3VLForConditionalGeneration), expert (Qwen3VLTextModel), action projections."""

    def __init__(self, config: dict, backbone: dict):
        super().__init__()
        backbone = copy.deepcopy(backbone)
        backbone["text_config"]["vocab_size"] = config["vocab_size"]
        vlm_config = transformers.Qwen3VLConfig(**backbone)
        vlm_config._attn_implementation = "sdpa"
        vlm_config.text_config._attn_implementation = "sdpa"
        vlm_config.vision_config._attn_implementation = "sdpa"
        self.vlm = transformers.Qwen3VLForConditionalGeneration(vlm_config)
        expert_config = copy.deepcopy(vlm_config.text_config)
        for key, value in config["expert_cfg"].items():
            setattr(expert_config, key, value)
        self.expert = transformers.Qwen3VLTextModel(expert_config)
        del self.expert.embed_tokens
        proj = config["action_in_proj_cfg"]
        self.action_in_proj = ActionInProj(2, expert_config.hidden_size, proj["hidden_size"], proj["num_enc_layers"],
                                           proj["num_fourier_feats"], proj.get("max_freq", 100.0))
        self.action_out_proj = nn.Linear(expert_config.hidden_size, 2)
        self.action_space = nn.Module()
        for name in ("accel_mean", "accel_std", "curvature_mean", "curvature_std"):
            self.action_space.register_buffer(name, torch.tensor(float(config["action_space_cfg"][name])))

    @classmethod
    def from_checkpoint(cls, hf_dir: str | Path, config: dict, backbone: dict) -> TorchAlpamayo:
        model = cls(config, backbone)
        state = {}
        for path in sorted(Path(hf_dir).glob("*.safetensors")):
            state.update(load_file(path))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model.float().eval()

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cache, position_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
        """The expert's velocity on a copy of the language model's cache."""
        return expert_velocity(self, x, t, cache, position_ids, attention_mask)


def expert_velocity(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cache, position_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """The velocity of a model with `action_in_proj`, `expert` and `action_out_proj` (ours or
    NVIDIA's `AlpamayoR1`), as the reference's denoising step computes it, on a copy of `cache`."""
    embeds = model.action_in_proj(x, t)
    out = model.expert(inputs_embeds=embeds, position_ids=position_ids, past_key_values=copy.deepcopy(cache),
                       attention_mask=attention_mask, use_cache=True, is_causal=False)
    return model.action_out_proj(out.last_hidden_state[:, -x.shape[1]:])


def to_bfloat16(model: nn.Module) -> nn.Module:
    """Parameters and stored buffers in bfloat16, as the reference's `from_pretrained(dtype=bfloat16)`
    leaves them; the rotary inverse frequencies (non-persistent buffers) stay float32."""
    stored = set(model.state_dict())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in stored and tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.bfloat16)
    return model


def _float32_layer_norm(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", enabled=False):
        return torch.nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                                              self.bias.float(), self.eps)


@contextlib.contextmanager
def cuda_autocast(model: nn.Module):
    """`torch.autocast(bfloat16)` on the CPU with CUDA autocast's rules, which the reference runs
    under: CPU autocast leaves LayerNorm in its input dtype (and rejects float32 inputs with
    bfloat16 weights), CUDA autocast runs it in float32 and returns float32. Every other operation
    the model uses follows the same rule on both devices (linear, matmul and attention in
    bfloat16; the rest in its inputs' dtype)."""
    norms = [module for module in model.modules() if isinstance(module, nn.LayerNorm)]
    for norm in norms:
        norm.forward = types.MethodType(_float32_layer_norm, norm)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        for norm in norms:
            del norm.forward
