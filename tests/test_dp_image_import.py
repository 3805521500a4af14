"""Diffusion Policy's hybrid image policy (DiffusionUnetHybridImagePolicy) -> parapolicy image policy.

The DP side is a DP-format workspace file (dill pickle, OmegaConf config with DP's hybrid layout,
robomimic's doubly registered encoder names) and a functional reference of DP's predict_action on that
file's own state dict: per-key normalisation, centre crop, ResNet-18 trunk with GroupNorm, spatial
softmax, Linear, robomimic's ReLU, features in shape_meta order, DP's U-Net (test_dp_importer's
functional forward) and DDPM loop. No parapolicy module computes the reference.
The state dicts carry every name DP's own policies write (compared with DiffusionUnetHybridImagePolicy's and
DiffusionUnetImagePolicy's state_dict(): ModuleAttrMixin's empty ``_dummy_variable`` parameters, the normaliser's
``input_stats``). The check against DP's and robomimic's own code, which needs their sources and
torchvision, is ``scripts/check_dp_image.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dp_format import draws_in_dp_order, write_dp_checkpoint
from omegaconf import OmegaConf
from test_dp_importer import dp_unet_forward

from parapolicy.convert import convert
from parapolicy.importers.diffusion_policy import UnsupportedCheckpointError
from parapolicy.policy import load_policy
from parapolicy.policy.unet import ConditionalUnet1D
from parapolicy.policy.vision import ResNet18Conv

# DP's task/lift_image.yaml lists the cameras first, then the low-dim keys: that maps onto our layout
# unpermuted. Here cameras and low-dim keys interleave and the order is not alphabetical, so that the FiLM
# column permutation and robomimic's insertion order (not sorted) are exercised; each kind keeps
# lift_image's relative order (our env match needs it).
SHAPE_META = {
    "obs": {
        "robot0_eef_pos": {"shape": [3]},
        "agentview_image": {"shape": [3, 84, 84], "type": "rgb"},
        "robot0_eef_quat": {"shape": [4]},
        "robot0_gripper_qpos": {"shape": [2]},
        "robot0_eye_in_hand_image": {"shape": [3, 84, 84], "type": "rgb"},
    },
    "action": {"shape": [7]},
}
# DP's MultiImageObsEncoder sorts rgb keys and low-dim keys: reversed, so that the sorting is exercised
RESNET_SHAPE_META = {"obs": dict(reversed(list(SHAPE_META["obs"].items()))), "action": SHAPE_META["action"]}
CAMERAS = ["agentview_image", "robot0_eye_in_hand_image"]
LOW_DIM = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}
NUM_KP, FEATURE, STEP_DIM, DOWN = 8, 16, 16, [16, 32]
SCHEDULER = {"_target_": "diffusers.schedulers.scheduling_ddpm.DDPMScheduler", "num_train_timesteps": 100,
             "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small",
             "clip_sample": True, "prediction_type": "epsilon"}


def hybrid_config(policy_target="diffusion_policy.policy.diffusion_unet_hybrid_image_policy.DiffusionUnetHybridImagePolicy",
                  abs_action=False, shape_meta=SHAPE_META, **policy_extra):
    """The composed train_diffusion_unet_hybrid_workspace + task/lift_image config, unresolved as in the yaml."""
    cfg = {
        "name": "train_diffusion_unet_hybrid", "_target_": "diffusion_policy.workspace.train_diffusion_unet_hybrid_workspace"
        ".TrainDiffusionUnetHybridWorkspace", "task_name": "lift", "shape_meta": "${task.shape_meta}",
        "horizon": 16, "n_obs_steps": 2, "n_action_steps": 8, "n_latency_steps": 0, "past_action_visible": False,
        "policy": {"_target_": policy_target, "shape_meta": "${shape_meta}", "noise_scheduler": dict(SCHEDULER),
                   "horizon": "${horizon}", "n_action_steps": "${eval:'${n_action_steps}+${n_latency_steps}'}",
                   "n_obs_steps": "${n_obs_steps}", "num_inference_steps": 10, "obs_as_global_cond": True,
                   "crop_shape": [76, 76], "diffusion_step_embed_dim": STEP_DIM, "down_dims": DOWN, "kernel_size": 5,
                   "n_groups": 8, "cond_predict_scale": True, "obs_encoder_group_norm": True, "eval_fixed_crop": True,
                   **policy_extra},
        "training": {"use_ema": True, "seed": 42},
        "task": {"name": "lift_image", "task_name": "lift", "shape_meta": shape_meta, "abs_action": abs_action},
    }
    conf = OmegaConf.create(cfg)
    OmegaConf.set_struct(conf, True)
    return conf


def hybrid_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under DiffusionUnetHybridImagePolicy's state-dict names: the encoder registered twice
    (the same tensors, as a module registered twice gives them). The cameras share one ResNet trunk here,
    so the file stays ~45 MB; their spatial softmax and Linear layers differ."""
    torch.manual_seed(seed)
    sd = {}
    trunk = ResNet18Conv(norm="group")
    with torch.no_grad():
        for p in trunk.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    for camera in CAMERAS:
        conv, linear = torch.nn.Conv2d(512, NUM_KP, 1), torch.nn.Linear(2 * NUM_KP, FEATURE)
        pos_x, pos_y = np.meshgrid(np.linspace(-1.0, 1.0, 3), np.linspace(-1.0, 1.0, 3))  # robomimic's buffers
        pool = {"nets.weight": conv.weight.detach(), "nets.bias": conv.bias.detach(), "temperature": torch.ones(1),
                "pos_x": torch.from_numpy(pos_x.reshape(1, -1)).float(), "pos_y": torch.from_numpy(pos_y.reshape(1, -1)).float()}
        prefix = f"obs_encoder.obs_nets.{camera}."
        for name, value in trunk.state_dict().items():  # name: nets.<i>...
            sd[prefix + "backbone." + name] = sd[prefix + "nets.0." + name] = value
        for name, value in pool.items():
            sd[prefix + "pool." + name] = sd[prefix + "nets.1." + name] = value
        sd[prefix + "nets.3.weight"], sd[prefix + "nets.3.bias"] = linear.weight.detach(), linear.bias.detach()
    step_width = len(CAMERAS) * FEATURE + sum(LOW_DIM.values())
    unet = ConditionalUnet1D(input_dim=7, global_cond_dim=2 * step_width, diffusion_step_embed_dim=STEP_DIM,
                             down_dims=DOWN, kernel_size=5, n_groups=8)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd.update({f"model.{k}": v.detach().clone() for k, v in unet.state_dict().items()})
    g = torch.Generator().manual_seed(seed + 1)
    for key, dim in {**LOW_DIM, "action": 7}.items():
        sd[f"normalizer.params_dict.{key}.scale"] = 0.5 + torch.rand(dim, generator=g)
        sd[f"normalizer.params_dict.{key}.offset"] = torch.randn(dim, generator=g) * 0.3
    for camera in CAMERAS:  # DP's get_image_range_normalizer
        sd[f"normalizer.params_dict.{camera}.scale"] = torch.tensor([2.0])
        sd[f"normalizer.params_dict.{camera}.offset"] = torch.tensor([-1.0])
    return with_dp_extras(sd)


