"""Import Diffusion Policy's image policies: ``DiffusionUnetHybridImagePolicy`` and ``DiffusionUnetImagePolicy``.

That policy conditions its U-Net on robomimic's observation encoder, run per observation step: for each
key of ``shape_meta.obs`` *in the config's insertion order*, an rgb key goes through a crop (random in
training, centred in eval) and a ``VisualCore`` (ResNet-18 trunk, GroupNorm if
``obs_encoder_group_norm``, SpatialSoftmax, Linear) followed by robomimic's ReLU; a low-dim key passes
as it is. Its state dict registers each camera's trunk twice (``obs_encoder.obs_nets.<cam>.backbone.*``
and ``...nets.0.*``, likewise ``pool`` and ``nets.1``). Images reach the encoder in [-1, 1] (DP's image
range normaliser), low-dim keys through DP's limits normaliser.

parapolicy's :class:`~parapolicy.policy.vision.ImageObsEncoder` holds the same modules under the same
``nets.*`` names, but lays a step's features out as cameras first, then the low-dim vector. The import
is exact all the same: the global conditioning enters the U-Net only through the FiLM layers'
``cond_encoder.1`` Linear maps, whose input columns are permuted to our order.

The ResNet image policy (``DiffusionUnetImagePolicy``) conditions on DP's ``MultiImageObsEncoder``: per
rgb key (sorted) a crop and torchvision's ResNet-18 without fc (GroupNorm with ``use_group_norm``), after
ImageNet normalisation of the [-1, 1] images, then the low-dim keys (sorted). parapolicy's
:class:`~parapolicy.policy.vision.DPImageObsEncoder` is that module under the same names; the
conditioning layout is already ours.

Absolute actions (``abs_action=True``: position, 6D rotation, gripper) import with ``action_space:
absolute_rot6d`` (see ``parapolicy.importers.diffusion_policy.read_action_space``).

Refused by name: other image policy classes, inpainting (``obs_as_global_cond=False``), two-arm absolute
actions, cameras of different sizes, a ``resize_shape``, and an odd crop margin (torchvision rounds that
centre differently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from parapolicy.importers.diffusion_policy import (
    FORMAT,
    DPCheckpoint,
    UnsupportedCheckpointError,
    _affine,
    _dims_from_weights,
    _excerpt,
    _int,
    dp_affine_to_minmax,
    read_action_space,
    read_scheduler,
)
from parapolicy.policy.configuration import DiffusionPolicyConfig

HYBRID_IMAGE_POLICY = "DiffusionUnetHybridImagePolicy"
RESNET_IMAGE_POLICY = "DiffusionUnetImagePolicy"
_PREFIX = "obs_encoder.obs_nets."


def _shape_meta(ckpt: DPCheckpoint, what: str) -> tuple[list[tuple[str, str, list[int]]], list[int]]:
    """[(key, type, shape)] of ``shape_meta.obs`` in insertion order, and the action shape."""
    meta = ckpt.get("policy.shape_meta") or ckpt.get("shape_meta") or ckpt.get("task.shape_meta")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("obs"), Mapping) or "action" not in meta:
        raise ValueError(f"{what}: no shape_meta (obs, action) in the config")
    entries = []
    for key, attr in meta["obs"].items():
        kind = str(attr.get("type", "low_dim"))
        if kind not in ("rgb", "low_dim"):
            raise UnsupportedCheckpointError(f"{what}: obs key {key!r} has type {kind!r}; only rgb and low_dim are supported")
        entries.append((str(key), kind, [int(v) for v in attr["shape"]]))
    return entries, [int(v) for v in meta["action"]["shape"]]


def check_hybrid_supported(ckpt: DPCheckpoint, weights: Mapping[str, torch.Tensor], what: str) -> None:
    name = str(ckpt.get("policy._target_", "") or "").rsplit(".", 1)[-1]
    if name and name not in (HYBRID_IMAGE_POLICY, RESNET_IMAGE_POLICY):
        raise UnsupportedCheckpointError(f"{what}: image policy class {name} is not supported; only "
                                         f"{HYBRID_IMAGE_POLICY} and {RESNET_IMAGE_POLICY} are")
    if ckpt.get("policy.obs_as_global_cond", True) is False:
        raise UnsupportedCheckpointError(f"{what}: inpainting policies (obs_as_global_cond=False) are not supported")
    if ckpt.get("policy.cond_predict_scale", True) is False:
        raise UnsupportedCheckpointError(f"{what}: cond_predict_scale=False is not supported")
    if ckpt.get("policy.n_groups", 8) != 8:
        raise UnsupportedCheckpointError(f"{what}: n_groups={ckpt.get('policy.n_groups')} is not supported (only 8)")


def _permutation(entries, feature_dims: Mapping[str, int], n_obs_steps: int) -> torch.Tensor:
    """Index ``perm`` with ``ours[i] = dp[perm[i]]`` over the ``n_obs_steps * F`` global-cond columns."""
    dp_offsets, offset = {}, 0
    for key, _, _ in entries:
        dp_offsets[key] = offset
        offset += feature_dims[key]
    step_width = offset
    ours = [key for key, kind, _ in entries if kind == "rgb"] + [key for key, kind, _ in entries if kind == "low_dim"]
    per_step = torch.cat([torch.arange(dp_offsets[key], dp_offsets[key] + feature_dims[key]) for key in ours])
    return torch.cat([per_step + step * step_width for step in range(n_obs_steps)])


def convert_dp_image_checkpoint(ckpt: DPCheckpoint, sd: Mapping[str, torch.Tensor], weights_key: str,
                                source: Path, out: Path) -> Path:
    """A ``DiffusionUnetHybridImagePolicy`` workspace -> a parapolicy image policy folder (see module doc)."""
    from parapolicy.policy.checkpoint import save_converted
    from parapolicy.policy.diffusion_policy import DiffusionPolicy

    what = f"Diffusion Policy checkpoint {source.name}"
    check_hybrid_supported(ckpt, sd, what)
    name = str(ckpt.get("policy._target_", "") or "").rsplit(".", 1)[-1]
    if name == RESNET_IMAGE_POLICY or any(k.startswith("obs_encoder.key_model_map.") for k in sd):
        return _convert_resnet_image(ckpt, sd, weights_key, source, out, what)
    if not any(k.startswith(_PREFIX) for k in sd):
        name = str(ckpt.get("policy._target_", "") or "").rsplit(".", 1)[-1]
        raise UnsupportedCheckpointError(f"{what}: image / hybrid policy {name} without {_PREFIX}* weights: "
                                         f"not a checkpoint parapolicy can import")
    entries, action_shape = _shape_meta(ckpt, what)
    rgb = [(key, shape) for key, kind, shape in entries if kind == "rgb"]
    low = [(key, shape) for key, kind, shape in entries if kind == "low_dim"]
    if not rgb:
        raise UnsupportedCheckpointError(f"{what}: shape_meta has no rgb key")
    if len({tuple(shape) for _, shape in rgb}) != 1 or len(rgb[0][1]) != 3 or rgb[0][1][0] != 3:
        raise UnsupportedCheckpointError(f"{what}: cameras of different or non-RGB shapes {dict(rgb)} are not supported")
    image_shape = rgb[0][1]
    if len(action_shape) != 1:
        raise ValueError(f"{what}: action shape {action_shape} is not a vector")
    action_space = read_action_space(ckpt, action_shape[0], what)

    _check_image_normaliser(sd, [key for key, _ in rgb], what)

    # --- encoder weights: DP's nets.* are ours; backbone.* / pool.* must be the same tensors again
    encoder_sd, norm = {}, "group"
    for key, _ in rgb:
        prefix = f"{_PREFIX}{key}."
        own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not own:
            raise ValueError(f"{what}: no encoder weights {prefix}* for camera {key!r}")
        for alias, target in (("backbone.", "nets.0."), ("pool.", "nets.1.")):
            for name, value in own.items():
                if name.startswith(alias):
                    twin = own.get(target + name[len(alias):])
                    if twin is None or not torch.equal(twin, value):
                        raise ValueError(f"{what}: {prefix}{name} differs from {prefix}{target}{name[len(alias):]}")
        encoder_sd.update({f"obs_nets.{key}.{k}": v for k, v in own.items() if k.startswith("nets.")})
        if any(k.endswith("running_mean") for k in own):
            norm = "batch"
    others = [k for k in sd if k.startswith("obs_encoder.") and not any(k.startswith(f"{_PREFIX}{key}.") for key, _ in rgb)]
    if others:
        raise UnsupportedCheckpointError(f"{what}: encoder weights {others[:5]} have no counterpart in parapolicy's encoder")

    first = rgb[0][0]
    feature_dim = int(sd[f"{_PREFIX}{first}.nets.3.weight"].shape[0])  # the Linear after the keypoints
    num_kp = int(sd[f"{_PREFIX}{first}.nets.1.nets.weight"].shape[0])  # SpatialSoftmax's 1x1 conv
    crop = ckpt.get("policy.crop_shape", [76, 76])
    crop = [int(v) for v in crop] if crop is not None else None
    if crop is not None and ckpt.get("policy.eval_fixed_crop", False) is True and any(
            (size - c) % 2 for size, c in zip(image_shape[1:], crop)):
        raise UnsupportedCheckpointError(f"{what}: eval_fixed_crop with an odd margin ({image_shape[1:]} -> {crop}) is "
                                         f"not supported (torchvision rounds that centre half-up)")
    # --- U-Net and config
    dims = _dims_from_weights(sd, what)
    n_obs_steps = _int(ckpt.get("policy.n_obs_steps", ckpt.get("n_obs_steps")), "n_obs_steps", what)
    horizon = _int(ckpt.get("policy.horizon", ckpt.get("horizon")), "horizon", what)
    n_action = _int(ckpt.get("n_action_steps", ckpt.get("policy.n_action_steps")), "n_action_steps", what)
    latency = ckpt.get("n_latency_steps", 0) or 0
    feature_dims = {key: feature_dim for key, _ in rgb}
    feature_dims.update({key: int(torch.tensor(shape).prod()) for key, shape in low})
    step_width = sum(feature_dims.values())
    if dims["global_cond_dim"] != step_width * n_obs_steps:
        raise ValueError(f"{what}: the U-Net's global conditioning has {dims['global_cond_dim']} columns; shape_meta "
                         f"gives {step_width} features x {n_obs_steps} steps")
    sampler, steps, scheduler = read_scheduler(ckpt, what)
    obs_keys = [key for key, _ in low]
    vision = dict(backbone="resnet18", backbone_kwargs={"norm": norm}, crop_shape=crop, num_kp=num_kp,
                  feature_dim=feature_dim, feature_activation="relu")
    config = DiffusionPolicyConfig(
        obs_dim=sum(feature_dims[key] for key in obs_keys), action_dim=dims["action_dim"], obs_keys=obs_keys,
        image_keys=[key for key, _ in rgb], image_shape=image_shape, vision=vision, action_space=action_space,
        env=_our_image_env(ckpt.get("task.task_name", ckpt.get("task_name")), [key for key, _ in rgb], obs_keys,
                           action_space),
        horizon=horizon, n_obs_steps=n_obs_steps, n_action_steps=n_action, oa_step_convention=True,
        n_latency_steps=_int(latency, "n_latency_steps", what),
        down_dims=dims["down_dims"], kernel_size=dims["kernel_size"], n_groups=8,
        diffusion_step_embed_dim=dims["diffusion_step_embed_dim"],
        num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
        beta_schedule=str(scheduler.get("beta_schedule", "linear")), clip_sample=bool(scheduler.get("clip_sample", True)),
        prediction_type=str(scheduler.get("prediction_type", "epsilon")), sampler=sampler, num_inference_steps=steps)
    policy = DiffusionPolicy(config, scheduler_config=scheduler)

    perm = _permutation(entries, feature_dims, n_obs_steps) + dims["diffusion_step_embed_dim"]
    model_sd = {}
    for name, value in sd.items():
        if not name.startswith("model."):
            continue
        value = value.float()
        if name.endswith("cond_encoder.1.weight"):  # [2C, step_embed + T * F]: the global columns to our order
            step = dims["diffusion_step_embed_dim"]
            value = torch.cat([value[:, :step], value[:, perm]], dim=1)
        model_sd[name[len("model."):]] = value
    _load_exactly(policy.model, model_sd, "U-Net", what)
    _load_exactly(policy.obs_encoder, {k: v.float() for k, v in encoder_sd.items()}, "encoder", what)

    # --- normalisers: low-dim keys concatenated in shape_meta order (images: checked above)
    scales, offsets = [], []
    for key in obs_keys:
        scale, offset = _affine(sd, key, feature_dims[key], what)
        scales.append(scale)
        offsets.append(offset)
    if obs_keys:
        lo, hi = dp_affine_to_minmax(torch.cat(scales), torch.cat(offsets), f"{what}: low-dim normaliser")
        policy.normalizer.obs.set_stats(lo, hi)
    scale, offset = _affine(sd, "action", config.action_dim, what)
    policy.normalizer.action.set_stats(*dp_affine_to_minmax(scale, offset, f"{what}: normalizer action"))

    excerpt_keys = ("name", "_target_", "task_name", "horizon", "n_obs_steps", "n_action_steps", "n_latency_steps",
                    "policy", "training.use_ema", "training.seed")
    excerpt = {k: _excerpt(ckpt.get(k) if "." in k else ckpt.cfg.get(k)) for k in excerpt_keys}
    training = {
        "converted_from": {
            "format": FORMAT, "source": source.name, "sha256": ckpt.sha256, "weights": weights_key,
            "policy_class": HYBRID_IMAGE_POLICY, "global_cond_order": "cameras then low-dim (FiLM columns permuted)",
            **{k: v for k, v in ckpt.pickles.items() if k in ("global_step", "epoch")},
            "dp_config": {k: v for k, v in excerpt.items() if v is not None},
        },
        "converter": "parapolicy.convert",
    }
    return save_converted(policy, out, training)


def _check_image_normaliser(sd: Mapping[str, torch.Tensor], keys: list[str], what: str) -> None:
    """Images must reach the encoder as DP's image range normaliser leaves them ([0, 1] -> [-1, 1])."""
    for key in keys:
        scale, offset = sd.get(f"normalizer.params_dict.{key}.scale"), sd.get(f"normalizer.params_dict.{key}.offset")
        if scale is None or offset is None:
            raise ValueError(f"{what}: normaliser normalizer.params_dict.{key}.scale / .offset not found")
        scale, offset = scale.double(), offset.double()
        if (scale - 2.0).abs().max() > 1e-6 or (offset + 1.0).abs().max() > 1e-6:
            raise UnsupportedCheckpointError(f"{what}: camera {key!r} is normalised with scale {scale.flatten()[:3].tolist()}, "
                                             f"offset {offset.flatten()[:3].tolist()}; only DP's image range normaliser "
                                             f"([0, 1] -> [-1, 1]) is supported")


