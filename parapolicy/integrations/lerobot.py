"""Accelerate a LeRobot ``DiffusionPolicy`` in place: its own U-Net, its own scheduler, a parallel sampler.

    from parapolicy.integrations.lerobot import accelerate, restore
    accelerate(policy, sampler="paraddpm", window=16, tolerance=0.1)   # policy: lerobot DiffusionPolicy
    action = policy.select_action(batch)                               # unchanged API, queues, processors
    policy.last_info        # {"sampler", "rounds", "model_evals", "converged", "num_inference_steps"}
    restore(policy)         # back to LeRobot's own loop

Only ``DiffusionModel.conditional_sample(batch_size, global_cond=None, generator=None, noise=None)`` is
replaced, on that instance. The replacement reads what LeRobot's loop reads: ``self.unet(x, t[B],
global_cond=...)``, ``self.noise_scheduler`` (its diffusers config; DDPM -> the ddpm family of samplers,
DDIM -> the ddim family), ``self.num_inference_steps``, ``self.config.horizon`` and
``self.config.action_feature.shape``. The K trajectory points a parallel sampler evaluates at once are
stacked into the U-Net's batch (row k * B + b has timestep t[k]). Randomness follows the stock loop:
x_T is ``noise`` or one ``torch.randn`` from ``generator`` (same shape, dtype, device), then one draw per
step whose timestep is > 0 (where diffusers' ``DDPMScheduler.step`` draws; DDIM with eta 0 draws none),
so ``sampler="ddpm"`` reproduces LeRobot's own loop for the same generator state.

Duck-typed: lerobot is never imported (it pins torch and Python versions this package does not).
A compiled U-Net (``compile_model=True``) recompiles once per stacked batch size.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch

_PATCH_FLAG = "_parapolicy_accelerated"
_FAMILIES = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}


def find_diffusion_model(policy: Any) -> Any:
    """The object whose ``conditional_sample`` runs the loop: ``policy.diffusion`` (a LeRobot
    ``DiffusionPolicy``) or ``policy`` itself (a ``DiffusionModel``)."""
    candidates = [getattr(policy, "diffusion", None), policy]
    for model in candidates:
        if model is not None and all(hasattr(model, a) for a in ("conditional_sample", "unet", "noise_scheduler")):
            return model
    missing = [a for a in ("conditional_sample", "unet", "noise_scheduler") if not hasattr(policy, a)]
    raise ValueError(
        f"{type(policy).__name__} is neither a LeRobot DiffusionPolicy (no .diffusion) nor a DiffusionModel "
        f"(missing {missing})")


def scheduler_family(scheduler: Any) -> str:
    """``"ddpm"`` or ``"ddim"`` from a diffusers scheduler object (its class name / config ``_class_name``)."""
    name = type(scheduler).__name__
    if name not in _FAMILIES:
        name = str(getattr(scheduler, "config", {}).get("_class_name", name))
    if name not in _FAMILIES:
        raise ValueError(f"noise scheduler {name} is not supported; LeRobot's DDPMScheduler / DDIMScheduler are")
    return _FAMILIES[name]


def sampler_for_family(sampler: str, family: str) -> str:
    """Map a sampler name onto the scheduler's family: ``paraddpm`` on a DDIM policy -> ``paraddim``."""
    from parapolicy.samplers import SAMPLERS

    for suffix in ("ddpm", "ddim"):
        if sampler.endswith(suffix):
            name = sampler[: -len(suffix)] + family
            if name in SAMPLERS:
                return name
    raise ValueError(
        f"sampler {sampler!r} has no {family} variant; use one of "
        f"{sorted(n for n in SAMPLERS if n.endswith(('ddpm', 'ddim')))}")


def _public(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _stock_noise_draws(timesteps: torch.Tensor, shape: tuple[int, ...], generator, device, dtype) -> torch.Tensor:
    """``[N, *shape]``: one Gaussian per step with t > 0, drawn in step order as diffusers'
    ``randn_tensor`` draws them in ``DDPMScheduler.step`` (on the generator's CPU device when it differs)."""
    rand_device = device
    if generator is not None and generator.device.type != torch.device(device).type:
        rand_device = generator.device
    noise = torch.zeros((len(timesteps), *shape), device=device, dtype=dtype)
    for i, t in enumerate(timesteps.tolist()):
        if t > 0:
            noise[i] = torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)
    return noise


