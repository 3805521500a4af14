"""Diffusion Policy's transformer (DP-T) the way DP writes and runs it, for the DP-T tests (no DP code needed).

``reference_forward`` is ``TransformerForDiffusion.forward`` rebuilt from torch's own
``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` layers (which DP uses) loaded with a network's
weights, with DP's mask formulas: an oracle independent of ``parapolicy.policy.transformer``'s attention.
``dp_t_predict_action`` is ``DiffusionTransformerLowdimPolicy.predict_action`` with its
``conditional_sample`` loop (condition mask imposed on the trajectory itself before every model call and
at the end). ``dp_t_config`` / ``dp_t_checkpoint`` write a ``train_diffusion_transformer_lowdim`` workspace
(square_lowdim, resolved as DP's train.py saves it) with DP's state-dict names, masks and LinearNormalizer.
"""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from dp_format import OBS_KEYS, dp_limits, write_dp_checkpoint


def _dp_masks(tokens: int, cond_tokens: int, causal: bool, obs_tokens: bool):
    if not causal:
        return None, None
    mask = (torch.triu(torch.ones(tokens, tokens)) == 1).transpose(0, 1)
    mask = mask.float().masked_fill(mask == 0, float("-inf")).masked_fill(mask == 1, 0.0)
    memory_mask = None
    if obs_tokens:
        t, s = torch.meshgrid(torch.arange(tokens), torch.arange(cond_tokens), indexing="ij")
        memory_mask = (t >= (s - 1)).float()
        memory_mask = memory_mask.masked_fill(memory_mask == 0, float("-inf")).masked_fill(memory_mask == 1, 0.0)
    return mask, memory_mask


_STACKS: "weakref.WeakKeyDictionary" = None  # network -> {kind: torch's stack holding its weights}, built once


def _torch_stack(net: nn.Module, kind: str, state: dict[str, torch.Tensor], n_emb: int, n_head: int):
    global _STACKS
    if _STACKS is None:
        _STACKS = weakref.WeakKeyDictionary()
    stacks = _STACKS.setdefault(net, {})
    key = (kind, next(iter(state.values())).dtype)
    if key not in stacks:
        stacks[key] = _build_stack(kind, state, n_emb, n_head)
    return stacks[key]


def _build_stack(kind: str, state: dict[str, torch.Tensor], n_emb: int, n_head: int):
    n = len({k.split(".")[1] for k in state})
    layer_cls = nn.TransformerDecoderLayer if kind == "decoder" else nn.TransformerEncoderLayer
    layer = layer_cls(d_model=n_emb, nhead=n_head, dim_feedforward=4 * n_emb, dropout=0.0, activation="gelu",
                      batch_first=True, norm_first=True)
    stack = (nn.TransformerDecoder(layer, n) if kind == "decoder"
             else nn.TransformerEncoder(layer, n, enable_nested_tensor=False))
    stack.load_state_dict(state)
    return stack.eval().to(next(iter(state.values())).dtype)