def _common_config(ckpt: DPCheckpoint, sd: Mapping[str, torch.Tensor], what: str) -> tuple[dict, dict, dict]:
    """(DiffusionPolicyConfig arguments every DP image policy shares, scheduler config, U-Net dims)."""
    dims = _dims_from_weights(sd, what)
    n_obs_steps = _int(ckpt.get("policy.n_obs_steps", ckpt.get("n_obs_steps")), "n_obs_steps", what)
    sampler, steps, scheduler = read_scheduler(ckpt, what)
    return dict(
        action_dim=dims["action_dim"], horizon=_int(ckpt.get("policy.horizon", ckpt.get("horizon")), "horizon", what),
        n_obs_steps=n_obs_steps,
        n_action_steps=_int(ckpt.get("n_action_steps", ckpt.get("policy.n_action_steps")), "n_action_steps", what),
        oa_step_convention=True, n_latency_steps=_int(ckpt.get("n_latency_steps", 0) or 0, "n_latency_steps", what),
        down_dims=dims["down_dims"], kernel_size=dims["kernel_size"], n_groups=8,
        diffusion_step_embed_dim=dims["diffusion_step_embed_dim"],
        num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
        beta_schedule=str(scheduler.get("beta_schedule", "linear")), clip_sample=bool(scheduler.get("clip_sample", True)),
        prediction_type=str(scheduler.get("prediction_type", "epsilon")), sampler=sampler, num_inference_steps=steps,
    ), scheduler, dims