def with_dp_extras(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` plus what DP's image policies hold besides weights and normaliser affine maps: the empty
    ``_dummy_variable`` of every ModuleAttrMixin (the policy, its mask generator; DP's MultiImageObsEncoder
    too, when there is one) and each normaliser field's ``input_stats`` (min, max, mean, std)."""
    sd = dict(sd)
    for name in ("_dummy_variable", "mask_generator._dummy_variable"):
        sd[name] = torch.empty(0)
    if any(k.startswith("obs_encoder.key_model_map.") for k in sd):
        sd["obs_encoder._dummy_variable"] = torch.empty(0)
    for key in [k[len("normalizer.params_dict."):-len(".scale")] for k in sd if k.endswith(".scale")]:
        prefix = f"normalizer.params_dict.{key}"
        low, high = (-1 - sd[f"{prefix}.offset"]) / sd[f"{prefix}.scale"], (1 - sd[f"{prefix}.offset"]) / sd[f"{prefix}.scale"]
        sd.update({f"{prefix}.input_stats.min": low, f"{prefix}.input_stats.max": high,
                   f"{prefix}.input_stats.mean": (low + high) / 2, f"{prefix}.input_stats.std": (high - low) / 4})
    return sd


# ------------------------------------------------------------------------- functional DP-side reference
def _gn(x, sd, name):
    """DP's GroupNorm (16 channels a group), or batch norm in eval when ``name`` has running statistics."""
    if f"{name}.running_mean" in sd:
        return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=1e-5)
    return F.group_norm(x, sd[f"{name}.weight"].shape[0] // 16, sd[f"{name}.weight"], sd[f"{name}.bias"])


def resnet18_trunk(sd, prefix, x, torchvision_names=False):
    """torchvision's resnet18 children[:-2] with DP's GroupNorm (or batch norm), on robomimic's ``nets.<i>``
    names (or torchvision's ``conv1``, ``bn1``, ``layer<i>``)."""
    stem = ("conv1", "bn1") if torchvision_names else ("0", "1")
    x = F.relu(_gn(F.conv2d(x, sd[f"{prefix}.{stem[0]}.weight"], stride=2, padding=3), sd, f"{prefix}.{stem[1]}"))
    x = F.max_pool2d(x, 3, 2, 1)
    for layer in range(4):
        for block in range(2):
            name = f"{prefix}.layer{layer + 1}.{block}" if torchvision_names else f"{prefix}.{layer + 4}.{block}"
            stride = 2 if layer > 0 and block == 0 else 1
            out = F.relu(_gn(F.conv2d(x, sd[f"{name}.conv1.weight"], stride=stride, padding=1), sd, f"{name}.bn1"))
            out = _gn(F.conv2d(out, sd[f"{name}.conv2.weight"], padding=1), sd, f"{name}.bn2")
            if f"{name}.downsample.0.weight" in sd:
                x = _gn(F.conv2d(x, sd[f"{name}.downsample.0.weight"], stride=stride), sd, f"{name}.downsample.1")
            x = F.relu(out + x)
    return x


def visual_core(sd, camera, image):
    prefix = f"obs_encoder.obs_nets.{camera}"
    maps = F.conv2d(resnet18_trunk(sd, f"{prefix}.backbone.nets", image), sd[f"{prefix}.pool.nets.weight"],
                    sd[f"{prefix}.pool.nets.bias"])
    n, k, h, w = maps.shape
    attention = F.softmax(maps.reshape(n * k, h * w) / sd[f"{prefix}.pool.temperature"], dim=-1)
    keypoints = torch.cat([(sd[f"{prefix}.pool.pos_x"] * attention).sum(1, keepdim=True),
                           (sd[f"{prefix}.pool.pos_y"] * attention).sum(1, keepdim=True)], 1).reshape(n, k * 2)
    return F.relu(F.linear(keypoints, sd[f"{prefix}.nets.3.weight"], sd[f"{prefix}.nets.3.bias"]))  # + robomimic's ReLU


def dp_ddpm_actions(sd, global_cond, generator, num_inference_steps):
    """DP's ``conditional_sample`` with its DDPM scheduler (diffusers), then its action unnormalisation:
    ``action_pred [B, 16, 7]`` (raw units) from the U-Net's global conditioning ``[B, cond]``."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "_target_"})
    trajectory = torch.randn((global_cond.shape[0], 16, 7), generator=generator)
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        out = dp_unet_forward(sd, trajectory, torch.as_tensor(t), global_cond, n_levels=len(DOWN), step_dim=STEP_DIM)
        trajectory = scheduler.step(out, t, trajectory, generator=generator).prev_sample
    return (trajectory - sd["normalizer.params_dict.action.offset"]) / sd["normalizer.params_dict.action.scale"]


def dp_hybrid_predict_action(sd, obs, generator, num_inference_steps=10):
    """DiffusionUnetHybridImagePolicy.predict_action: obs {key: [B, To, ...]} (images float in [0, 1])."""
    batch, steps = obs["robot0_eef_pos"].shape[:2]
    features = []
    for key, attr in SHAPE_META["obs"].items():  # insertion order
        x = obs[key].reshape(batch * steps, *obs[key].shape[2:])
        x = x * sd[f"normalizer.params_dict.{key}.scale"].reshape(-1, *[1] * (x.ndim - 2)) + \
            sd[f"normalizer.params_dict.{key}.offset"].reshape(-1, *[1] * (x.ndim - 2))
        if attr.get("type") == "rgb":
            x = visual_core(sd, key, x[:, :, 4:80, 4:80])  # eval centre crop 84 -> 76
        features.append(x.reshape(batch * steps, -1))
    global_cond = torch.cat(features, dim=-1).reshape(batch, -1)
    action_pred = dp_ddpm_actions(sd, global_cond, generator, num_inference_steps)
    return {"action": action_pred[:, 1:9], "action_pred": action_pred}


@pytest.mark.slow  # a ~45 MB workspace file (ResNet-18 weights) written, read and converted: ~1 min idle
def test_hybrid_image_workspace_converts_and_plans_dps_actions(tmp_path):
    sd = hybrid_state_dict()
    source = write_dp_checkpoint(tmp_path / "dp_hybrid.ckpt", hybrid_config(), sd, sd)
    policy = load_policy(convert(source, tmp_path / "out"), sampler="ddpm")
    cfg = policy.config
    assert cfg.image_keys == CAMERAS and cfg.obs_keys == list(LOW_DIM) and cfg.env == "lift_image"
    assert cfg.vision["feature_activation"] == "relu" and cfg.vision["crop_shape"] == [76, 76]
    assert cfg.global_cond_dim == 2 * (2 * FEATURE + 9)

    g = torch.Generator().manual_seed(4)
    frames = {key: torch.randint(0, 256, (2, 2, 3, 84, 84), generator=g, dtype=torch.uint8) for key in CAMERAS}
    low = {key: torch.randn(2, 2, dim, generator=g) for key, dim in LOW_DIM.items()}
    with torch.no_grad():
        reference = dp_hybrid_predict_action(sd, {**low, **{k: v.float() / 255 for k, v in frames.items()}},
                                             torch.Generator().manual_seed(5))
    x_T, noise = draws_in_dp_order(torch.Generator().manual_seed(5), 2, 16, 7, policy.sampler.timesteps)
    ours = policy.predict_action(torch.cat([low[k] for k in LOW_DIM], dim=-1), images=frames, x_T=x_T, noise=noise)
    difference = (ours["action"] - reference["action"]).abs().max()
    assert difference <= 1e-4, difference
    assert reference["action"].std() > 0.05  # a real plan, not a constant both sides agree on
    # the cameras matter: other frames, other plan (so the encoder path is really exercised)
    other = policy.predict_action(torch.cat([low[k] for k in LOW_DIM], dim=-1),
                                  images={k: 255 - v for k, v in frames.items()}, x_T=x_T, noise=noise)
    assert (other["action"] - ours["action"]).abs().max() > 1e-3


@pytest.mark.parametrize("config,message", [
    (dict(policy_target="diffusion_policy.policy.diffusion_transformer_hybrid_image_policy"
                        ".DiffusionTransformerHybridImagePolicy"), "DiffusionTransformerHybridImagePolicy"),
    (dict(abs_action=True), "absolute actions"),
    (dict(obs_as_global_cond=False), "inpainting"),
])
def test_refuses_image_kinds_it_cannot_run_by_name(tmp_path, config, message):
    sd = small_state_dict()
    source = write_dp_checkpoint(tmp_path / "dp.ckpt", hybrid_config(**config), sd, sd)
    with pytest.raises(UnsupportedCheckpointError, match=message):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_range_image_normaliser(tmp_path):
    sd = small_state_dict()
    sd["normalizer.params_dict.agentview_image.scale"] = torch.tensor([1.0])
    source = write_dp_checkpoint(tmp_path / "dp.ckpt", hybrid_config(), sd, sd)
    with pytest.raises(UnsupportedCheckpointError, match="image range normaliser"):
        convert(source, tmp_path / "out")


def small_state_dict() -> dict[str, torch.Tensor]:
    """Enough of the layout to be read as a hybrid policy (refusals come before the weights are mapped)."""
    sd = {"obs_encoder.obs_nets.agentview_image.nets.3.weight": torch.zeros(FEATURE, 2 * NUM_KP)}
    for camera in CAMERAS:
        sd[f"normalizer.params_dict.{camera}.scale"] = torch.tensor([2.0])
        sd[f"normalizer.params_dict.{camera}.offset"] = torch.tensor([-1.0])
    return sd


# ---------------------------------------------------------------- DiffusionUnetImagePolicy (ResNet, MultiImageObsEncoder)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)


def resnet_image_config(use_group_norm=True, share_rgb_model=False, random_crop=True):
    cfg = OmegaConf.to_container(hybrid_config(policy_target="diffusion_policy.policy.diffusion_unet_image_policy"
                                               ".DiffusionUnetImagePolicy", shape_meta=RESNET_SHAPE_META))
    for key in ("crop_shape", "obs_encoder_group_norm", "eval_fixed_crop"):
        cfg["policy"].pop(key)
    cfg["policy"]["obs_encoder"] = {
        "_target_": "diffusion_policy.model.vision.multi_image_obs_encoder.MultiImageObsEncoder",
        "shape_meta": "${shape_meta}", "resize_shape": None, "crop_shape": [76, 76], "random_crop": random_crop,
        "use_group_norm": use_group_norm, "share_rgb_model": share_rgb_model, "imagenet_norm": True,
        "rgb_model": {"_target_": "diffusion_policy.model.vision.model_getter.get_resnet", "name": "resnet18",
                      "weights": None}}
    conf = OmegaConf.create(cfg)
    OmegaConf.set_struct(conf, True)
    return conf


def resnet_image_state_dict(seed: int = 0, norm: str = "group", shared: bool = False) -> dict[str, torch.Tensor]:
    """DiffusionUnetImagePolicy names; the two cameras' ResNets share tensors here (a smaller file), or are
    one ``key_model_map.rgb`` (``share_rgb_model``). Batch norm: running statistics off 0 / 1, and
    torchvision's ``num_batches_tracked``."""
    from parapolicy.policy.vision import resnet18

    sd = hybrid_state_dict(seed)
    sd = {k: v for k, v in sd.items() if not k.startswith("obs_encoder.")}
    torch.manual_seed(seed)
    net = resnet18(num_classes=None, norm=norm)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, buffer in net.named_buffers():
            if name.endswith("running_mean"):
                buffer.add_(torch.randn_like(buffer) * 0.1)
            elif name.endswith("running_var"):
                buffer.mul_(torch.exp(torch.randn_like(buffer) * 0.2))
    for camera in ["rgb"] if shared else CAMERAS:
        sd.update({f"obs_encoder.key_model_map.{camera}.{k}": v for k, v in net.state_dict().items()})
    step_width = len(CAMERAS) * 512 + sum(LOW_DIM.values())
    unet = ConditionalUnet1D(input_dim=7, global_cond_dim=2 * step_width, diffusion_step_embed_dim=STEP_DIM,
                             down_dims=DOWN, kernel_size=5, n_groups=8)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = {k: v for k, v in sd.items() if not k.startswith("model.")}
    sd.update({f"model.{k}": v.detach().clone() for k, v in unet.state_dict().items()})
    return with_dp_extras(sd)  # DP's encoder's own _dummy_variable (the importer once refused it)


def dp_image_predict_action(sd, obs, generator, num_inference_steps=10, shared=False, crop=True):
    """DiffusionUnetImagePolicy.predict_action with MultiImageObsEncoder (sorted rgb, then sorted low-dim).
    ``crop=False``: DP's ``random_crop=False``, which crops nothing (its centre crop lands in the slot the
    ImageNet normaliser then overwrites)."""
    batch, steps = obs["robot0_eef_pos"].shape[:2]

    def normalised(key):
        x = obs[key].reshape(batch * steps, *obs[key].shape[2:])
        shape = (-1, *[1] * (x.ndim - 2))
        return x * sd[f"normalizer.params_dict.{key}.scale"].reshape(shape) + sd[f"normalizer.params_dict.{key}.offset"].reshape(shape)

    features = []
    for key in sorted(CAMERAS):
        image = normalised(key)[:, :, 4:80, 4:80] if crop else normalised(key)  # eval crop 84 -> 76
        image = (image - IMAGENET_MEAN) / IMAGENET_STD
        trunk = resnet18_trunk(sd, f"obs_encoder.key_model_map.{'rgb' if shared else key}", image, torchvision_names=True)
        features.append(trunk.mean(dim=(2, 3)))  # avgpool; fc is an Identity
    features += [normalised(key) for key in sorted(LOW_DIM)]
    global_cond = torch.cat(features, dim=-1).reshape(batch, -1)
    action_pred = dp_ddpm_actions(sd, global_cond, generator, num_inference_steps)
    return {"action": action_pred[:, 1:9]}


@pytest.mark.slow  # a ~45 MB workspace file written, read and converted
@pytest.mark.parametrize("norm,shared,crop", [("group", False, True), ("batch", True, False)])
def test_resnet_image_workspace_converts_and_plans_dps_actions(tmp_path, norm, shared, crop):
    sd = resnet_image_state_dict(norm=norm, shared=shared)
    config = resnet_image_config(use_group_norm=norm == "group", share_rgb_model=shared, random_crop=crop)
    source = write_dp_checkpoint(tmp_path / "dp_image.ckpt", config, sd, sd)
    policy = load_policy(convert(source, tmp_path / "out"), sampler="ddpm")
    cfg = policy.config
    assert cfg.vision["encoder"] == "multi_image" and cfg.image_keys == sorted(CAMERAS)
    assert (cfg.vision["norm"], cfg.vision["share_rgb_model"], cfg.vision["random_crop"]) == (norm, shared, crop)
    assert cfg.obs_keys == sorted(LOW_DIM) and cfg.global_cond_dim == 2 * (2 * 512 + 9)
    g = torch.Generator().manual_seed(4)
    frames = {key: torch.randint(0, 256, (2, 2, 3, 84, 84), generator=g, dtype=torch.uint8) for key in CAMERAS}
    low = {key: torch.randn(2, 2, dim, generator=g) for key, dim in LOW_DIM.items()}
    with torch.no_grad():
        reference = dp_image_predict_action(sd, {**low, **{k: v.float() / 255 for k, v in frames.items()}},
                                            torch.Generator().manual_seed(5), shared=shared, crop=crop)
    x_T, noise = draws_in_dp_order(torch.Generator().manual_seed(5), 2, 16, 7, policy.sampler.timesteps)
    ours = policy.predict_action(torch.cat([low[k] for k in cfg.obs_keys], dim=-1), images=frames, x_T=x_T, noise=noise)
    difference = (ours["action"] - reference["action"]).abs().max()
    assert difference <= 1e-4, difference
    assert reference["action"].std() > 0.05