@torch.no_grad()
def reference_forward(net: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None,
                      n_head: int) -> torch.Tensor:
    """DP's forward on ``net``'s weights: sample ``[B, T, D]``, timestep ``[B]``, cond ``[B, To, C]`` or None."""
    sd = net.state_dict()
    n_emb = sd["input_emb.weight"].shape[0]
    time_as_cond = "cond_pos_emb" in sd
    obs_tokens = "cond_obs_emb.weight" in sd
    tokens = sd["pos_emb"].shape[1]
    cond_tokens = sd["cond_pos_emb"].shape[1] if time_as_cond else 0
    mask, memory_mask = _dp_masks(tokens, cond_tokens, net.mask is not None, obs_tokens)
    half = n_emb // 2
    freqs = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
    angles = timestep.expand(sample.shape[0])[:, None] * freqs[None, :]
    time_emb = torch.cat((angles.sin(), angles.cos()), dim=-1).to(sample.dtype)[:, None]
    linear = lambda name, x: x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]  # noqa: E731
    input_emb = linear("input_emb", sample)
    dtype = sample.dtype
    if not time_as_cond:
        encoder = _torch_stack(net, "encoder", {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")},
                               n_emb, n_head)
        x = torch.cat([time_emb, input_emb], dim=1)
        x = x + sd["pos_emb"][:, : x.shape[1]]
        x = encoder(x, mask=None if mask is None else mask.to(dtype))[:, 1:]
    else:
        memory = time_emb
        if obs_tokens:
            memory = torch.cat([memory, linear("cond_obs_emb", cond)], dim=1)
        memory = memory + sd["cond_pos_emb"][:, : memory.shape[1]]
        if any(k.startswith("encoder.layers.") for k in sd):
            encoder = _torch_stack(net, "encoder", {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")},
                                   n_emb, n_head)
            memory = encoder(memory)
        else:
            memory = linear("encoder.2", nn.functional.mish(linear("encoder.0", memory)))
        decoder = _torch_stack(net, "decoder", {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")},
                               n_emb, n_head)
        x = input_emb + sd["pos_emb"][:, : input_emb.shape[1]]
        x = decoder(tgt=x, memory=memory, tgt_mask=None if mask is None else mask.to(dtype),
                    memory_mask=None if memory_mask is None else memory_mask.to(dtype))
    x = nn.functional.layer_norm(x, (n_emb,), sd["ln_f.weight"], sd["ln_f.bias"])
    return linear("head", x)


@torch.no_grad()
def dp_t_predict_action(model_fn, sd: dict[str, torch.Tensor], scheduler_config: dict, obs: torch.Tensor, *,
                        horizon: int, n_obs_steps: int, n_action_steps: int, num_inference_steps: int,
                        obs_as_cond: bool, pred_action_steps_only: bool, generator: torch.Generator) -> dict:
    """DiffusionTransformerLowdimPolicy.predict_action; ``model_fn(trajectory, t, cond)`` is DP's forward."""
    from diffusers import DDIMScheduler, DDPMScheduler

    config = {k: v for k, v in scheduler_config.items() if k != "_target_"}
    scheduler = (DDIMScheduler if "DDIM" in scheduler_config.get("_target_", "") else DDPMScheduler)(**config)
    o_scale, o_off = sd["normalizer.params_dict.obs.scale"], sd["normalizer.params_dict.obs.offset"]
    a_scale, a_off = sd["normalizer.params_dict.action.scale"], sd["normalizer.params_dict.action.offset"]
    nobs = obs * o_scale + o_off
    batch, _, obs_dim = nobs.shape
    action_dim = a_scale.shape[0]
    cond = None
    if obs_as_cond:
        cond = nobs[:, :n_obs_steps]
        shape = (batch, n_action_steps if pred_action_steps_only else horizon, action_dim)
        cond_data = torch.zeros(shape)
        cond_mask = torch.zeros_like(cond_data, dtype=torch.bool)
    else:
        cond_data = torch.zeros((batch, horizon, action_dim + obs_dim))
        cond_mask = torch.zeros_like(cond_data, dtype=torch.bool)
        cond_data[:, :n_obs_steps, action_dim:] = nobs[:, :n_obs_steps]
        cond_mask[:, :n_obs_steps, action_dim:] = True
    trajectory = torch.randn(cond_data.shape, generator=generator)
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        trajectory[cond_mask] = cond_data[cond_mask]
        out = model_fn(trajectory, t, cond)
        trajectory = scheduler.step(out, t, trajectory, generator=generator).prev_sample
    trajectory[cond_mask] = cond_data[cond_mask]
    action_pred = (trajectory[..., :action_dim] - a_off) / a_scale
    if pred_action_steps_only:
        return {"action": action_pred, "action_pred": action_pred}
    start = n_obs_steps - 1
    return {"action": action_pred[:, start : start + n_action_steps], "action_pred": action_pred}


def dp_t_config(*, obs_dim: int = 23, action_dim: int = 7, horizon: int = 10, n_obs_steps: int = 2,
                n_action_steps: int = 8, n_latency_steps: int = 0, obs_as_cond: bool = True,
                pred_action_steps_only: bool = False, n_layer: int = 2, n_head: int = 2, n_emb: int = 32,
                causal_attn: bool = True, time_as_cond: bool = True, n_cond_layers: int = 0,
                noise_scheduler: dict | None = None, num_inference_steps: int = 100,
                extra_policy: dict | None = None, task_name: str = "square") -> Any:
    """The composed, resolved ``train_diffusion_transformer_lowdim_workspace`` + square_lowdim config."""
    scheduler = noise_scheduler or {
        "_target_": "diffusers.schedulers.scheduling_ddpm.DDPMScheduler", "num_train_timesteps": 100,
        "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small",
        "clip_sample": True, "prediction_type": "epsilon"}
    input_dim = action_dim if obs_as_cond else obs_dim + action_dim
    cfg = {
        "_target_": "diffusion_policy.workspace.train_diffusion_transformer_lowdim_workspace."
                    "TrainDiffusionTransformerLowdimWorkspace",
        "name": "train_diffusion_transformer_lowdim", "obs_dim": obs_dim, "action_dim": action_dim,
        "task_name": f"{task_name}_lowdim", "horizon": horizon, "n_obs_steps": n_obs_steps,
        "n_action_steps": n_action_steps, "n_latency_steps": n_latency_steps, "past_action_visible": False,
        "obs_as_cond": obs_as_cond, "pred_action_steps_only": pred_action_steps_only,
        "policy": {
            "_target_": "diffusion_policy.policy.diffusion_transformer_lowdim_policy.DiffusionTransformerLowdimPolicy",
            "model": {
                "_target_": "diffusion_policy.model.diffusion.transformer_for_diffusion.TransformerForDiffusion",
                "input_dim": input_dim, "output_dim": input_dim, "horizon": horizon, "n_obs_steps": n_obs_steps,
                "cond_dim": obs_dim if obs_as_cond else 0, "n_layer": n_layer, "n_head": n_head, "n_emb": n_emb,
                "p_drop_emb": 0.0, "p_drop_attn": 0.3, "causal_attn": causal_attn, "time_as_cond": time_as_cond,
                "obs_as_cond": obs_as_cond, "n_cond_layers": n_cond_layers},
            "noise_scheduler": dict(scheduler), "horizon": horizon, "obs_dim": obs_dim, "action_dim": action_dim,
            "n_action_steps": n_action_steps, "n_obs_steps": n_obs_steps, "num_inference_steps": num_inference_steps,
            "obs_as_cond": obs_as_cond, "pred_action_steps_only": pred_action_steps_only, **(extra_policy or {}),
        },
        "ema": {"_target_": "diffusion_policy.model.diffusion.ema_model.EMAModel", "power": 0.75},
        "optimizer": {"learning_rate": 1.0e-4, "weight_decay": 1.0e-3, "betas": [0.9, 0.95]},
        "training": {"device": "cuda:0", "seed": 42, "use_ema": True, "lr_warmup_steps": 1000},
        "task": {"name": f"{task_name}_lowdim", "obs_dim": obs_dim, "action_dim": action_dim, "obs_keys": list(OBS_KEYS),
                 "task_name": task_name, "dataset_type": "ph", "abs_action": False},
    }
    conf = OmegaConf.create(cfg)
    OmegaConf.set_struct(conf, True)
    return conf


def dp_t_network(cfg: Any, seed: int = 0):
    """A network of the config's shape with every weight moved off DP's initial values (our module: same names)."""
    from parapolicy.policy.transformer import TransformerForDiffusion

    m = cfg.policy.model
    net = TransformerForDiffusion(input_dim=m.input_dim, output_dim=m.output_dim, horizon=m.horizon,
                                  n_obs_steps=m.n_obs_steps, cond_dim=m.cond_dim, n_layer=m.n_layer, n_head=m.n_head,
                                  n_emb=m.n_emb, p_drop_emb=0.0, p_drop_attn=0.0, causal_attn=m.causal_attn,
                                  time_as_cond=m.time_as_cond, n_cond_layers=m.n_cond_layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def dp_t_state_dict(net: nn.Module, obs_dim: int, action_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """DiffusionTransformerLowdimPolicy.state_dict() names: the network (with DP's ``_dummy_variable`` and causal
    mask buffers) and a LinearNormalizer of limits fitted to random ranges."""
    g = torch.Generator().manual_seed(seed + 100)
    sd: dict[str, torch.Tensor] = {"model._dummy_variable": torch.empty(0)}
    sd.update({f"model.{k}": v.detach().clone() for k, v in net.state_dict().items()})
    tokens = net.pos_emb.shape[1]
    cond_tokens = net.cond_pos_emb.shape[1] if net.cond_pos_emb is not None else 0
    mask, memory_mask = _dp_masks(tokens, cond_tokens, net.mask is not None, net.cond_obs_emb is not None)
    if mask is not None:
        sd["model.mask"] = mask
    if memory_mask is not None:
        sd["model.memory_mask"] = memory_mask
    for key, dim in (("obs", obs_dim), ("action", action_dim)):
        lo = torch.randn(dim, generator=g) - 1.0
        hi = lo + 0.3 + torch.rand(dim, generator=g) * 2
        scale, offset = dp_limits(lo, hi)
        prefix = f"normalizer.params_dict.{key}"
        sd[f"{prefix}.offset"], sd[f"{prefix}.scale"] = offset, scale
        sd[f"{prefix}.input_stats.min"], sd[f"{prefix}.input_stats.max"] = lo, hi
    sd["mask_generator._dummy_variable"] = torch.empty(0)
    return sd


def dp_t_checkpoint(path: str | Path, seed: int = 0, extra_pickles: dict | None = None, tamper=None, **cfg_kwargs):
    """Write a DP-T low-dim workspace; returns (path, cfg, network, DP state dict). ``tamper(sd)`` edits
    the state dict before it is written."""
    cfg = dp_t_config(**cfg_kwargs)
    net = dp_t_network(cfg, seed)
    sd = dp_t_state_dict(net, cfg.obs_dim, cfg.action_dim, seed)
    if tamper is not None:
        tamper(sd)
    path = write_dp_checkpoint(path, cfg, sd, dict(sd), extra_pickles=extra_pickles)
    return path, cfg, net, sd
