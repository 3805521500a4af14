"""Import a LeRobot ``DiffusionPolicy`` checkpoint folder (``save_pretrained`` output), state-only or with cameras.

The folder holds ``config.json`` (the ``DiffusionConfig``: features, normalisation modes, U-Net and
scheduler settings), ``model.safetensors`` (``diffusion.unet.*``) and the normalisation statistics, either
in processor files (``policy_preprocessor_step_*_normalizer_processor.safetensors`` with
``observation.state.min`` ... keys, LeRobot >= 0.4) or as buffers in ``model.safetensors``
(``normalize_inputs.buffer_observation_state.min`` ..., older releases). Nothing is unpickled.

LeRobot's ``DiffusionConditionalUnet1d`` computes what our ``ConditionalUnet1D`` computes; only names
differ: ``conv1`` / ``conv2`` -> ``blocks.0`` / ``blocks.1``, and the bare down/up-sampling convs
``{down,up}_modules.i.2.*`` -> ``{down,up}_modules.i.2.conv.*``. Observations (state, then environment
state when present) are concatenated per step exactly as LeRobot's global conditioning does.
Normalisation: MIN_MAX is ours; MEAN_STD, ``(x - mean) / (std + eps)``, is the same affine map as
min = mean - (std + eps), max = mean + (std + eps). A MIN_MAX dimension with max == min (LeRobot divides
by eps there, so the training value maps to -1) becomes min..min+2, which maps that value to -1 too;
such dimensions are listed in the provenance.

Image policies (``VISUAL`` input features): LeRobot's ``DiffusionRgbEncoder`` becomes
``parapolicy.policy.vision.LeRobotObsEncoder`` under the same module names (``diffusion.rgb_encoder.*`` ->
``obs_encoder.rgb_encoder.*``: one encoder per camera or one shared, ResNet-18 trunk with batch norm or
``use_group_norm``, SpatialSoftmax whose ``pos_grid`` becomes our ``pos_x`` / ``pos_y``, ``out``), with the
resize, ``crop_ratio`` / ``crop_shape`` (centre crop at eval, rounded as torchvision does) and the
cameras' dataset statistics (VISUAL: MEAN_STD, MIN_MAX or IDENTITY per channel; a camera without
statistics is passed through, as LeRobot's normaliser does). The conditioning keeps LeRobot's order per
step: state, the cameras in ``input_features`` order, environment state. The policy then takes the
cameras under LeRobot's keys (``observation.images.<name>``): uint8 frames in ``act()``, uint8 or float
in [0, 1] (LeRobot's own image range) in ``predict_action``. ``pretrained_backbone_weights`` only initialised training:
the trained backbone is in ``model.safetensors``; a folder without it is refused, since it would need a
download.

Refused by name: ``vision_backbone`` other than resnet18, cameras of different shapes or not 3-channel,
a crop larger than the (resized) image, ``use_film_scale_modulation=False``, ``n_groups != 8`` (LeRobot's
final conv block keeps 8 groups), other normalisation modes (QUANTILES, ...).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from parapolicy.importers.diffusion_policy import UnsupportedCheckpointError
from parapolicy.policy.configuration import DiffusionPolicyConfig

FORMAT = "lerobot.diffusion"
STATE, ENV_STATE, ACTION = "observation.state", "observation.environment_state", "action"
_DEFAULT_MODES = {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ENV": "MIN_MAX", "ACTION": "MIN_MAX"}
_MIN_SPAN = 1e-4  # below this our min/max normaliser treats a dimension as flat


def is_lerobot_folder(path: str | Path) -> bool:
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        return False
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("type") == "diffusion" or "noise_scheduler_type" in config)


def rename_unet_key(key: str) -> str:
    """``diffusion.unet.down_modules.0.0.conv1.block.0.weight`` -> ``down_modules.0.0.blocks.0.block.0.weight``."""
    key = key[len("diffusion.unet."):]
    key = key.replace(".conv1.", ".blocks.0.").replace(".conv2.", ".blocks.1.")
    return re.sub(r"^((?:down|up)_modules\.\d+\.2)\.(weight|bias)$", r"\1.conv.\2", key)


def _feature_dim(features: Mapping[str, Any], key: str) -> int | None:
    feature = features.get(key)
    if feature is None:
        return None
    shape = feature.get("shape") if isinstance(feature, Mapping) else None
    if not shape or len(shape) != 1:
        raise ValueError(f"feature {key} must have a 1-D shape, got {shape}")
    return int(shape[0])


def _load(path: Path, what: str) -> dict[str, torch.Tensor]:
    from parapolicy.policy.checkpoint import load_safetensors

    return load_safetensors(path, what)


def _find_stats(folder: Path, weights: Mapping[str, torch.Tensor], what: str,
                cameras: tuple[str, ...] = ()) -> tuple[dict[str, dict[str, torch.Tensor]], str, float]:
    """{feature: {stat: tensor}}, where they came from, eps."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    eps = 1e-8
    files = sorted(folder.glob("*normalizer_processor.safetensors"))
    for file in files:
        for key, tensor in _load(file, what).items():
            feature, _, stat = key.rpartition(".")
            stats.setdefault(feature, {}).setdefault(stat, tensor)
    for config_file in sorted(folder.glob("policy_*processor*.json")):
        try:
            for step in json.loads(config_file.read_text()).get("steps", []):
                eps = float(step.get("config", {}).get("eps", eps))
        except (OSError, ValueError, AttributeError):
            pass
    if stats:
        return stats, ", ".join(f.name for f in files), eps
    # Older LeRobot: Normalize / Unnormalize modules inside the policy, feature dots as underscores.
    pattern = re.compile(r"^(?:normalize_inputs|normalize_targets|unnormalize_outputs)\.buffer_(.+)\.(min|max|mean|std)$")
    names = {key.replace(".", "_"): key for key in (STATE, ENV_STATE, *cameras)} | {ACTION: ACTION}
    for key, tensor in weights.items():
        match = pattern.match(key)
        if match and match.group(1) in names:
            stats.setdefault(names[match.group(1)], {}).setdefault(match.group(2), tensor)
    if not stats:
        raise ValueError(f"{what}: no normalisation statistics (no *normalizer_processor.safetensors, no "
                         f"normalize_inputs.* buffers in model.safetensors)")
    return stats, "model.safetensors buffers", eps


