"""Check ``python -m parapolicy.convert`` on Diffusion Policy image workspaces written by DP's own code.

    PYTHONPATH= /work/dpvenv/bin/python scripts/check_dp_image.py \
        --dp-src /work/dp_src/diffusion_policy --robomimic-src /work/dp_src/robomimic \
        --convert-python .venv/bin/python

Needs an environment where DP's code runs (torch + torchvision, hydra-core, dill, einops, diffusers,
zarr, tqdm and six; parapolicy installed, with safetensors) and checkouts of real-stanford/diffusion_policy and
robomimic 0.2.0 (the version DP pins). Nothing of theirs is imported by parapolicy itself.

Per case, with DP's own code:

1. compose DP's training config with Hydra from DP's ``config/`` folder (``task=lift_image``, or
   ``lift_image_abs`` for absolute actions; the observation keys of ``shape_meta`` reordered so that
   cameras and low-dim keys interleave and no order is alphabetical: robomimic's encoder follows
   insertion order, DP's ResNet encoder sorts) and resolve it, as DP's ``train.py`` does;
2. build the workspace state as ``TrainDiffusionUnet{Hybrid,}Workspace.__init__`` does
   (``hydra.utils.instantiate(cfg.policy)``, an EMA deepcopy, the AdamW optimiser, step counters: DP's
   training workspace modules themselves import an lr-scheduler helper that newer diffusers lack);
   perturb the random weights (norm layers and biases too, model and EMA differently); set a
   ``LinearNormalizer`` fitted by DP (limits on random data for low-dim keys and actions, or DP's
   abs-action normaliser; DP's image range normaliser for cameras); write it with DP's
   ``BaseWorkspace.save_checkpoint`` (dill payload: cfg, state_dicts, pickles);
3. convert it in a subprocess with ``--convert-python -m parapolicy.convert`` (default weights: EMA);
4. plan with DP's ``ema_model.predict_action`` on uint8 frames / 255 and random low-dim observations,
   recording every ``torch.randn`` it draws (x_T, then one draw per noisy step), and with the converted
   policy's ``predict_action`` on the same frames, observations, x_T and step noise.

It prints max |delta| of the executed actions (and of the conditioning, as a diagnosis) per case and
exits non-zero if any exceeds ``--tolerance`` (1e-4). Runs on one CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

# Cameras and low-dim keys interleaved, in neither DP's lift_image order nor alphabetical order.
KEY_ORDER = ["robot0_gripper_qpos", "robot0_eye_in_hand_image", "robot0_eef_pos", "agentview_image", "robot0_eef_quat"]

CASES = {
    # name: (DP config, down_dims (None: the config's), Hydra overrides)
    "hybrid": ("train_diffusion_unet_hybrid_workspace", None, ["task=lift_image"]),
    "hybrid_ddim": ("train_diffusion_unet_ddim_hybrid_workspace", None, ["task=lift_image"]),  # DDIM-8, no crop
    # DP's published kind: absolute actions (position, 6D rotation, gripper), DP's abs-action normaliser
    "hybrid_abs": ("train_diffusion_unet_hybrid_workspace", [128, 256, 512], ["task=lift_image_abs"]),
    "image": ("train_diffusion_unet_image_workspace", [128, 256, 512], ["task=lift_image"]),
    # batch norm, one ResNet for both cameras, random_crop=False (DP then crops nothing at all)
    "image_bn_shared": ("train_diffusion_unet_image_workspace", [128, 256, 512],
                        ["task=lift_image", "policy.obs_encoder.use_group_norm=false",
                         "policy.obs_encoder.share_rgb_model=true", "policy.obs_encoder.random_crop=false"]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp-src", required=True, type=Path, help="real-stanford/diffusion_policy checkout")
    parser.add_argument("--robomimic-src", required=True, type=Path, help="robomimic 0.2.0 checkout")
    parser.add_argument("--convert-python", default=sys.executable,
                        help="python that runs `-m parapolicy.convert` (default: this one)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--down-dims", default=None,
                        help="override every case's U-Net down_dims, e.g. 64,128,256 (default: "
                             + ", ".join(f"{k} {v[1] or 'DP config'}" for k, v in CASES.items()) + ")")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the .ckpt and converted folders go (default: a temp dir)")
    return parser.parse_args(argv)


def compose_dp_config(dp_src: Path, config_name: str, down_dims, extra_overrides):
    """DP's composed, resolved training config (as ``train.py`` hands it to the workspace)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    OmegaConf.register_new_resolver("eval", eval, replace=True)  # DP's train.py does the same
    overrides = list(extra_overrides)
    if down_dims is not None:
        overrides.append(f"policy.down_dims=[{','.join(str(d) for d in down_dims)}]")
    with initialize_config_dir(config_dir=str((dp_src / "diffusion_policy" / "config").resolve()), version_base=None):
        cfg = compose(config_name=config_name, overrides=overrides)
    obs = OmegaConf.to_container(cfg.task.shape_meta.obs)
    assert sorted(obs) == sorted(KEY_ORDER), sorted(obs)
    with open_dict(cfg):
        cfg.task.shape_meta.obs = {key: obs[key] for key in KEY_ORDER}
    OmegaConf.resolve(cfg)
    return cfg


