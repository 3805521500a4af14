"""A stand-in for LeRobot's ``DiffusionPolicy`` (lerobot cannot be installed here), state-only or with cameras.

Same public attributes and call structure as lerobot/policies/diffusion/modeling_diffusion.py (read from
its source; written here independently): ``DiffusionPolicy.diffusion`` is a ``DiffusionModel`` with
``config``, ``unet`` (``DiffusionConditionalUnet1d``: ``diffusion_step_encoder``, ``down_modules`` whose
downsampler is a bare ``nn.Conv1d``, ``mid_modules``, ``up_modules`` with ``nn.ConvTranspose1d``,
``final_conv``; residual blocks with ``conv1`` / ``cond_encoder`` / ``conv2`` / ``residual_conv`` and FiLM
scale + bias when ``use_film_scale_modulation``), ``noise_scheduler`` (diffusers DDPM or DDIM) and
``num_inference_steps``; ``conditional_sample`` is LeRobot's loop; ``select_action`` keeps LeRobot's queues.

With ``image_features``, ``DiffusionModel.rgb_encoder`` is LeRobot's ``DiffusionRgbEncoder`` (one per camera
in a ``ModuleList``, or one shared): torchvision's resize and centre / random crop, the children of
torchvision's ``resnet18`` without avgpool and fc as ``backbone`` (``0`` conv1 ... ``7`` layer4; batch norm
replaced by ``GroupNorm(C // 16, C)`` with ``use_group_norm``), ``pool`` (SpatialSoftmax with its
``pos_grid`` buffer from numpy's meshgrid), ``out`` and ``relu``; the global conditioning is LeRobot's
``(state, camera features in image_features order, ...)`` per step. Written from LeRobot's and
torchvision's behaviour, independently of ``parapolicy.policy.vision``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

OBS_STATE, ACTION, OBS_IMAGES = "observation.state", "action", "observation.images"
OBS_ENV_STATE = "observation.environment_state"


@dataclass
class DiffusionConfig:
    state_dim: int = 10
    action_dim: int = 4
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    down_dims: tuple = (32, 64)
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 32
    use_film_scale_modulation: bool = True
    noise_scheduler_type: str = "DDPM"
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    num_inference_steps: int | None = None
    image_features: dict = field(default_factory=dict)  # {key: SimpleNamespace(shape=(3, H, W))}
    env_state_dim: int = 0  # > 0: an "observation.environment_state" input
    vision_backbone: str = "resnet18"
    resize_shape: tuple | None = None
    crop_ratio: float = 1.0
    crop_shape: tuple | None = None
    crop_is_random: bool = True
    pretrained_backbone_weights: str | None = None
    use_group_norm: bool = False
    spatial_softmax_num_keypoints: int = 32
    use_separate_rgb_encoder_per_camera: bool = True

    def __post_init__(self):  # LeRobot derives the crop from the resize and the ratio
        if self.resize_shape is not None:
            self.crop_shape = ((int(self.resize_shape[0] * self.crop_ratio), int(self.resize_shape[1] * self.crop_ratio))
                               if self.crop_ratio < 1.0 else None)

    @property
    def action_feature(self):
        return SimpleNamespace(shape=(self.action_dim,))

    @property
    def robot_state_feature(self):
        return SimpleNamespace(shape=(self.state_dim,))

    @property
    def env_state_feature(self):
        return SimpleNamespace(shape=(self.env_state_dim,)) if self.env_state_dim else None


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        angles = t.unsqueeze(-1) * freqs.unsqueeze(0)
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class DiffusionConv1dBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(groups, c_out), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


conv_block = DiffusionConv1dBlock


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel: int, groups: int, film_scale: bool):
        super().__init__()
        self.use_film_scale_modulation, self.out_channels = film_scale, c_out
        self.conv1 = conv_block(c_in, c_out, kernel, groups)
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out if film_scale else c_out))
        self.conv2 = conv_block(c_out, c_out, kernel, groups)
        self.residual_conv = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        film = self.cond_encoder(cond)[:, :, None]
        if self.use_film_scale_modulation:
            h = film[:, : self.out_channels] * h + film[:, self.out_channels :]
        else:
            h = h + film
        return self.conv2(h) + self.residual_conv(x)


class DiffusionConditionalUnet1d(nn.Module):
    def __init__(self, config: DiffusionConfig, global_cond_dim: int):
        super().__init__()
        self.config = config
        d = config.diffusion_step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(SinusoidalEmbedding(d), nn.Linear(d, 4 * d), nn.Mish(), nn.Linear(4 * d, d))
        cond = d + global_cond_dim
        dims = [config.action_feature.shape[0], *config.down_dims]
        pairs = list(zip(dims[:-1], dims[1:]))
        kw = dict(cond_dim=cond, kernel=config.kernel_size, groups=config.n_groups,
                  film_scale=config.use_film_scale_modulation)
        self.down_modules = nn.ModuleList(
            nn.ModuleList([ResidualBlock(a, b, **kw), ResidualBlock(b, b, **kw),
                           nn.Conv1d(b, b, 3, 2, 1) if i < len(pairs) - 1 else nn.Identity()])
            for i, (a, b) in enumerate(pairs))
        mid = config.down_dims[-1]
        self.mid_modules = nn.ModuleList([ResidualBlock(mid, mid, **kw), ResidualBlock(mid, mid, **kw)])
        self.up_modules = nn.ModuleList(
            nn.ModuleList([ResidualBlock(2 * b, a, **kw), ResidualBlock(a, a, **kw), nn.ConvTranspose1d(a, a, 4, 2, 1)])
            for a, b in reversed(pairs[1:]))
        first = config.down_dims[0]
        self.final_conv = nn.Sequential(conv_block(first, first, config.kernel_size), nn.Conv1d(first, dims[0], 1))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, global_cond: torch.Tensor | None = None) -> torch.Tensor:
        x = x.transpose(1, 2)
        feature = self.diffusion_step_encoder(timestep)
        if global_cond is not None:
            feature = torch.cat([feature, global_cond], dim=-1)
        skips = []
        for res1, res2, down in self.down_modules:
            x = res2(res1(x, feature), feature)
            skips.append(x)
            x = down(x)
        for block in self.mid_modules:
            x = block(x, feature)
        for res1, res2, up in self.up_modules:
            x = up(res2(res1(torch.cat([x, skips.pop()], dim=1), feature), feature))
        return self.final_conv(x).transpose(1, 2)


# ------------------------------------------------------------------------------ the image encoder
class TorchvisionBasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchvisionResNet18(nn.Module):
    """torchvision.models.resnet18's children, in its order (weights=None)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(TorchvisionBasicBlock(64, 64, 1), TorchvisionBasicBlock(64, 64, 1))
        self.layer2 = nn.Sequential(TorchvisionBasicBlock(64, 128, 2), TorchvisionBasicBlock(128, 128, 1))
        self.layer3 = nn.Sequential(TorchvisionBasicBlock(128, 256, 2), TorchvisionBasicBlock(256, 256, 1))
        self.layer4 = nn.Sequential(TorchvisionBasicBlock(256, 512, 2), TorchvisionBasicBlock(512, 512, 1))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, 1000)