def _min_max(stats: Mapping[str, dict[str, torch.Tensor]], feature: str, mode: str, dim: int, eps: float,
             what: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    s = stats.get(feature)
    if s is None:
        raise ValueError(f"{what}: no normalisation statistics for {feature}")
    if mode == "IDENTITY":
        return -torch.ones(dim), torch.ones(dim), []
    if mode == "MIN_MAX":
        if "min" not in s or "max" not in s:
            raise ValueError(f"{what}: {feature} is MIN_MAX but its min / max statistics are missing")
        lo, hi = s["min"].double().reshape(-1), s["max"].double().reshape(-1)
        flat = (hi - lo) == 0
        hi = torch.where(flat, lo + 2.0, hi)
    elif mode == "MEAN_STD":
        if "mean" not in s or "std" not in s:
            raise ValueError(f"{what}: {feature} is MEAN_STD but its mean / std statistics are missing")
        mean, std = s["mean"].double().reshape(-1), s["std"].double().reshape(-1) + eps
        lo, hi, flat = mean - std, mean + std, torch.zeros(dim, dtype=torch.bool)
    else:
        raise UnsupportedCheckpointError(f"{what}: normalisation mode {mode} for {feature} is not supported "
                                         f"(MIN_MAX, MEAN_STD, IDENTITY)")
    if lo.numel() != dim:
        raise ValueError(f"{what}: {feature} statistics have {lo.numel()} entries, the feature has {dim}")
    if ((hi - lo) < _MIN_SPAN).any():
        raise UnsupportedCheckpointError(f"{what}: {feature} has ranges below {_MIN_SPAN} that a min/max "
                                         f"normaliser cannot express")
    return lo.float(), hi.float(), flat.nonzero().flatten().tolist()


def convert_lerobot_checkpoint(source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """LeRobot diffusion checkpoint folder -> parapolicy checkpoint folder ``out`` (see module docstring)."""
    from parapolicy.policy.checkpoint import save_converted
    from parapolicy.policy.diffusion_policy import DiffusionPolicy

    source, out = Path(source), Path(out)
    what = f"LeRobot checkpoint {source.name}"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"output {out} exists and is not empty (pass overwrite=True / --overwrite)")
    try:
        config = json.loads((source / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{what}: config.json unreadable ({err})") from err
    if config.get("type", "diffusion") != "diffusion":
        raise UnsupportedCheckpointError(f"{what}: policy type {config.get('type')!r} is not supported (diffusion)")
    inputs, outputs = config.get("input_features") or {}, config.get("output_features") or {}
    cameras = [k for k, v in inputs.items() if isinstance(v, Mapping) and v.get("type") == "VISUAL"]  # LeRobot's order
    image_shape, vision = _vision_options(config, inputs, cameras, what) if cameras else (None, {})
    state_dim, env_dim, action_dim = _feature_dim(inputs, STATE), _feature_dim(inputs, ENV_STATE), _feature_dim(outputs, ACTION)
    if state_dim is None or action_dim is None:
        raise ValueError(f"{what}: config.json needs input feature {STATE} and output feature {ACTION}")
    if config.get("use_film_scale_modulation", True) is not True:
        raise UnsupportedCheckpointError(f"{what}: use_film_scale_modulation=False (FiLM bias only) is not supported")
    if int(config.get("n_groups", 8)) != 8:
        raise UnsupportedCheckpointError(f"{what}: n_groups={config.get('n_groups')} is not supported (only 8 maps exactly)")

    weights = _load(source / "model.safetensors", what)
    encoder = {k[len("diffusion."):]: v for k, v in weights.items() if k.startswith("diffusion.rgb_encoder.")}
    if cameras and not encoder:
        hint = (f" (pretrained_backbone_weights={config['pretrained_backbone_weights']!r} would need a download)"
                if config.get("pretrained_backbone_weights") else "")
        raise UnsupportedCheckpointError(f"{what}: cameras {cameras} but no diffusion.rgb_encoder.* weights in "
                                         f"model.safetensors{hint}")
    if encoder and not cameras:
        raise ValueError(f"{what}: diffusion.rgb_encoder.* weights but no VISUAL input feature in config.json")
    unet = {rename_unet_key(k): v for k, v in weights.items() if k.startswith("diffusion.unet.")}
    if not unet:
        raise ValueError(f"{what}: no diffusion.unet.* weights in model.safetensors")
    w, c = unet.get("mid_modules.0.cond_encoder.1.weight"), unet.get("mid_modules.0.blocks.0.block.0.weight")
    if w is None or c is None:
        raise ValueError(f"{what}: U-Net weights lack mid_modules.0 (conv1 / cond_encoder)")
    if w.shape[0] != 2 * c.shape[0]:
        raise UnsupportedCheckpointError(f"{what}: FiLM without scale: cond_encoder.1 outputs {w.shape[0]} for "
                                         f"{c.shape[0]} channels")
    levels = sorted({int(k.split(".")[1]) for k in unet if k.startswith("down_modules.")})
    down_dims = [int(unet[f"down_modules.{i}.0.blocks.0.block.0.weight"].shape[0]) for i in levels]
    kernel = int(unet["down_modules.0.0.blocks.0.block.0.weight"].shape[2])
    step_dim = int(unet["diffusion_step_encoder.3.weight"].shape[0])
    n_obs_steps = int(config.get("n_obs_steps", 2))
    obs_dim = state_dim + (env_dim or 0)
    per_step = obs_dim + len(cameras) * vision.get("feature_dim", 0)
    if w.shape[1] - step_dim != per_step * n_obs_steps:
        raise ValueError(f"{what}: U-Net conditioning is {w.shape[1] - step_dim} wide, features give "
                         f"{per_step} x {n_obs_steps} steps")

    kind = str(config.get("noise_scheduler_type", "DDPM"))
    if kind not in ("DDPM", "DDIM"):
        raise UnsupportedCheckpointError(f"{what}: noise_scheduler_type {kind} is not supported (DDPM, DDIM)")
    scheduler = {k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                       "clip_sample", "clip_sample_range", "prediction_type") if k in config}
    steps = config.get("num_inference_steps") or scheduler.get("num_train_timesteps", 100)
    policy_config = DiffusionPolicyConfig(
        obs_dim=obs_dim, action_dim=action_dim, obs_keys=[STATE] + ([ENV_STATE] if env_dim else []), env=None,
        horizon=int(config.get("horizon", 16)), n_obs_steps=n_obs_steps, n_action_steps=int(config.get("n_action_steps", 8)),
        image_keys=cameras, image_shape=image_shape or [3, 84, 84], vision=vision,
        down_dims=down_dims, kernel_size=kernel, n_groups=8, diffusion_step_embed_dim=step_dim,
        num_train_timesteps=int(scheduler.get("num_train_timesteps", 100)),
        beta_schedule=str(scheduler.get("beta_schedule", "squaredcos_cap_v2")),
        clip_sample=bool(scheduler.get("clip_sample", True)), prediction_type=str(scheduler.get("prediction_type", "epsilon")),
        sampler="ddpm" if kind == "DDPM" else "ddim", num_inference_steps=int(steps),
    )
    policy = DiffusionPolicy(policy_config, scheduler_config=scheduler)
    expected = policy.model.state_dict()
    missing, unexpected = sorted(set(expected) - set(unet)), sorted(set(unet) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: U-Net weights do not match after renaming: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, ref in expected.items():
        if tuple(unet[k].shape) != tuple(ref.shape):
            raise ValueError(f"{what}: {k} has shape {list(unet[k].shape)}, expected {list(ref.shape)}")
    policy.model.load_state_dict({k: v.float() for k, v in unet.items()}, strict=True)

    stats, stats_from, eps = _find_stats(source, weights, what, tuple(cameras))
    modes = {**_DEFAULT_MODES, **(config.get("normalization_mapping") or {})}
    unnormalised = []
    if cameras:
        _load_rgb_encoder(policy.obs_encoder, encoder, what)
        unnormalised = _set_image_stats(policy.obs_encoder, cameras, stats, modes["VISUAL"], eps, what)
    lo, hi, flat = _min_max(stats, STATE, modes["STATE"], state_dim, eps, what)
    if env_dim:
        elo, ehi, eflat = _min_max(stats, ENV_STATE, modes["ENV"], env_dim, eps, what)
        lo, hi, flat = torch.cat([lo, elo]), torch.cat([hi, ehi]), flat + [state_dim + i for i in eflat]
    policy.normalizer.obs.set_stats(lo, hi)
    alo, ahi, aflat = _min_max(stats, ACTION, modes["ACTION"], action_dim, eps, what)
    policy.normalizer.action.set_stats(alo, ahi)

    digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    excerpt_keys = ("type", "n_obs_steps", "horizon", "n_action_steps", "down_dims", "kernel_size", "n_groups",
                    "diffusion_step_embed_dim", "use_film_scale_modulation", "noise_scheduler_type",
                    "num_inference_steps", "normalization_mapping", "input_features", "output_features",
                    "vision_backbone", "resize_shape", "crop_ratio", "crop_shape", "crop_is_random",
                    "pretrained_backbone_weights", "use_group_norm", "spatial_softmax_num_keypoints",
                    "use_separate_rgb_encoder_per_camera")
    training = {
        "converted_from": {
            "format": FORMAT, "source": source.name, "sha256": digest, "stats_from": stats_from,
            "flat_dims": {"obs": flat, "action": aflat}, "unnormalised_cameras": unnormalised,
            "lerobot_config": {k: config[k] for k in excerpt_keys if k in config},
        },
        "converter": "parapolicy.convert",
    }
    return save_converted(policy, out, training)


# ------------------------------------------------------------------------------------------- cameras
def _vision_options(config: Mapping[str, Any], inputs: Mapping[str, Any], cameras: list[str],
                    what: str) -> tuple[list[int], dict[str, Any]]:
    """The cameras' ``image_shape`` and the ``vision`` options of a ``LeRobotObsEncoder`` (checked)."""
    shapes = {key: [int(v) for v in inputs[key].get("shape") or []] for key in cameras}
    shape = shapes[cameras[0]]
    if any(s != shape for s in shapes.values()):
        raise UnsupportedCheckpointError(f"{what}: cameras of different shapes {shapes} are not supported "
                                         f"(LeRobot requires one shape)")
    if len(shape) != 3 or shape[0] != 3:
        raise UnsupportedCheckpointError(f"{what}: camera shape {shape} is not supported (3-channel [3, H, W])")
    backbone = config.get("vision_backbone", "resnet18")
    if backbone != "resnet18":
        raise UnsupportedCheckpointError(f"{what}: vision_backbone={backbone!r} is not supported (resnet18)")
    resize = config.get("resize_shape")
    crop = config.get("crop_shape")
    if resize is not None:  # LeRobot's DiffusionConfig.__post_init__: the crop follows from the ratio
        ratio = float(config.get("crop_ratio", 1.0))
        resize = [int(v) for v in resize]
        crop = [int(resize[0] * ratio), int(resize[1] * ratio)] if ratio < 1.0 else None
    seen = resize or shape[1:]
    if crop is not None:
        crop = [int(v) for v in crop]
        if not (0 < crop[0] <= seen[0] and 0 < crop[1] <= seen[1]):
            raise UnsupportedCheckpointError(f"{what}: crop_shape {crop} larger than the {seen} images "
                                             f"(torchvision would pad) is not supported")
    num_kp = int(config.get("spatial_softmax_num_keypoints", 32))
    state_dim = _feature_dim(inputs, STATE)
    return shape, {"encoder": "lerobot", "state_dim": state_dim, "num_kp": num_kp,
                   "norm": "group" if config.get("use_group_norm", False) else "batch",
                   "resize_shape": resize, "crop_shape": crop, "crop_is_random": bool(config.get("crop_is_random", True)),
                   "separate_encoders": bool(config.get("use_separate_rgb_encoder_per_camera", True)),
                   "feature_dim": 2 * num_kp}


def _load_rgb_encoder(obs_encoder, encoder: Mapping[str, torch.Tensor], what: str) -> None:
    """LeRobot's ``rgb_encoder.*`` weights into ``obs_encoder`` (same names; ``pool.pos_grid [H*W, 2]``
    becomes ``pool.pos_x`` / ``pool.pos_y [1, H*W]``; our SpatialSoftmax's temperature stays 1)."""
    expected = obs_encoder.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in encoder.items():
        if key.endswith(".pool.pos_grid"):
            stem = key[: -len("pos_grid")]
            mapped[stem + "pos_x"], mapped[stem + "pos_y"] = value[:, 0].reshape(1, -1), value[:, 1].reshape(1, -1)
        else:
            mapped[key] = value
    ours = {k for k in expected if k.startswith("rgb_encoder.") and not k.endswith(".pool.temperature")}
    missing, unexpected = sorted(ours - set(mapped)), sorted(set(mapped) - ours)
    if missing or unexpected:
        raise ValueError(f"{what}: image encoder weights do not match LeRobot's DiffusionRgbEncoder layout: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key in ours:
        if tuple(mapped[key].shape) != tuple(expected[key].shape):
            raise ValueError(f"{what}: {key} has shape {list(mapped[key].shape)}, expected {list(expected[key].shape)}")
    state = dict(expected)
    state.update({k: v.to(expected[k].dtype) for k, v in mapped.items()})
    obs_encoder.load_state_dict(state, strict=True)


def _set_image_stats(obs_encoder, cameras: list[str], stats: Mapping[str, dict[str, torch.Tensor]], mode: str,
                     eps: float, what: str) -> list[str]:
    """The cameras' dataset normalisation into ``obs_encoder``'s ``image_shift / image_scale /
    image_offset``; returns the cameras passed through unnormalised (no statistics)."""
    if mode not in ("MEAN_STD", "MIN_MAX", "IDENTITY"):
        raise UnsupportedCheckpointError(f"{what}: normalisation mode {mode} for VISUAL is not supported "
                                         f"(MEAN_STD, MIN_MAX, IDENTITY)")
    passed = []
    with torch.no_grad():
        for i, key in enumerate(cameras):
            s = stats.get(key)
            if mode == "IDENTITY" or s is None:
                passed += [key] if mode != "IDENTITY" else []
                continue
            needed = ("mean", "std") if mode == "MEAN_STD" else ("min", "max")
            if any(n not in s for n in needed):
                raise ValueError(f"{what}: {key} is {mode} but its {' / '.join(needed)} statistics are missing")
            a, b = (s[n].float().reshape(-1) for n in needed)
            if a.numel() != 3 or b.numel() != 3:
                raise ValueError(f"{what}: {key} statistics must be per channel (3 values), got {a.numel()}")
            if mode == "MEAN_STD":  # (x - mean) / (std + eps)
                shift, scale, offset = a, b + eps, 0.0
            else:  # 2 (x - min) / (max - min) - 1, eps where max == min
                span = b - a
                shift, scale, offset = a, torch.where(span == 0, torch.full_like(span, eps), span) / 2, -1.0
            obs_encoder.image_shift[i].copy_(shift.reshape(3, 1, 1))
            obs_encoder.image_scale[i].copy_(scale.reshape(3, 1, 1))
            obs_encoder.image_offset[i].fill_(offset)
    return passed