def _convert_resnet_image(ckpt: DPCheckpoint, sd: Mapping[str, torch.Tensor], weights_key: str, source: Path,
                          out: Path, what: str) -> Path:
    """``DiffusionUnetImagePolicy``: DP's MultiImageObsEncoder (rgb keys sorted, then low-dim keys sorted)
    around torchvision's ResNet-18 without fc; the global conditioning is already in our layout."""
    from parapolicy.policy.checkpoint import save_converted
    from parapolicy.policy.diffusion_policy import DiffusionPolicy

    entries, action_shape = _shape_meta(ckpt, what)
    action_space = read_action_space(ckpt, action_shape[0], what)
    if action_space == "delta" and action_shape != [7]:
        raise UnsupportedCheckpointError(f"{what}: action shape {action_shape}: only 7-dim OSC_POSE delta actions "
                                         f"(or 10-dim absolute ones, abs_action=True) are supported")
    rgb = sorted(key for key, kind, _ in entries if kind == "rgb")
    low = sorted((key, shape) for key, kind, shape in entries if kind == "low_dim")
    shapes = {tuple(shape) for key, kind, shape in entries if kind == "rgb"}
    if not rgb or len(shapes) != 1:
        raise UnsupportedCheckpointError(f"{what}: needs cameras of one shape, got {sorted(shapes)}")
    image_shape = list(shapes.pop())
    encoder_cfg = ckpt.get("policy.obs_encoder") or {}
    model_name = (encoder_cfg.get("rgb_model") or {}).get("name", "resnet18") if isinstance(encoder_cfg, Mapping) else None
    if model_name != "resnet18":
        raise UnsupportedCheckpointError(f"{what}: rgb_model {model_name!r} is not supported (only get_resnet resnet18)")
    if encoder_cfg.get("resize_shape") is not None:
        raise UnsupportedCheckpointError(f"{what}: resize_shape is not supported (torchvision's tensor resize "
                                         f"antialiasing differs between versions)")
    crop = encoder_cfg.get("crop_shape")
    crop = [int(v) for v in crop] if crop is not None else None
    random_crop = bool(encoder_cfg.get("random_crop", True))
    if crop is not None and random_crop and any((size - c) % 2 for size, c in zip(image_shape[1:], crop)):
        raise UnsupportedCheckpointError(f"{what}: an odd crop margin ({image_shape[1:]} -> {crop}) is not supported "
                                         f"(torchvision rounds that centre half-up)")
    _check_image_normaliser(sd, rgb, what)
    share = bool(encoder_cfg.get("share_rgb_model", False))
    # DP's MultiImageObsEncoder is a ModuleAttrMixin: an empty ``_dummy_variable`` parameter (for .device) rides along
    encoder_sd = {k[len("obs_encoder."):]: v for k, v in sd.items()
                  if k.startswith("obs_encoder.") and not (k == "obs_encoder._dummy_variable" and v.numel() == 0)}
    norm = "batch" if any(k.endswith("running_mean") for k in encoder_sd) else "group"
    low_dims = [int(torch.tensor(shape).prod()) for _, shape in low]
    common, scheduler, dims = _common_config(ckpt, sd, what)
    step_width = 512 * len(rgb) + sum(low_dims)
    if dims["global_cond_dim"] != step_width * common["n_obs_steps"]:
        raise ValueError(f"{what}: the U-Net's global conditioning has {dims['global_cond_dim']} columns; shape_meta "
                         f"gives {step_width} features x {common['n_obs_steps']} steps")
    vision = dict(encoder="multi_image", norm=norm, crop_shape=crop, random_crop=random_crop, share_rgb_model=share,
                  imagenet_norm=bool(encoder_cfg.get("imagenet_norm", False)), feature_dim=512, low_dim_dims=low_dims)
    obs_keys = [key for key, _ in low]
    config = DiffusionPolicyConfig(obs_dim=sum(low_dims), obs_keys=obs_keys, image_keys=rgb, image_shape=image_shape,
                                   vision=vision, env=_our_image_env(ckpt.get("task.task_name", ckpt.get("task_name")),
                                                                     rgb, obs_keys, action_space),
                                   action_space=action_space, **common)
    policy = DiffusionPolicy(config, scheduler_config=scheduler)
    _load_exactly(policy.model, {k[len("model."):]: v.float() for k, v in sd.items() if k.startswith("model.")}, "U-Net", what)
    _load_exactly(policy.obs_encoder, {k: v.float() if v.is_floating_point() else v for k, v in encoder_sd.items()},
                  "encoder", what)
    if obs_keys:
        scales, offsets = zip(*(_affine(sd, key, dim, what) for key, dim in zip(obs_keys, low_dims)))
        policy.normalizer.obs.set_stats(*dp_affine_to_minmax(torch.cat(scales), torch.cat(offsets), f"{what}: low-dim normaliser"))
    scale, offset = _affine(sd, "action", config.action_dim, what)
    policy.normalizer.action.set_stats(*dp_affine_to_minmax(scale, offset, f"{what}: normalizer action"))
    training = {"converted_from": {"format": FORMAT, "source": source.name, "sha256": ckpt.sha256, "weights": weights_key,
                                   "policy_class": RESNET_IMAGE_POLICY,
                                   **{k: v for k, v in ckpt.pickles.items() if k in ("global_step", "epoch")},
                                   "dp_config": {"policy": _excerpt(ckpt.get("policy"))}},
                "converter": "parapolicy.convert"}
    return save_converted(policy, out, training)


def _load_exactly(module: torch.nn.Module, state: Mapping[str, torch.Tensor], part: str, what: str) -> None:
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: {part} weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(f"{what}: {part} {key} has shape {list(state[key].shape)}, expected {list(ref.shape)}")
        if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
            raise ValueError(f"{what}: {part} {key} contains NaN or inf")
    module.load_state_dict(dict(state), strict=True)


def _our_image_env(task_name: Any, image_keys: list[str], obs_keys: list[str], action_space: str = "delta") -> str | None:
    """Our image task of the same scene when the cameras and low-dim keys match (e.g. lift -> lift_image;
    absolute actions: lift_image_abs)."""
    try:
        from parapolicy.envs.robosuite_env import TASKS, image_key
    except Exception:
        return None
    suffix = "_image" if action_space == "delta" else "_image_abs"
    spec = TASKS.get(f"{task_name}{suffix}") if task_name is not None else None
    if spec is None or [image_key(c) for c in spec.cameras] != image_keys or list(spec.obs_keys) != obs_keys:
        return None
    return spec.name