def replace_batch_norm(module: nn.Module) -> nn.Module:
    """LeRobot's _replace_submodules(BatchNorm2d -> GroupNorm(num_features // 16, num_features))."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(child.num_features // 16, child.num_features))
        else:
            replace_batch_norm(child)
    return module


class LeRobotSpatialSoftmax(nn.Module):
    def __init__(self, input_shape, num_kp=None):
        super().__init__()
        self._in_c, self._in_h, self._in_w = input_shape
        self.nets = nn.Conv2d(self._in_c, num_kp, kernel_size=1) if num_kp is not None else None
        self._out_c = num_kp if num_kp is not None else self._in_c
        pos_x, pos_y = np.meshgrid(np.linspace(-1.0, 1.0, self._in_w), np.linspace(-1.0, 1.0, self._in_h))
        pos_x = torch.from_numpy(pos_x.reshape(self._in_h * self._in_w, 1)).float()
        pos_y = torch.from_numpy(pos_y.reshape(self._in_h * self._in_w, 1)).float()
        self.register_buffer("pos_grid", torch.cat([pos_x, pos_y], dim=1))

    def forward(self, features):
        if self.nets is not None:
            features = self.nets(features)
        attention = F.softmax(features.reshape(-1, self._in_h * self._in_w), dim=-1)
        return (attention @ self.pos_grid).view(-1, self._out_c, 2)


def torchvision_resize(x, size):
    """torchvision.transforms.Resize((h, w)) on a float tensor (antialias=True): nothing when the size matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=list(size), mode="bilinear", align_corners=False, antialias=True)


