"""Write checkpoints the way real-stanford/diffusion_policy does, for the importer's tests.

``write_dp_checkpoint`` reproduces ``BaseWorkspace.save_checkpoint``: ``torch.save(payload,
pickle_module=dill)`` with ``payload = {"cfg": OmegaConf DictConfig (struct flag set, as Hydra hands it
over), "state_dicts": {"model", "ema_model", "optimizer"}, "pickles": {name: dill.dumps(value)}}``.
``dp_config`` builds the composed ``train_diffusion_unet_lowdim_workspace`` + ``task/square_lowdim``
config, unresolved (``${eval:...}`` strings as in the yaml) or resolved (as DP's train.py saves it).
``dp_state_dict`` maps a parapolicy policy onto DP's policy state-dict names (``model.*`` are the same
ConditionalUnet1D names) with DP's ``LinearNormalizer`` parameters. ``dp_predict_action`` is DP's own
``DiffusionUnetLowdimPolicy.predict_action`` loop (normalise, draw x_T then one randn per noisy step from
the generator, diffusers ``DDPMScheduler.step``, unnormalise, slice from ``start``), on our U-Net module.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import dill
import torch
from omegaconf import OmegaConf

OBS_KEYS = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]


def dp_limits(data_min: torch.Tensor, data_max: torch.Tensor, range_eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """DP's ``_fit(mode="limits", output_min=-1, output_max=1)``: (scale, offset) per dim, flat dims
    (range < range_eps) get scale 1 and offset -min (they map to 0)."""
    data_min, data_max = data_min.float(), data_max.float()
    input_range = data_max - data_min
    ignore = input_range < range_eps
    input_range = torch.where(ignore, torch.full_like(input_range, 2.0), input_range)
    scale = 2.0 / input_range
    offset = -1.0 - scale * data_min
    offset = torch.where(ignore, 0.0 - data_min, offset)
    return scale, offset


def dp_config(
    *,
    obs_dim: int = 23,
    action_dim: int = 7,
    horizon: int = 16,
    n_obs_steps: int = 2,
    n_action_steps: int = 8,
    n_latency_steps: int = 0,
    oa_step_convention: bool = True,
    down_dims: list[int] = (64, 128, 256),
    kernel_size: int = 5,
    n_groups: int = 8,
    diffusion_step_embed_dim: int = 128,
    cond_predict_scale: bool = True,
    obs_as_global_cond: bool = True,
    obs_as_local_cond: bool = False,
    noise_scheduler: dict | None = None,
    num_inference_steps: int = 100,
    policy_target: str = "diffusion_policy.policy.diffusion_unet_lowdim_policy.DiffusionUnetLowdimPolicy",
    task_name: str = "square",
    use_ema: bool = True,
    resolved: bool = False,
    extra_policy: dict | None = None,
    extra_top: dict | None = None,
) -> Any:
    """The composed DP workspace config as a real OmegaConf DictConfig."""
    scheduler = noise_scheduler or {
        "_target_": "diffusers.schedulers.scheduling_ddpm.DDPMScheduler",
        "num_train_timesteps": 100,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "squaredcos_cap_v2",
        "variance_type": "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
    }
    if resolved:  # what DP's train.py stores: OmegaConf.resolve(cfg) ran before the workspace was built
        model_dims = dict(input_dim=action_dim, local_cond_dim=None, global_cond_dim=obs_dim * n_obs_steps)
        top = dict(obs_dim=obs_dim, action_dim=action_dim, task_name=task_name)
        policy_refs = dict(horizon=horizon, obs_dim=obs_dim, action_dim=action_dim,
                           n_action_steps=n_action_steps + n_latency_steps, n_obs_steps=n_obs_steps,
                           obs_as_local_cond=obs_as_local_cond, obs_as_global_cond=obs_as_global_cond,
                           pred_action_steps_only=False)
        max_steps = 400
    else:
        model_dims = {
            "input_dim": "${eval: ${task.action_dim} if ${obs_as_local_cond} or ${obs_as_global_cond} else ${task.obs_dim} + ${task.action_dim}}",
            "local_cond_dim": "${eval: ${task.obs_dim} if ${obs_as_local_cond} else None}",
            "global_cond_dim": "${eval: ${task.obs_dim}*${n_obs_steps} if ${obs_as_global_cond} else None}",
        }
        top = dict(obs_dim="${task.obs_dim}", action_dim="${task.action_dim}", task_name="${task.name}")
        policy_refs = dict(horizon="${horizon}", obs_dim="${obs_dim}", action_dim="${action_dim}",
                           n_action_steps="${eval:'${n_action_steps}+${n_latency_steps}'}",
                           n_obs_steps="${n_obs_steps}", obs_as_local_cond="${obs_as_local_cond}",
                           obs_as_global_cond="${obs_as_global_cond}", pred_action_steps_only="${pred_action_steps_only}")
        max_steps = "${eval:'500 if \"${task.dataset_type}\" == \"mh\" else 400'}"
    cfg = {
        "_target_": "diffusion_policy.workspace.train_diffusion_unet_lowdim_workspace.TrainDiffusionUnetLowdimWorkspace",
        "name": "train_diffusion_unet_lowdim",
        **top,
        "keypoint_dim": 3,
        "exp_name": "default",
        "horizon": horizon,
        "n_obs_steps": n_obs_steps,
        "n_action_steps": n_action_steps,
        "n_latency_steps": n_latency_steps,
        "past_action_visible": False,
        "keypoint_visible_rate": 1.0,
        "obs_as_local_cond": obs_as_local_cond,
        "obs_as_global_cond": obs_as_global_cond,
        "pred_action_steps_only": False,
        "policy": {
            "_target_": policy_target,
            "model": {
                "_target_": "diffusion_policy.model.diffusion.conditional_unet1d.ConditionalUnet1D",
                **model_dims,
                "diffusion_step_embed_dim": diffusion_step_embed_dim,
                "down_dims": list(down_dims),
                "kernel_size": kernel_size,
                "n_groups": n_groups,
                "cond_predict_scale": cond_predict_scale,
            },
            "noise_scheduler": dict(scheduler),
            **policy_refs,
            "num_inference_steps": num_inference_steps,
            "oa_step_convention": oa_step_convention,
            **(extra_policy or {}),
        },
        "ema": {"_target_": "diffusion_policy.model.diffusion.ema_model.EMAModel", "update_after_step": 0,
                "inv_gamma": 1.0, "power": 0.75, "min_value": 0.0, "max_value": 0.9999},
        "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1.0e-4, "betas": [0.95, 0.999], "eps": 1.0e-8,
                      "weight_decay": 1.0e-6},
        "training": {"device": "cuda:0", "seed": 42, "use_ema": use_ema, "num_epochs": 5000, "lr_scheduler": "cosine"},
        "task": {
            "name": f"{task_name}_lowdim",
            "obs_dim": obs_dim,
            "action_dim": action_dim,
            "keypoint_dim": 3,
            "obs_keys": list(OBS_KEYS),
            "task_name": task_name,
            "dataset_type": "ph",
            "dataset_path": "data/robomimic/datasets/${task.task_name}/${task.dataset_type}/low_dim.hdf5",
            "abs_action": False,
            "env_runner": {
                "_target_": "diffusion_policy.env_runner.robomimic_lowdim_runner.RobomimicLowdimRunner",
                "obs_keys": list(OBS_KEYS),
                "test_start_seed": 100000,
                "max_steps": max_steps,
                "n_obs_steps": "${n_obs_steps}",
                "n_action_steps": "${n_action_steps}",
                "n_latency_steps": "${n_latency_steps}",
            },
        },
        "logging": {"name": "${now:%Y.%m.%d-%H.%M.%S}_${name}_${task_name}"},
        **(extra_top or {}),
    }
    conf = OmegaConf.create(cfg)
    OmegaConf.set_struct(conf, True)  # Hydra hands the task function a struct config
    return conf


def dp_state_dict(
    policy: Any,
    obs_scale: torch.Tensor,
    obs_offset: torch.Tensor,
    action_scale: torch.Tensor,
    action_offset: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """DiffusionUnetLowdimPolicy.state_dict() names for ``policy``'s U-Net and the given DP normaliser."""
    sd: dict[str, torch.Tensor] = {"_dummy_variable": torch.empty(0)}
    sd.update({f"model.{k}": v.detach().clone() for k, v in policy.model.state_dict().items()})
    for key, scale, offset in (("obs", obs_scale, obs_offset), ("action", action_scale, action_offset)):
        prefix = f"normalizer.params_dict.{key}"
        sd[f"{prefix}.offset"] = offset.float().clone()
        sd[f"{prefix}.scale"] = scale.float().clone()
        lo, hi = (-1 - offset) / scale, (1 - offset) / scale
        sd[f"{prefix}.input_stats.max"] = hi.float()
        sd[f"{prefix}.input_stats.mean"] = ((lo + hi) / 2).float()
        sd[f"{prefix}.input_stats.min"] = lo.float()
        sd[f"{prefix}.input_stats.std"] = ((hi - lo) / 4).float()
    sd["mask_generator._dummy_variable"] = torch.empty(0)
    return sd