def dp_workspace(cfg, output_dir: Path):
    """The state ``TrainDiffusionUnet{Hybrid,}Workspace.__init__`` builds, on DP's own ``BaseWorkspace``."""
    import hydra
    import numpy as np
    from diffusion_policy.workspace.base_workspace import BaseWorkspace

    class Workspace(BaseWorkspace):
        include_keys = ["global_step", "epoch"]

        def __init__(self, cfg, output_dir=None):
            super().__init__(cfg, output_dir=output_dir)
            torch.manual_seed(cfg.training.seed)
            np.random.seed(cfg.training.seed)
            self.model = hydra.utils.instantiate(cfg.policy)
            self.ema_model = copy.deepcopy(self.model) if cfg.training.use_ema else None
            self.optimizer = hydra.utils.instantiate(cfg.optimizer, params=self.model.parameters())
            self.global_step = 0
            self.epoch = 0

    return Workspace(cfg, output_dir=str(output_dir))


@torch.no_grad()
def perturb(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.1) -> None:
    """Move every parameter off its initial value (GroupNorm's 1 / 0, zero biases), and batch norm's running
    statistics off 0 / 1, so that a swapped or dropped tensor shows in the actions."""
    for p in module.parameters():
        spread = max(float(p.std()), 0.05) if p.numel() > 1 else 1.0
        p.add_(torch.randn(p.shape, generator=generator) * scale * spread)
    for name, buffer in module.named_buffers():
        if name.endswith("running_mean"):
            buffer.add_(torch.randn(buffer.shape, generator=generator) * scale)
        elif name.endswith("running_var"):
            buffer.mul_(torch.exp(torch.randn(buffer.shape, generator=generator) * scale))


def dp_normalizer(shape_meta, generator: torch.Generator, abs_action: bool = False):
    """DP's ``LinearNormalizer``: limits fitted on random data (per-dim ranges of different widths and
    centres) for the low-dim keys and the action (absolute actions: DP's robomimic abs-action normaliser,
    position limits, rotation and gripper as they are), ``get_image_range_normalizer`` for the cameras."""
    from diffusion_policy.common.normalize_util import (
        array_to_stats,
        get_image_range_normalizer,
        robomimic_abs_action_only_normalizer_from_stat,
    )
    from diffusion_policy.model.common.normalizer import LinearNormalizer

    data = {}
    for key, attr in shape_meta["obs"].items():
        if attr.get("type", "low_dim") == "low_dim":
            dim = attr["shape"][0]
            data[key] = torch.randn(500, dim, generator=generator) * (0.2 + torch.rand(dim, generator=generator)) \
                + torch.randn(dim, generator=generator)
    dim = shape_meta["action"]["shape"][0]
    data["action"] = torch.randn(500, dim, generator=generator) * (0.2 + torch.rand(dim, generator=generator))
    normalizer = LinearNormalizer()
    normalizer.fit(data, mode="limits", last_n_dims=1)
    for key, attr in shape_meta["obs"].items():
        if attr.get("type") == "rgb":
            normalizer[key] = get_image_range_normalizer()
    if abs_action:
        normalizer["action"] = robomimic_abs_action_only_normalizer_from_stat(array_to_stats(data["action"].numpy()))
    return normalizer