def torchvision_center_crop(x, size):
    h, w = x.shape[-2:]
    top, left = int(round((h - size[0]) / 2.0)), int(round((w - size[1]) / 2.0))
    return x[..., top : top + size[0], left : left + size[1]]


def torchvision_random_crop(x, size):
    h, w = x.shape[-2:]
    top = int(torch.randint(0, h - size[0] + 1, size=(1,)))
    left = int(torch.randint(0, w - size[1] + 1, size=(1,)))
    return x[..., top : top + size[0], left : left + size[1]]


class DiffusionRgbEncoder(nn.Module):
    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.resize_shape, self.crop_shape, self.crop_is_random = config.resize_shape, config.crop_shape, config.crop_is_random
        self.backbone = nn.Sequential(*list(TorchvisionResNet18().children())[:-2])
        if config.use_group_norm:
            self.backbone = replace_batch_norm(self.backbone)
        shape = next(iter(config.image_features.values())).shape
        h_w = config.crop_shape or config.resize_shape or shape[1:]
        with torch.no_grad():  # LeRobot's dry run for the feature map shape
            feature_map = self.backbone(torch.zeros(1, shape[0], *h_w)).shape[1:]
        self.pool = LeRobotSpatialSoftmax(tuple(feature_map), num_kp=config.spatial_softmax_num_keypoints)
        self.feature_dim = config.spatial_softmax_num_keypoints * 2
        self.out = nn.Linear(config.spatial_softmax_num_keypoints * 2, self.feature_dim)
        self.relu = nn.ReLU()

    def forward(self, x):
        if self.resize_shape is not None:
            x = torchvision_resize(x, self.resize_shape)
        if self.crop_shape is not None:
            crop = torchvision_random_crop if self.training and self.crop_is_random else torchvision_center_crop
            x = crop(x, self.crop_shape)
        x = torch.flatten(self.pool(self.backbone(x)), start_dim=1)
        return self.relu(self.out(x))


class DiffusionModel(nn.Module):
    def __init__(self, config: DiffusionConfig):
        super().__init__()
        from diffusers import DDIMScheduler, DDPMScheduler

        self.config = config
        global_cond_dim = config.state_dim
        if config.image_features:
            cameras = len(config.image_features)
            if config.use_separate_rgb_encoder_per_camera:
                self.rgb_encoder = nn.ModuleList(DiffusionRgbEncoder(config) for _ in range(cameras))
                global_cond_dim += self.rgb_encoder[0].feature_dim * cameras
            else:
                self.rgb_encoder = DiffusionRgbEncoder(config)
                global_cond_dim += self.rgb_encoder.feature_dim * cameras
        if config.env_state_feature:
            global_cond_dim += config.env_state_feature.shape[0]
        self.unet = DiffusionConditionalUnet1d(config, global_cond_dim=global_cond_dim * config.n_obs_steps)
        kind = {"DDPM": DDPMScheduler, "DDIM": DDIMScheduler}[config.noise_scheduler_type]
        self.noise_scheduler = kind(
            num_train_timesteps=config.num_train_timesteps, beta_start=config.beta_start, beta_end=config.beta_end,
            beta_schedule=config.beta_schedule, clip_sample=config.clip_sample,
            clip_sample_range=config.clip_sample_range, prediction_type=config.prediction_type)
        self.num_inference_steps = config.num_inference_steps or self.noise_scheduler.config.num_train_timesteps

    def conditional_sample(self, batch_size, global_cond=None, generator=None, noise=None):
        param = next(iter(self.parameters()))
        shape = (batch_size, self.config.horizon, self.config.action_feature.shape[0])
        sample = noise if noise is not None else torch.randn(size=shape, dtype=param.dtype, device=param.device,
                                                            generator=generator)
        self.noise_scheduler.set_timesteps(self.num_inference_steps)
        for t in self.noise_scheduler.timesteps:
            t_batch = torch.full(sample.shape[:1], t, dtype=torch.long, device=sample.device)
            out = self.unet(sample, t_batch, global_cond=global_cond)
            sample = self.noise_scheduler.step(out, t, sample, generator=generator).prev_sample
        return sample

    def _prepare_global_conditioning(self, batch):
        """LeRobot's: state, then the cameras' features ([B, S, N, C, H, W] images), flattened step-major."""
        b, s = batch[OBS_STATE].shape[:2]
        feats = [batch[OBS_STATE]]
        if self.config.image_features:
            images = batch[OBS_IMAGES]
            n = images.shape[2]
            if self.config.use_separate_rgb_encoder_per_camera:  # "b s n ... -> n (b s) ...", then back
                per_camera = images.transpose(0, 2).transpose(1, 2).reshape(n, b * s, *images.shape[3:])
                out = torch.cat([enc(x) for enc, x in zip(self.rgb_encoder, per_camera)])  # [(n b s), D]
                feats.append(out.reshape(n, b, s, -1).permute(1, 2, 0, 3).reshape(b, s, -1))
            else:  # "b s n ... -> (b s n) ...", then back
                out = self.rgb_encoder(images.reshape(b * s * n, *images.shape[3:]))
                feats.append(out.reshape(b, s, -1))
        if self.config.env_state_feature:
            feats.append(batch[OBS_ENV_STATE])
        return torch.cat(feats, dim=-1).flatten(start_dim=1)

    def generate_actions(self, batch, noise=None):
        batch_size, n_obs_steps = batch[OBS_STATE].shape[:2]
        global_cond = self._prepare_global_conditioning(batch)
        actions = self.conditional_sample(batch_size, global_cond=global_cond, noise=noise)
        start = n_obs_steps - 1
        return actions[:, start : start + self.config.n_action_steps]


