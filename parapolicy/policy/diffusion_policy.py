"""DiffusionPolicy: Chi et al.'s low-dim U-Net Diffusion Policy with a pluggable (parallel) sampler.

The network only ever sees normalised data; the policy normalises observations on the way in and
unnormalises actions on the way out. Sampling is delegated to ``parapolicy.samplers`` through a
``denoise(x [K, B, H, A], t [K]) -> eps`` callback that evaluates K denoising steps in one batched
forward pass, which is what parallel (Picard-style) samplers need.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from parapolicy.observation import camera_frames, flatten_observation
from parapolicy.policy.configuration import DiffusionPolicyConfig
from parapolicy.policy.normalizer import PolicyNormalizer
from parapolicy.policy.networks import build_network



def _public_scheduler_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers' scheduler.config as a plain JSON-able dict (private ``_*`` bookkeeping dropped)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


class DiffusionPolicy(nn.Module):
    """State dict keys: ``model.*`` (ConditionalUnet1D) and ``normalizer.{obs,action}.{min,max}``."""

    def __init__(self, config: DiffusionPolicyConfig, scheduler_config: Mapping[str, Any] | None = None):
        super().__init__()
        from diffusers import DDPMScheduler

        self.config = config
        self.model = build_network(config)  # config.network: the U-Net or DP's transformer
        self.normalizer = PolicyNormalizer(config.obs_dim, config.action_dim)
        # image policies: camera frames (+ the normalised low-dim vector) -> per-step features
        self.obs_encoder = build_obs_encoder(config) if config.image_keys else None
        if scheduler_config is None:
            self.noise_scheduler = DDPMScheduler(**config.scheduler_kwargs())
        else:
            self.noise_scheduler = DDPMScheduler.from_config(dict(scheduler_config))
        self._sampler_spec = (config.sampler, config.num_inference_steps, dict(config.sampler_options))
        self._sampler = None  # built lazily: training never needs parapolicy.samplers
        self.fast_path: Any = "auto"  # parapolicy.policy.accel: "auto" (on for CUDA), None (off) or a FastPath
        self.last_info: dict[str, Any] = {}
        self.warm_start = False  # act(): warm-start parallel samplers from the previous call
        self.warm_start_rule = "rollout"
        self.reset()

    # ------------------------------------------------------------------ configuration
    @property
    def scheduler_config(self) -> dict[str, Any]:
        return _public_scheduler_config(self.noise_scheduler.config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def sampler_name(self) -> str:
        return self._sampler_spec[0]

    @property
    def num_inference_steps(self) -> int:
        return self._sampler_spec[1]

    @property
    def sampler_options(self) -> dict[str, Any]:
        return dict(self._sampler_spec[2])

    @property
    def sampler(self):
        if self._sampler is None:
            from parapolicy.samplers import make_sampler

            name, steps, options = self._sampler_spec
            self._sampler = make_sampler(name, self.scheduler_config, steps, **options)
        return self._sampler

    def set_sampler(self, name: str, num_inference_steps: int | None = None, **options: Any) -> "DiffusionPolicy":
        """Swap the sampler (e.g. ``set_sampler("paraddpm", window=8, tolerance=1e-3)``); built right away
        so that a bad name or option fails here, not in the control loop.

        ``warm_start=True`` makes ``act()`` start each parallel solve from the previous call's sample
        (see ``predict_action(warm_from=...)``); ``warm_start_rule`` is "rollout" (default) or "marginal".
        """
        steps = self.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        # warm-start settings belong to the policy (it holds the previous call), not the sampler
        warm_start = bool(options.pop("warm_start", self.warm_start))
        warm_start_rule = str(options.pop("warm_start_rule", self.warm_start_rule))
        if warm_start_rule not in ("rollout", "marginal"):
            raise ValueError(f"warm_start_rule must be 'rollout' or 'marginal', got {warm_start_rule!r}")
        self.warm_start, self.warm_start_rule = warm_start, warm_start_rule
        previous = (self._sampler_spec, self._sampler)
        self._sampler_spec = (name, steps, dict(options))
        self._sampler = None
        try:
            self.sampler
        except Exception:
            self._sampler_spec, self._sampler = previous
            raise
        return self

    def enable_fast_path(self, enabled: bool | str = True, **options: Any) -> "DiffusionPolicy":
        """Denoiser fast path (static shapes, CUDA graphs, autocast): see ``parapolicy.policy.accel.FastPath``."""
        from parapolicy.policy.accel import make_fast_path

        self.fast_path = make_fast_path(enabled, **options)
        return self

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM epsilon loss on raw batch ``obs [B, n_obs_steps, obs_dim]``, ``action [B, horizon, A]``
        (image policies: ``images`` {key: uint8 ``[B, n_obs_steps, 3, H, W]``})."""
        if self.config.sample_dim != self.config.action_dim or self.config.pred_action_steps_only:
            raise ValueError("DP's inpainting (obs_as_cond=False) and pred_action_steps_only transformers are "
                             "trained with Diffusion Policy and imported (python -m parapolicy.convert)")
        global_cond = self.global_condition(batch["obs"], batch.get("images"))
        actions = self.normalizer.action.normalize(batch["action"])
        batch_size = actions.shape[0]
        gen_device = generator.device if generator is not None else actions.device
        noise = torch.randn(actions.shape, generator=generator, device=gen_device).to(actions.device)
        timesteps = torch.randint(
            self.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator, device=gen_device
        ).to(actions.device)
        learned = None  # [B, H] 1 where the loss counts
        if self.config.delay_conditioned:
            # training for delay: each window gets its own committed prefix, given clean, not learned
            lengths = self.draw_known_lengths(batch_size, generator, gen_device).to(actions.device)
            global_cond = torch.cat([global_cond, self.known_condition(actions, lengths)], dim=-1)
            positions = torch.arange(actions.shape[1], device=actions.device)
            learned = (positions[None] >= lengths[:, None]).to(actions.dtype)
        noisy = self.noise_scheduler.add_noise(actions, noise, timesteps)
        if learned is not None and self.config.committed_in_sample == "clean":
            noisy = torch.where(learned[..., None] > 0, noisy, actions)  # committed positions given clean
        pred = self.model(noisy, timesteps, global_cond)
        if self.config.prediction_type == "epsilon":
            target = noise
        elif self.config.prediction_type == "sample":
            target = actions
        else:
            raise ValueError(f"unsupported prediction_type {self.config.prediction_type!r}")
        if learned is None:
            return F.mse_loss(pred, target)
        per_position = (pred - target).pow(2).mean(dim=-1)  # [B, H]
        return (per_position * learned).sum() / learned.sum()

    # Training for delay: the share of windows told nothing (an episode's first chunk, sync control).
    delay_none_prob = 0.1

    def draw_known_lengths(self, batch: int, generator: torch.Generator | None = None,
                           device: torch.device | str = "cpu") -> torch.Tensor:
        """``[B]`` committed prefix lengths for training: ``action_start + d`` with d uniform in
        ``[0, max_delay]`` (capped at ``known_positions``), or 0 with probability ``delay_none_prob``."""
        cfg = self.config
        delay = torch.randint(cfg.max_delay + 1, (batch,), generator=generator, device=device)
        none = torch.rand((batch,), generator=generator, device=device) < self.delay_none_prob
        lengths = (cfg.action_start + delay).clamp(max=cfg.known_positions)
        return torch.where(none, torch.zeros_like(lengths), lengths)

    def known_condition(self, actions: torch.Tensor | None, lengths: torch.Tensor | int) -> torch.Tensor:
        """The known-actions conditioning ``[B, known_cond_dim]`` of a delay-conditioned policy.

        actions ``[B, L, A]`` normalised (L >= the largest length; None when nothing is known), lengths
        ``[B]`` or one int: how many leading positions are known. Layout: the first ``known_positions``
        actions with unknown ones zeroed (``[P * A]``, position-major), then the mask ``[P]``.
        """
        cfg = self.config
        P, A = cfg.known_positions, cfg.action_dim
        if actions is None:
            batch = int(lengths.shape[0]) if torch.is_tensor(lengths) else 1
            return torch.zeros((batch, P * (A + 1)), device=self.device)
        batch = actions.shape[0]
        lengths = torch.as_tensor(lengths, device=actions.device).reshape(-1).expand(batch).clamp(max=P)
        values = torch.zeros((batch, P, A), device=actions.device, dtype=actions.dtype)
        width = min(P, actions.shape[1])
        values[:, :width] = actions[:, :width]
        mask = (torch.arange(P, device=actions.device)[None] < lengths[:, None]).to(actions.dtype)  # [B, P]
        return torch.cat([(values * mask[..., None]).flatten(1), mask], dim=-1)

    def global_condition(self, obs_history: torch.Tensor, images: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The U-Net's observation conditioning ``[B, n_obs_steps * feature_dim]`` (a delay-conditioned
        policy appends ``known_condition`` to it) from raw ``obs_history [B, T, obs_dim]``
        and, for image policies, ``images`` {key: ``[B, T, 3, H, W]``, uint8 0..255 or float 0..1}: the
        observation encoder runs once per step of every history (DP's layout: step-major features)."""
        nobs = self.normalizer.obs.normalize(obs_history)
        if self.obs_encoder is None:
            return nobs.flatten(1)
        batch, steps = nobs.shape[:2]
        frames = {}
        for key in self.config.image_keys:
            image = torch.as_tensor(images[key], device=nobs.device)
            unit = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
            frames[key] = (unit * 2.0 - 1.0).flatten(0, 1)  # DP's image range normaliser: [0, 1] -> [-1, 1]
        return self.obs_encoder(frames, nobs.flatten(0, 1)).reshape(batch, -1)

    def _check_images(self, images, batch: int) -> dict[str, torch.Tensor] | None:
        cfg = self.config
        if not cfg.image_keys:
            return None
        if images is None:
            raise ValueError(f"this policy sees cameras {cfg.image_keys}: pass images={{key: [B, {cfg.n_obs_steps}, "
                             f"{', '.join(map(str, cfg.image_shape))}]}}")
        missing = [k for k in cfg.image_keys if k not in images]
        if missing:
            raise ValueError(f"images lacks keys {missing} (policy needs {cfg.image_keys})")
        checked = {}
        for key in cfg.image_keys:
            image = torch.as_tensor(images[key], device=self.device)
            expected = (batch, cfg.n_obs_steps, *cfg.image_shape)
            if tuple(image.shape) != expected:
                raise ValueError(f"images[{key!r}] must have shape {list(expected)}, got {list(image.shape)}")
            checked[key] = image
        return checked

    # ------------------------------------------------------------------ inference
    def make_denoise_fn(self, global_cond: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Sampler callback for a fixed normalised ``global_cond [B, G]``.

        ``denoise(x [K, B, H, A], t [K]) -> [K, B, H, A]`` folds the K timesteps into the batch
        (row k*B + b has timestep t[k]); the K-times repeated conditioning is cached per K since
        a sampler calls with the same K over and over.
        """
        batch = global_cond.shape[0]
        cond_cache: dict[int, torch.Tensor] = {}
        model = self.model

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            squeeze = x.ndim == 3  # tolerate a plain [B, H, A] call with one timestep
            if squeeze:
                x = x.unsqueeze(0)
            k = x.shape[0]
            cond = cond_cache.get(k)
            if cond is None:
                cond = cond_cache[k] = global_cond.repeat(k, 1)
            t = torch.as_tensor(t, device=x.device).reshape(-1)
            if t.numel() == 1 and k > 1:
                t = t.expand(k)
            out = model(x.reshape(k * batch, *x.shape[2:]), t.repeat_interleave(batch), cond)
            out = out.reshape(x.shape)
            return out.squeeze(0) if squeeze else out

        return denoise

    def _check_obs_history(self, obs_history: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        obs_history = torch.as_tensor(obs_history, dtype=torch.float32, device=self.device)
        expected = (cfg.n_obs_steps, cfg.obs_dim)
        if obs_history.ndim != 3 or tuple(obs_history.shape[1:]) != expected:
            raise ValueError(
                f"obs_history must have shape [B, {cfg.n_obs_steps}, {cfg.obs_dim}], got {list(obs_history.shape)}"
            )
        if not torch.isfinite(obs_history).all():
            raise ValueError("obs_history contains NaN or inf")
        return obs_history

    @torch.inference_mode()
    def predict_action(
        self,
        obs_history: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        x_T: torch.Tensor | None = None,
        init: torch.Tensor | None = None,
        warm_from: torch.Tensor | None = None,
        warm_shift: int | None = None,
        prefix: torch.Tensor | None = None,
        prefix_weights: torch.Tensor | None = None,
        prefix_noise: torch.Tensor | None = None,
        images: Mapping[str, torch.Tensor] | None = None,
        prefix_mode: str = "auto",
    ) -> dict[str, Any]:
        """Plan actions for a batch of observation histories.

        obs_history ``[B, n_obs_steps, obs_dim]`` (raw units). ``x_T`` ``[B, horizon, A]`` is the
        initial noise (drawn from ``generator`` if None); ``noise`` is passed to the sampler (the
        per-step DDPM noise, so different samplers can be compared on the same randomness); ``init``
        is a parallel sampler's warm-start trajectory (e.g. a previous ``trajectory``). ``warm_from``
        ``[B, horizon, A]`` is the previous call's normalised ``sample``: shifted left by
        ``warm_shift`` (default ``n_action_steps``: the actions executed since, last action repeated) it
        becomes the guess of
        the clean chunk, and ``init`` is built from it with ``warm_start_rule``. x_T and the noise stay
        authoritative, so the converged result is unchanged (within the tolerance); only rounds drop.

        ``prefix`` ``[B, L, A]`` (raw units, L <= horizon): known values of the chunk's first L positions,
        e.g. the actions a robot executes while this chunk is planned (real-time chunking). They are
        imposed before every model evaluation, noised to its timestep with ``prefix_noise`` ``[B, L, A]``
        (unit Gaussians, drawn from ``generator`` if None; one draw per call, so parallel samplers solve
        the same problem as sequential ones), and on the final chunk. ``prefix_weights`` ``[B, L]`` or
        ``[L]`` in [0, 1] (default 1: imposed exactly) blend them with the model's values instead.
        See ``parapolicy.samplers.constraints``.

        ``prefix_mode``: "inpaint" imposes the prefix only; "trained" (a delay-conditioned policy,
        ``config.max_delay > 0``, and a hard prefix) also gives it to the network as known clean actions,
        as it was trained; "auto" (default) is "trained" where that applies, else "inpaint". A
        delay-conditioned policy called without a prefix is told that nothing is known.

        ``images`` (image policies): {camera key: ``[B, n_obs_steps, 3, H, W]``, uint8 or float in [0, 1]};
        encoded once per call, before sampling (``encode_ms`` in the result; ``sample_ms`` is the rest).

        Returns ``action [B, n_action_steps, A]`` (the executed slice), ``action_pred [B, horizon, A]``
        in raw units, and the sampler's ``rounds``, ``model_evals``, ``converged``, ``errors``,
        ``trajectory`` (normalised units, may be None) and ``sample`` (the normalised chunk, what
        ``warm_from`` takes next time).
        """
        cfg = self.config
        if prefix_mode not in ("auto", "inpaint", "trained"):
            raise ValueError(f"prefix_mode must be 'auto', 'inpaint' or 'trained', got {prefix_mode!r}")
        obs_history = self._check_obs_history(obs_history)
        batch = obs_history.shape[0]
        images = self._check_images(images, batch)
        if self.training or self.model.training:
            self.eval()  # eval crops (centre) and no dropout
        encode_start = _now(self.device)
        if self.fast_path is not None and images is not None:  # the encoder's fast path (parapolicy.policy.accel_encoder)
            from parapolicy.policy.accel import global_condition

            global_cond = global_condition(self, obs_history, images)
        else:
            global_cond = self.global_condition(obs_history, images)  # [B, n_obs_steps * feature_dim], once per call
        told = False  # the network is given the prefix as known actions (a delay-conditioned policy)
        if cfg.delay_conditioned:
            known, told = self._known_for_call(prefix, prefix_weights, prefix_mode, batch)
            global_cond = torch.cat([global_cond, known], dim=-1)
        elif prefix_mode == "trained":
            raise ValueError("prefix_mode='trained' needs a policy trained for delay (config max_delay > 0, "
                             "e.g. checkpoints/square_delay); this one was not: use prefix_mode='inpaint'")
        encode_end = _now(self.device)
        shape = (batch, cfg.horizon, cfg.sample_dim)
        if x_T is None:
            gen_device = generator.device if generator is not None else self.device
            x_T = torch.randn(shape, generator=generator, device=gen_device)
        elif tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {list(shape)}, got {list(x_T.shape)}")
        x_T = x_T.to(self.device, torch.float32)
        if noise is not None:
            noise = noise.to(self.device, torch.float32)

        denoise = self.make_denoise_fn(global_cond)
        if self.fast_path is not None:
            from parapolicy.policy.accel import apply_fast_path

            denoise = apply_fast_path(self, denoise, global_cond)
        constraint = None
        if prefix is not None:
            clean = told and cfg.committed_in_sample == "clean"  # trained with them clean in the sample
            constraint = self._prefix_constraint(prefix, prefix_weights, prefix_noise, batch, generator, clean)
            denoise = constraint.wrap(denoise)
        elif prefix_weights is not None or prefix_noise is not None:
            raise ValueError("prefix_weights and prefix_noise need a prefix")
        sampler = self.sampler
        if warm_from is not None and init is None and sampler.is_parallel:
            if sampler.is_stochastic and noise is None:  # the guess must see the noise the solve will use
                noise = sampler.unit_noise(x_T, None, generator)
            shift = cfg.n_action_steps if warm_shift is None else int(warm_shift)
            guess = shift_chunk(warm_from.to(self.device, torch.float32), shift)
            init = sampler.guess_trajectory(x_T, guess, noise, rule=self.warm_start_rule)
        out = sampler.sample(denoise, x_T, noise=noise, generator=generator, init=init)
        sample = out.sample if constraint is None else constraint.finish(out.sample)
        action_pred = self.normalizer.action.unnormalize(sample[..., : cfg.action_dim])  # inpainted obs dropped
        start = cfg.action_start
        return {
            "action": action_pred[:, start : start + cfg.n_action_steps],
            "action_pred": action_pred,
            "rounds": getattr(out, "rounds", None),
            "model_evals": getattr(out, "model_evals", None),
            "converged": getattr(out, "converged", None),
            "errors": getattr(out, "errors", None),
            "trajectory": getattr(out, "trajectory", None),
            "sample": sample,
            "encode_ms": (encode_end - encode_start) * 1e3,
            "sample_ms": (_now(self.device) - encode_end) * 1e3,
        }

    def _known_for_call(self, prefix, weights, mode: str, batch: int) -> tuple[torch.Tensor, bool]:
        """A delay-conditioned policy's known-actions conditioning ``[B, known_cond_dim]`` for one call, and
        whether it tells the prefix (``mode`` "trained", or "auto" with a prefix known exactly)."""
        hard = prefix is not None and (weights is None or bool((torch.as_tensor(weights) == 1).all()))
        if mode == "trained" and not hard:
            raise ValueError("prefix_mode='trained' needs a prefix known exactly (prefix_weights None or all 1)")
        if mode == "inpaint" or not hard:
            return self.known_condition(None, torch.zeros(batch, dtype=torch.long)), False
        prefix = torch.as_tensor(prefix, dtype=torch.float32, device=self.device)
        if prefix.ndim != 3 or prefix.shape[0] != batch or prefix.shape[2] != self.config.action_dim:
            raise ValueError(f"prefix must have shape [B={batch}, L, {self.config.action_dim}], got {list(prefix.shape)}")
        return self.known_condition(self.normalizer.action.normalize(prefix), prefix.shape[1]), True

    def _prefix_constraint(self, prefix, weights, eta, batch: int, generator, clean: bool = False):
        """``predict_action``'s prefix arguments, checked and normalised -> a ``PrefixConstraint``; ``clean``:
        imposed at noise level 0 at every step (a policy trained with ``committed_in_sample="clean"``)."""
        from parapolicy.samplers.constraints import PrefixConstraint

        cfg = self.config
        if cfg.sample_dim != cfg.action_dim:
            raise ValueError("prefix constraints need a policy that samples actions only; this transformer also "
                             "samples in-painted observations (obs_as_cond=False)")
        prefix = torch.as_tensor(prefix, dtype=torch.float32, device=self.device)
        if prefix.ndim != 3 or prefix.shape[0] != batch or prefix.shape[2] != cfg.action_dim or not (
                1 <= prefix.shape[1] <= cfg.horizon):
            raise ValueError(f"prefix must have shape [B={batch}, L, {cfg.action_dim}] with 1 <= L <= "
                             f"{cfg.horizon}, got {list(prefix.shape)}")
        length = prefix.shape[1]
        if weights is None:
            weights = torch.ones((batch, length), device=self.device)
        weights = torch.as_tensor(weights, dtype=torch.float32, device=self.device)
        if weights.ndim == 1:
            weights = weights.expand(batch, -1)
        if eta is None:
            gen_device = generator.device if generator is not None else self.device
            eta = torch.randn(prefix.shape, generator=generator, device=gen_device)
        eta = torch.as_tensor(eta, dtype=torch.float32).to(self.device)
        alphas_cumprod = self.noise_scheduler.alphas_cumprod
        return PrefixConstraint(self.normalizer.action.normalize(prefix), weights, eta,
                                torch.ones_like(alphas_cumprod) if clean else alphas_cumprod)

    # ------------------------------------------------------------------ control-loop API
    def reset(self) -> None:
        """Forget the observation history and queued actions (call at every episode start)."""
        self._obs_history: deque[np.ndarray] = deque(maxlen=self.config.n_obs_steps)
        self._image_history: deque[dict[str, np.ndarray]] = deque(maxlen=self.config.n_obs_steps)
        self._action_queue: deque[np.ndarray] = deque()
        self._previous_sample: torch.Tensor | None = None  # warm start never crosses episodes

    def flat_observation(self, obs: Mapping[str, Any] | np.ndarray | torch.Tensor) -> np.ndarray:
        """One observation (obs dict, or flat array / tensor) -> float32 ``[obs_dim]``, checked (ValueError
        naming the problem); ``parapolicy.observation.flatten_observation`` with this policy's keys."""
        return flatten_observation(obs, self.config.obs_keys, self.config.obs_dim, sequences=False)

    def observation_frames(self, obs: Any) -> dict[str, np.ndarray]:
        """The policy's cameras in an obs dict as uint8 ``{key: [3, H, W]}`` (``parapolicy.observation.camera_frames``)."""
        return camera_frames(obs, self.config.image_keys, self.config.image_shape)

    def act(self, obs: Mapping[str, Any] | np.ndarray | torch.Tensor) -> np.ndarray:
        """One control step: record ``obs`` and return the next action ``[action_dim]`` (float32; an
        ``absolute_rot6d`` policy's as the env's 7-dim absolute command, see ``env_action``).

        Replans every ``n_action_steps`` calls (when the action queue runs dry) from the last
        ``n_obs_steps`` observations; the first call after ``reset()`` repeats its observation to fill
        the history. ``last_info`` describes this call (``replanned``, ``rounds``, ``model_evals``,
        ``converged``, ``latency_s``; on replanning calls ``encode_ms`` and ``sample_ms``). An image
        policy takes robosuite's obs dict with its cameras' frames, uint8 ``[H, W, 3]`` or ``[3, H, W]``.
        """
        start = time.perf_counter()
        flat = self.flat_observation(obs)
        frames = self.observation_frames(obs) if self.config.image_keys else {}
        if not self._obs_history:
            self._obs_history.extend([flat] * self.config.n_obs_steps)
            self._image_history.extend([frames] * self.config.n_obs_steps)
        else:
            self._obs_history.append(flat)
            self._image_history.append(frames)

        replanned = not self._action_queue
        info: dict[str, Any] = {"replanned": replanned, "rounds": 0, "model_evals": 0, "converged": None}
        if replanned:
            history = torch.from_numpy(np.stack(self._obs_history))[None]  # [1, n_obs_steps, obs_dim]
            warm_from = self._previous_sample if self.warm_start else None
            images = None
            if self.config.image_keys:  # {key: [1, n_obs_steps, 3, H, W]} uint8
                images = {key: torch.from_numpy(np.stack([step[key] for step in self._image_history]))[None]
                          for key in self.config.image_keys}
            plan = self.predict_action(history, warm_from=warm_from, images=images)
            self._previous_sample = plan.get("sample")
            info["warm"] = warm_from is not None
            self._action_queue.extend(plan["action"][0].cpu().numpy())
            converged = plan["converged"]
            if torch.is_tensor(converged):
                converged = bool(converged.all())
            info.update(rounds=_as_int(plan["rounds"]), model_evals=_as_int(plan["model_evals"]), converged=converged,
                        encode_ms=plan.get("encode_ms"), sample_ms=plan.get("sample_ms"))
        action = self.env_action(self._action_queue.popleft())
        info["latency_s"] = time.perf_counter() - start
        self.last_info = info
        return action

    def env_action(self, action: Any) -> Any:
        """The env command of planned actions ``[..., action_dim]`` (numpy or torch): unchanged for delta
        policies; an ``absolute_rot6d`` policy's become robosuite's absolute OSC_POSE commands ``[..., 7]``
        (position, axis-angle, gripper; DP's ``undo_transform_action``). ``act()`` returns these."""
        from parapolicy.policy.action_space import to_env_action

        return to_env_action(action, self.config.action_space)


def build_obs_encoder(config: DiffusionPolicyConfig) -> nn.Module:
    """The observation encoder of an image policy (``config.image_keys``; options in ``config.vision``)."""
    from parapolicy.policy.vision import DPImageObsEncoder, ImageObsEncoder, LeRobotObsEncoder

    options = {"feature_dim": 64, **config.vision}
    kind = options.pop("encoder", "visualcore")
    if kind == "multi_image":  # DP's ResNet image policy (imported)
        return DPImageObsEncoder(config.image_keys, config.image_shape, config.obs_keys, **options)
    if kind == "lerobot":  # LeRobot's image DiffusionPolicy (imported)
        return LeRobotObsEncoder(config.image_keys, config.image_shape, config.obs_dim, **options)
    return ImageObsEncoder(config.image_keys, config.image_shape, config.obs_dim, **options)


def _now(device: torch.device) -> float:
    """perf_counter after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _as_int(value: Any) -> Any:
    if torch.is_tensor(value):
        return int(value.max()) if value.numel() > 1 else int(value)
    return value


def shift_chunk(chunk: torch.Tensor, shift: int) -> torch.Tensor:
    """``[B, H, A]`` -> the same chunk ``shift`` steps later: drop the first ``shift`` actions (executed
    since) and pad by repeating the last one."""
    if not 0 <= shift < chunk.shape[1]:
        raise ValueError(f"shift must be in [0, {chunk.shape[1]}), got {shift}")
    pad = chunk[:, -1:].expand(-1, shift, -1)
    return torch.cat([chunk[:, shift:], pad], dim=1)