def make_unet_denoiser(unet: Callable, global_cond: torch.Tensor | None, batch: int) -> Callable:
    """``denoise(x [K, B, H, A], t [K]) -> [K, B, H, A]`` over LeRobot's ``unet(x, t[B], global_cond=...)``."""
    cache: dict[int, torch.Tensor | None] = {}

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        if k not in cache:
            cache[k] = None if global_cond is None else global_cond.repeat(k, *([1] * (global_cond.ndim - 1)))
        t = torch.as_tensor(t, device=x.device).reshape(-1).to(torch.long)
        if t.numel() == 1 and k > 1:
            t = t.expand(k)
        out = unet(x.reshape(k * batch, *x.shape[2:]), t.repeat_interleave(batch), global_cond=cache[k])
        return out.reshape(x.shape)

    return denoise


def accelerate(policy: Any, sampler: str = "paraddpm", *, info_attr: str = "last_info", **options: Any) -> Any:
    """Replace ``conditional_sample`` of ``policy`` (LeRobot ``DiffusionPolicy`` or ``DiffusionModel``) with
    parapolicy sampler ``sampler`` (mapped onto the scheduler's family); ``options`` go to ``make_sampler``
    (``window``, ``tolerance``, ``max_rounds``, ``deadline_ms``, ...). The last call's rounds / model_evals /
    converged land in ``policy.<info_attr>`` (and on the DiffusionModel). Returns ``policy``.
    Calling it again swaps the sampler; ``restore(policy)`` puts LeRobot's loop back.
    """
    from parapolicy.samplers import make_sampler

    model = find_diffusion_model(policy)
    if getattr(model, _PATCH_FLAG, None) is not None:
        restore(policy)
    family = scheduler_family(model.noise_scheduler)
    name = sampler_for_family(sampler, family)
    scheduler_config = _public(model.noise_scheduler.config)
    make_sampler(name, scheduler_config, int(model.num_inference_steps), **options)  # fail here on a bad option
    built: dict[int, Any] = {}
    targets = [policy] if policy is model else [policy, model]

    def conditional_sample(self, batch_size: int, global_cond=None, generator=None, noise=None) -> torch.Tensor:
        param = next(iter(self.parameters()))
        device, dtype = param.device, param.dtype
        shape = (batch_size, self.config.horizon, self.config.action_feature.shape[0])
        x_T = noise if noise is not None else torch.randn(size=shape, dtype=dtype, device=device, generator=generator)
        steps = int(self.num_inference_steps)
        if steps not in built:
            built[steps] = make_sampler(name, scheduler_config, steps, **options)
        solver = built[steps]
        step_noise = None
        if solver.is_stochastic:
            step_noise = _stock_noise_draws(solver.timesteps, tuple(x_T.shape), generator, x_T.device, x_T.dtype)
        denoise = make_unet_denoiser(self.unet, global_cond, x_T.shape[0])
        out = solver.sample(denoise, x_T, noise=step_noise)
        info = {"sampler": name, "num_inference_steps": steps, "rounds": out.rounds,
                "model_evals": out.model_evals, "converged": bool(out.converged)}
        for target in targets:
            object.__setattr__(target, info_attr, info)
        return out.sample.to(x_T.dtype)

    previous = model.__dict__.get("conditional_sample")  # an instance-level override someone set before us
    object.__setattr__(model, _PATCH_FLAG, {"previous": previous, "sampler": name, "info_attr": info_attr})
    object.__setattr__(model, "conditional_sample", types.MethodType(conditional_sample, model))
    return policy


def restore(policy: Any) -> Any:
    """Undo ``accelerate``: the instance gets its class's ``conditional_sample`` (or what it had) back."""
    model = find_diffusion_model(policy)
    state = model.__dict__.pop(_PATCH_FLAG, None)
    if state is None:
        raise ValueError(f"{type(policy).__name__} is not accelerated (accelerate() was not called on it)")
    model.__dict__.pop("conditional_sample", None)
    if state["previous"] is not None:
        object.__setattr__(model, "conditional_sample", state["previous"])
    return policy


def is_accelerated(policy: Any) -> bool:
    return getattr(find_diffusion_model(policy), _PATCH_FLAG, None) is not None