class DiffusionPolicy(nn.Module):
    name = "diffusion"

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        self.diffusion = DiffusionModel(config)
        self.reset()

    def reset(self):
        self._queues = {OBS_STATE: deque(maxlen=self.config.n_obs_steps), ACTION: deque(maxlen=self.config.n_action_steps)}
        if self.config.image_features:
            self._queues[OBS_IMAGES] = deque(maxlen=self.config.n_obs_steps)
        if self.config.env_state_feature:
            self._queues[OBS_ENV_STATE] = deque(maxlen=self.config.n_obs_steps)

    @torch.no_grad()
    def predict_action_chunk(self, batch, noise=None):
        batch = {k: torch.stack(list(self._queues[k]), dim=1) for k in batch if k in self._queues}
        return self.diffusion.generate_actions(batch, noise=noise)

    @torch.no_grad()
    def select_action(self, batch, noise=None):
        if self.config.image_features:  # cameras stacked into one key before queueing, as LeRobot does
            batch = dict(batch)
            batch[OBS_IMAGES] = torch.stack([batch[key] for key in self.config.image_features], dim=-4)
        for key in [k for k in (OBS_STATE, OBS_IMAGES, OBS_ENV_STATE) if k in self._queues]:
            queue = self._queues[key]
            if len(queue) == 0:
                queue.extend([batch[key]] * queue.maxlen)
            else:
                queue.append(batch[key])
        if len(self._queues[ACTION]) == 0:
            self._queues[ACTION].extend(self.predict_action_chunk(batch, noise=noise).transpose(0, 1))
        return self._queues[ACTION].popleft()