def record_randn(fn):
    """Run ``fn()`` and return (its result, every tensor ``torch.randn`` drew meanwhile, in order)."""
    draws, real = [], torch.randn

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        draws.append(out.clone())
        return out

    torch.randn = recording
    try:
        return fn(), draws
    finally:
        torch.randn = real


def run_case(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    from diffusion_policy.common.pytorch_util import dict_apply

    from parapolicy.policy import load_policy

    config_name, down_dims, overrides = CASES[name]
    if args.down_dims:
        down_dims = [int(v) for v in args.down_dims.split(",")]
    start = time.perf_counter()
    cfg = compose_dp_config(args.dp_src, config_name, down_dims, overrides)
    workspace = dp_workspace(cfg, workdir)
    gen = torch.Generator().manual_seed(args.seed)
    perturb(workspace.model, gen)
    perturb(workspace.ema_model, gen)  # EMA differs from model: the converter must pick EMA
    shape_meta = cfg.shape_meta
    normalizer = dp_normalizer(shape_meta, gen, abs_action=bool(cfg.task.get("abs_action", False)))
    workspace.model.set_normalizer(normalizer)
    workspace.ema_model.set_normalizer(normalizer)
    ckpt = Path(workspace.save_checkpoint(path=workdir / f"{name}.ckpt", use_thread=False))
    built = time.perf_counter()

    out = workdir / f"{name}_converted"
    command = [args.convert_python, "-m", "parapolicy.convert", str(ckpt), "--out", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the converter sees no DP / robomimic code
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    print(f"  $ {shlex.join(command)}\n  {result.stdout.strip() or result.stderr.strip()}")
    if result.returncode != 0:
        raise RuntimeError(f"{name}: conversion failed:\n{result.stderr}")
    converted = time.perf_counter()

    # --- the same inputs for both: uint8 frames (DP gets them / 255), raw low-dim observations
    policy_dp = workspace.ema_model.eval()
    batch, steps_obs = args.batch, cfg.n_obs_steps
    frames, low = {}, {}
    for key, attr in shape_meta["obs"].items():
        shape = (batch, steps_obs, *attr["shape"])
        if attr.get("type") == "rgb":
            frames[key] = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        else:
            low[key] = normalizer[key].unnormalize(torch.rand(shape, generator=gen) * 2.2 - 1.1)
    obs_dp = {**low, **{k: v.float() / 255.0 for k, v in frames.items()}}
    torch.manual_seed(args.seed + 1)
    with torch.no_grad():
        dp_out, draws = record_randn(lambda: policy_dp.predict_action(obs_dp))
        nobs = policy_dp.normalizer.normalize(obs_dp)
        this = dict_apply(nobs, lambda x: x[:, :steps_obs].reshape(-1, *x.shape[2:]))
        cond_dp = policy_dp.obs_encoder(this).reshape(batch, steps_obs, -1)
        negative = {**obs_dp, **{k: 1 - v for k, v in obs_dp.items() if k in frames}}
        inverted = dict_apply(policy_dp.normalizer.normalize(negative),
                              lambda x: x[:, :steps_obs].reshape(-1, *x.shape[2:]))
        camera_effect = (policy_dp.obs_encoder(inverted).reshape(batch, steps_obs, -1) - cond_dp).abs().max().item()
    dp_timesteps = policy_dp.noise_scheduler.timesteps.to(torch.long)
    dp_done = time.perf_counter()

    policy = load_policy(out, device="cpu")
    pc = policy.config
    if not torch.equal(policy.sampler.timesteps.cpu(), dp_timesteps):
        raise AssertionError(f"{name}: timesteps differ: DP {dp_timesteps.tolist()}, "
                             f"ours {policy.sampler.timesteps.tolist()}")
    noisy = [i for i, t in enumerate(dp_timesteps.tolist()) if t > 0]
    stochastic = policy.sampler_name.startswith("ddpm")
    expected_draws = 1 + (len(noisy) if stochastic else 0)
    if len(draws) != expected_draws:
        raise AssertionError(f"{name}: DP drew {len(draws)} tensors, expected x_T + {expected_draws - 1} step noises")
    x_T = draws[0]
    noise = None
    if stochastic:
        noise = torch.zeros((len(dp_timesteps), *x_T.shape))
        for i, draw in zip(noisy, draws[1:]):
            noise[i] = draw
    obs_history = torch.cat([low[k].reshape(batch, steps_obs, -1) for k in pc.obs_keys], dim=-1)
    images = {k: frames[k] for k in pc.image_keys}
    ours = policy.predict_action(obs_history, x_T=x_T, noise=noise, images=images)
    with torch.no_grad():
        cond_ours = policy.global_condition(obs_history, images).reshape(batch, steps_obs, -1)
    ours_done = time.perf_counter()

    # DP's conditioning layout -> ours, per key (diagnosis only: the actions decide)
    dp_order = [k for k in shape_meta["obs"]] if "Hybrid" in type(policy_dp).__name__ else \
        sorted(k for k in shape_meta["obs"] if k in frames) + sorted(k for k in shape_meta["obs"] if k in low)
    widths = {k: int(torch.tensor(list(shape_meta["obs"][k]["shape"])).prod()) for k in low}
    camera_width = (policy_dp.obs_feature_dim - sum(widths.values())) // len(frames)
    widths.update({k: camera_width for k in frames})
    offsets, offset = {}, 0
    for key in dp_order:
        offsets[key] = offset
        offset += widths[key]
    columns = torch.cat([torch.arange(offsets[k], offsets[k] + widths[k]) for k in pc.image_keys + pc.obs_keys])
    cond_delta = (cond_dp[..., columns] - cond_ours).abs().max().item()

    action_delta = (dp_out["action"] - ours["action"]).abs().max().item()
    pred_delta = (dp_out["action_pred"] - ours["action_pred"]).abs().max().item()
    params = sum(p.numel() for p in policy_dp.model.parameters())
    return dict(
        name=name, policy=type(policy_dp).__name__, config=config_name, overrides=overrides,
        down_dims=list(cfg.policy.down_dims),
        unet_params=params, encoder_params=sum(p.numel() for p in policy_dp.obs_encoder.parameters()),
        scheduler=type(policy_dp.noise_scheduler).__name__, steps=len(dp_timesteps), sampler=policy.sampler_name,
        crop=cfg.policy.crop_shape if "crop_shape" in cfg.policy else  # the ResNet encoder crops only with random_crop
        (cfg.policy.obs_encoder.crop_shape if cfg.policy.obs_encoder.random_crop else None),
        action_delta=action_delta, action_pred_delta=pred_delta, cond_delta=cond_delta, camera_effect=camera_effect,
        action_std=dp_out["action"].std().item(), ok=action_delta <= args.tolerance,
        seconds=dict(build_save=built - start, convert=converted - built, dp_plan=dp_done - converted,
                     ours_plan=ours_done - dp_done))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    sys.path[:0] = [str(args.dp_src.resolve()), str(args.robomimic_src.resolve())]
    print("$ " + shlex.join([sys.executable, *sys.argv]))
    import torchvision

    # robomimic 0.2.0 builds its ResNet with pretrained=False, which torchvision now warns about
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}; DP {args.dp_src}, "
          f"robomimic {args.robomimic_src}")
    failed, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="check_dp_image_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.cases:
            print(f"[{name}]")
            r = run_case(name, args, workdir)
            if not r["ok"]:
                failed.append(name)
            print(f"  {r['policy']} ({' '.join([r['config'], *r['overrides']])}), U-Net down_dims {r['down_dims']} "
                  f"({r['unet_params'] / 1e6:.1f}M), encoder {r['encoder_params'] / 1e6:.2f}M, crop {r['crop']}, "
                  f"{r['scheduler']}-{r['steps']} -> ours {r['sampler']}")
            print(f"  max |delta| executed actions {r['action_delta']:.3g} (action_pred {r['action_pred_delta']:.3g}; "
                  f"conditioning {r['cond_delta']:.3g}); DP action std {r['action_std']:.3f}, inverted frames move "
                  f"DP's conditioning by {r['camera_effect']:.3g}: {'OK' if r['ok'] else 'FAIL'} "
                  f"(tolerance {args.tolerance:g})")
            print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()), flush=True)
    verdict = f"FAILED: {', '.join(failed)}" if failed else f"all {len(args.cases)} cases within {args.tolerance:g}"
    print(f"{verdict} ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