def shipped_dp_normalizer(policy: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DP's limits normaliser fitted to the same min/max as ``policy``'s (obs scale/offset, action scale/offset)."""
    obs = dp_limits(policy.normalizer.obs.min, policy.normalizer.obs.max)
    act = dp_limits(policy.normalizer.action.min, policy.normalizer.action.max)
    return obs[0], obs[1], act[0], act[1]


def write_dp_checkpoint(
    path: str | Path,
    cfg: Any,
    model_sd: dict[str, torch.Tensor],
    ema_sd: dict[str, torch.Tensor] | None = None,
    global_step: int = 1234,
    epoch: int = 56,
    extra_pickles: dict[str, bytes] | None = None,
) -> Path:
    """``BaseWorkspace.save_checkpoint`` (no thread): torch.save(payload, pickle_module=dill).
    ``extra_pickles``: more raw blobs for the ``pickles`` entry (e.g. a hostile one)."""
    path = Path(path)
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.95, 0.999), eps=1e-8, weight_decay=1e-6)
    state_dicts = {"model": model_sd}
    if ema_sd is not None:
        state_dicts["ema_model"] = ema_sd
    state_dicts["optimizer"] = optimizer.state_dict()
    payload = {
        "cfg": cfg,
        "state_dicts": state_dicts,
        "pickles": {
            "global_step": dill.dumps(global_step),
            "epoch": dill.dumps(epoch),
            "_output_dir": dill.dumps("data/outputs/2023.01.01/00.00.00_train_diffusion_unet_lowdim_square_lowdim"),
            **(extra_pickles or {}),
        },
    }
    with path.open("wb") as f:
        torch.save(payload, f, pickle_module=dill)
    return path


def dp_checkpoint_from_policy(path: str | Path, policy: Any, ema_policy: Any = None,
                              extra_pickles: dict[str, bytes] | None = None, **cfg_kwargs: Any) -> Path:
    """A DP checkpoint holding ``policy``'s weights (``ema_model`` from ``ema_policy``, default the same) and
    DP's limits normaliser fitted to the same ranges; ``cfg_kwargs`` go to ``dp_config``."""
    cfg_kwargs.setdefault("obs_dim", policy.config.obs_dim)
    cfg_kwargs.setdefault("action_dim", policy.config.action_dim)
    cfg_kwargs.setdefault("down_dims", list(policy.config.down_dims))
    cfg_kwargs.setdefault("diffusion_step_embed_dim", policy.config.diffusion_step_embed_dim)
    cfg_kwargs.setdefault("kernel_size", policy.config.kernel_size)
    norm = shipped_dp_normalizer(policy)
    model_sd = dp_state_dict(policy, *norm)
    # no separate EMA copy: the same tensors (torch.save stores shared storages once: a smaller file)
    ema_sd = dp_state_dict(ema_policy, *norm) if ema_policy is not None else dict(model_sd)
    return write_dp_checkpoint(path, dp_config(**cfg_kwargs), model_sd, ema_sd, extra_pickles=extra_pickles)


class Malicious:
    """Pickles as a call of ``func(*args)`` (``__reduce__``): what a hostile checkpoint does."""

    def __init__(self, func: Any, *args: Any):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def write_malicious_checkpoint(path: str | Path, func: Any, *args: Any, where: str = "cfg") -> Path:
    """A DP-shaped payload whose ``where`` entry (cfg / state_dicts) unpickles as ``func(*args)``."""
    payload = {"cfg": OmegaConf.create({"horizon": 16}), "state_dicts": {"model": {"w": torch.zeros(2)}}, "pickles": {}}
    if where == "cfg":
        payload["cfg"] = Malicious(func, *args)
    else:
        payload["state_dicts"]["model"]["evil"] = Malicious(func, *args)
    with Path(path).open("wb") as f:
        torch.save(payload, f, pickle_module=dill)
    return Path(path)


@torch.no_grad()
def dp_predict_action(
    model: torch.nn.Module,
    sd: dict[str, torch.Tensor],
    scheduler_config: dict,
    obs: torch.Tensor,
    *,
    horizon: int,
    n_obs_steps: int,
    n_action_steps: int,
    num_inference_steps: int,
    oa_step_convention: bool,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """DiffusionUnetLowdimPolicy.predict_action (global-cond branch) with ``conditional_sample``'s loop.

    ``model(x, t, global_cond)`` is a ConditionalUnet1D with DP's names; ``sd`` holds DP's normaliser;
    ``n_action_steps`` is the policy's (executed + latency).
    """
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(**{k: v for k, v in scheduler_config.items() if k != "_target_"})
    o_scale, o_off = sd["normalizer.params_dict.obs.scale"], sd["normalizer.params_dict.obs.offset"]
    a_scale, a_off = sd["normalizer.params_dict.action.scale"], sd["normalizer.params_dict.action.offset"]
    nobs = obs * o_scale + o_off
    batch = nobs.shape[0]
    global_cond = nobs[:, :n_obs_steps].reshape(batch, -1)
    action_dim = a_scale.shape[0]
    trajectory = torch.randn((batch, horizon, action_dim), generator=generator)
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        out = model(trajectory, t, global_cond)
        trajectory = scheduler.step(out, t, trajectory, generator=generator).prev_sample
    action_pred = (trajectory - a_off) / a_scale
    start = n_obs_steps - 1 if oa_step_convention else n_obs_steps
    return {"action": action_pred[:, start : start + n_action_steps], "action_pred": action_pred}


def draws_in_dp_order(
    generator: torch.Generator, batch: int, horizon: int, action_dim: int, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, noise [N, B, H, A]) drawn in DP's order: x_T, then one randn per step with t > 0."""
    shape = (batch, horizon, action_dim)
    x_T = torch.randn(shape, generator=generator)
    noise = torch.zeros((len(timesteps), *shape))
    for i, t in enumerate(timesteps):
        if int(t) > 0:
            noise[i] = torch.randn(shape, generator=generator)
    return x_T, noise


def clone_policy(policy: Any) -> Any:
    return copy.deepcopy(policy)