# ------------------------------------------------------------------------ save_pretrained, LeRobot style
def save_pretrained(policy: DiffusionPolicy, folder, stats: dict, modes: dict | None = None, legacy: bool = False):
    """Write ``folder`` as LeRobot's ``save_pretrained`` + processor ``save_pretrained`` lay it out.

    ``stats``: {feature: {stat: tensor}} (cameras: per-channel ``[3, 1, 1]``); ``modes``: normalization_mapping
    (VISUAL / STATE / ACTION -> MIN_MAX ...). ``legacy``: statistics as ``normalize_inputs`` /
    ``unnormalize_outputs`` buffers in model.safetensors (LeRobot < 0.4) instead of processor files.
    """
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = policy.config
    modes = {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ACTION": "MIN_MAX", **(modes or {})}
    config = {
        "type": "diffusion",
        "n_obs_steps": cfg.n_obs_steps,
        "input_features": {**{key: {"type": "VISUAL", "shape": list(f.shape)} for key, f in cfg.image_features.items()},
                           OBS_STATE: {"type": "STATE", "shape": [cfg.state_dim]},
                           **({OBS_ENV_STATE: {"type": "ENV", "shape": [cfg.env_state_dim]}} if cfg.env_state_dim else {})},
        "output_features": {ACTION: {"type": "ACTION", "shape": [cfg.action_dim]}},
        "device": "cpu",
        "normalization_mapping": modes,
        "horizon": cfg.horizon,
        "n_action_steps": cfg.n_action_steps,
        "drop_n_last_frames": cfg.horizon - cfg.n_action_steps - cfg.n_obs_steps + 1,
        "down_dims": list(cfg.down_dims),
        "kernel_size": cfg.kernel_size,
        "n_groups": cfg.n_groups,
        "diffusion_step_embed_dim": cfg.diffusion_step_embed_dim,
        "use_film_scale_modulation": cfg.use_film_scale_modulation,
        "noise_scheduler_type": cfg.noise_scheduler_type,
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_schedule": cfg.beta_schedule,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "prediction_type": cfg.prediction_type,
        "clip_sample": cfg.clip_sample,
        "clip_sample_range": cfg.clip_sample_range,
        "num_inference_steps": cfg.num_inference_steps,
        "compile_model": False,
        "vision_backbone": cfg.vision_backbone,
        "resize_shape": None if cfg.resize_shape is None else list(cfg.resize_shape),
        "crop_ratio": cfg.crop_ratio,
        "crop_shape": None if cfg.crop_shape is None else list(cfg.crop_shape),
        "crop_is_random": cfg.crop_is_random,
        "pretrained_backbone_weights": cfg.pretrained_backbone_weights,
        "use_group_norm": cfg.use_group_norm,
        "spatial_softmax_num_keypoints": cfg.spatial_softmax_num_keypoints,
        "use_separate_rgb_encoder_per_camera": cfg.use_separate_rgb_encoder_per_camera,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    tensors = {k: v.contiguous() for k, v in policy.state_dict().items()}
    if legacy:
        inputs = [("normalize_inputs", key) for key in (*cfg.image_features, OBS_STATE, OBS_ENV_STATE) if key in stats]
        for prefix, feature in (*inputs, ("normalize_targets", ACTION), ("unnormalize_outputs", ACTION)):
            for stat, value in stats[feature].items():
                tensors[f"{prefix}.buffer_{feature.replace('.', '_')}.{stat}"] = value.float().clone().contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    if legacy:
        return folder
    features = {**config["input_features"], ACTION: {"type": "ACTION", "shape": [cfg.action_dim]}}
    flat = {f"{feature}.{stat}": value.float().contiguous() for feature, group in stats.items() for stat, value in group.items()}
    for name, step, registry in (("policy_preprocessor", 2, "normalizer_processor"),
                                 ("policy_postprocessor", 0, "unnormalizer_processor")):
        state_file = f"{name}_step_{step}_{registry}.safetensors"
        steps = [{"registry_name": "rename_observations_processor", "config": {"rename_map": {}}}] if step else []
        steps += [{"registry_name": "to_batch_processor", "config": {}}] if step else []
        steps.append({"registry_name": registry, "config": {"eps": 1e-8, "features": features,
                                                             "norm_map": {k: v for k, v in modes.items()}},
                      "state_file": state_file})
        (folder / f"{name}.json").write_text(json.dumps({"name": name, "steps": steps}, indent=4))
        save_file(flat, str(folder / state_file))
    return folder


def lerobot_normalize(x, group: dict, mode: str, eps: float = 1e-8, inverse: bool = False):
    """LeRobot's NormalizerProcessorStep transform for one feature (MIN_MAX / MEAN_STD)."""
    if mode == "MEAN_STD":
        denom = group["std"] + eps
        return x * denom + group["mean"] if inverse else (x - group["mean"]) / denom
    denom = group["max"] - group["min"]
    denom = torch.where(denom == 0, torch.tensor(eps, dtype=x.dtype), denom)
    return (x + 1) / 2 * denom + group["min"] if inverse else 2 * (x - group["min"]) / denom - 1
