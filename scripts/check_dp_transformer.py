"""Check ``python -m parapolicy.convert`` on Diffusion Policy transformer (DP-T) workspaces written by DP's own code.

    PYTHONPATH= nice -n 15 /work/dpvenv/bin/python scripts/check_dp_transformer.py \
        --dp-src /work/dp_src/diffusion_policy --convert-python .venv/bin/python

Needs an environment where DP's low-dim code runs (torch, diffusers, hydra-core, dill, einops, zarr;
parapolicy importable, for the comparison) and a checkout of real-stanford/diffusion_policy. Nothing of
DP's is imported by parapolicy itself; the converter runs in a subprocess without DP on its path. No
torchvision is needed, so a venv that reuses ``.venv``'s packages does (what the docs' figures used)::

    python3.11 -m venv /work/dpvenv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \
        > /work/dpvenv/lib/python3.11/site-packages/parapolicy_venv.pth
    /work/dpvenv/bin/pip install einops "zarr<3"

Per case, with DP's own code (``train_diffusion_transformer_lowdim_workspace`` + ``task=square_lowdim``,
DP's robomimic settings horizon 10, 2 observation steps, 8 actions, plus the case's overrides):

1. compose and resolve DP's training config with Hydra, as DP's ``train.py`` does;
2. build the workspace state as ``TrainDiffusionTransformerLowdimWorkspace.__init__`` does
   (``hydra.utils.instantiate(cfg.policy)``, an EMA copy, the optimiser, step counters), move every weight
   off its initial value (model and EMA differently), fit DP's ``LinearNormalizer`` on random data and
   write it with DP's ``BaseWorkspace.save_checkpoint``;
3. convert it with ``--convert-python -m parapolicy.convert`` (EMA weights);
4. plan with DP's ``ema_model.predict_action`` on random observations, recording every ``torch.randn`` it
   draws (x_T, then one per noisy step), and with the converted policy on the same observations, x_T and
   step noise: DDPM / DDIM as the checkpoint says, then ``paraddpm`` (``--picard-tolerance``, default
   1e-6) on the same draws.

Prints max |delta| of the executed actions per case and sampler; exits non-zero if the checkpoint's own
sampler exceeds ``--tolerance`` (1e-5) or paraddpm ``--picard-max`` (1e-4). One CPU thread.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_dp_image import dp_workspace, perturb, record_randn  # noqa: E402  (one copy of DP's workspace shim)

CONFIG = "train_diffusion_transformer_lowdim_workspace"
ROBOMIMIC = ["task=square_lowdim", "horizon=10", "n_obs_steps=2", "n_action_steps=8"]
DDIM = ["policy.noise_scheduler._target_=diffusers.schedulers.scheduling_ddim.DDIMScheduler",
        "~policy.noise_scheduler.variance_type", "+policy.noise_scheduler.set_alpha_to_one=true",
        "+policy.noise_scheduler.steps_offset=0", "policy.num_inference_steps=10"]
CASES = {
    # name: Hydra overrides on top of ROBOMIMIC
    "obs_cond": [],  # DP's published kind: causal, observation tokens, MLP condition encoder
    "obs_cond_ddim": DDIM,
    "cond_encoder": ["policy.model.n_cond_layers=2"],  # a transformer encoder over the condition tokens
    "inpaint": ["obs_as_cond=false"],  # observations in-painted into the sampled sequence
    "inpaint_ddim": ["obs_as_cond=false", *DDIM],
    "encoder_only": ["obs_as_cond=false", "policy.model.time_as_cond=false"],  # DP's BERT variant
    "steps_only": ["pred_action_steps_only=true", "policy.model.causal_attn=false"],  # plans the 8 executed steps
    "steps_only_causal": ["pred_action_steps_only=true", "horizon=8"],
    "not_causal_latency": ["policy.model.causal_attn=false", "n_latency_steps=1"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp-src", required=True, type=Path, help="real-stanford/diffusion_policy checkout")
    parser.add_argument("--convert-python", default=sys.executable,
                        help="python that runs `-m parapolicy.convert` (default: this one)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--n-layer", type=int, default=None, help="override DP's 8 decoder layers (a quicker run)")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-5)
    parser.add_argument("--picard-tolerance", type=float, default=1e-6)
    parser.add_argument("--picard-max", type=float, default=1e-4)
    parser.add_argument("--workdir", type=Path, default=None)
    return parser.parse_args(argv)


def compose(dp_src: Path, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("eval", eval, replace=True)  # DP's train.py does the same
    with initialize_config_dir(config_dir=str((dp_src / "diffusion_policy" / "config").resolve()), version_base=None):
        cfg = hydra_compose(config_name=CONFIG, overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def lowdim_normalizer(obs_dim: int, action_dim: int, generator: torch.Generator):
    """DP's LinearNormalizer with limits fitted on random data of per-dimension widths and centres."""
    from diffusion_policy.model.common.normalizer import LinearNormalizer

    def data(dim: int) -> torch.Tensor:
        return torch.randn(500, dim, generator=generator) * (0.2 + torch.rand(dim, generator=generator)) \
            + torch.randn(dim, generator=generator)

    normalizer = LinearNormalizer()
    normalizer.fit({"obs": data(obs_dim), "action": data(action_dim)}, mode="limits", last_n_dims=1)
    return normalizer


def run_case(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    from parapolicy.policy import load_policy

    overrides = ROBOMIMIC + CASES[name] + ([f"policy.model.n_layer={args.n_layer}"] if args.n_layer else [])
    start = time.perf_counter()
    cfg = compose(args.dp_src, overrides)
    workspace = dp_workspace(cfg, workdir)
    gen = torch.Generator().manual_seed(args.seed)
    perturb(workspace.model, gen)
    perturb(workspace.ema_model, gen)  # EMA differs from model: the converter must pick EMA
    normalizer = lowdim_normalizer(cfg.obs_dim, cfg.action_dim, gen)
    workspace.model.set_normalizer(normalizer)
    workspace.ema_model.set_normalizer(normalizer)
    ckpt = Path(workspace.save_checkpoint(path=workdir / f"{name}.ckpt", use_thread=False))

    out = workdir / f"{name}_converted"
    command = [args.convert_python, "-m", "parapolicy.convert", str(ckpt), "--out", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the converter sees no DP code
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    print(f"  $ {shlex.join(command)}\n  {result.stdout.strip() or result.stderr.strip()}")
    if result.returncode != 0:
        raise RuntimeError(f"{name}: conversion failed:\n{result.stderr}")
    converted = time.perf_counter()

    policy_dp = workspace.ema_model.eval()
    obs = normalizer["obs"].unnormalize(torch.rand((args.batch, cfg.n_obs_steps, cfg.obs_dim), generator=gen) * 2.2 - 1.1)
    torch.manual_seed(args.seed + 1)
    with torch.no_grad():
        dp_out, draws = record_randn(lambda: policy_dp.predict_action({"obs": obs}))
    dp_timesteps = policy_dp.noise_scheduler.timesteps.to(torch.long)

    policy = load_policy(out, device="cpu")
    if not torch.equal(policy.sampler.timesteps.cpu(), dp_timesteps):
        raise AssertionError(f"{name}: timesteps differ: DP {dp_timesteps.tolist()}, ours {policy.sampler.timesteps.tolist()}")
    noisy = [i for i, t in enumerate(dp_timesteps.tolist()) if t > 0]
    stochastic = policy.sampler_name.startswith("ddpm")
    if len(draws) != 1 + (len(noisy) if stochastic else 0):
        raise AssertionError(f"{name}: DP drew {len(draws)} tensors, expected x_T + {len(noisy) if stochastic else 0}")
    x_T, noise = draws[0], None
    if stochastic:
        noise = torch.zeros((len(dp_timesteps), *x_T.shape))
        for i, draw in zip(noisy, draws[1:]):
            noise[i] = draw
    sequential = policy.sampler_name
    ours = policy.predict_action(obs, x_T=x_T, noise=noise)
    executed = dp_out["action"][:, cfg.n_latency_steps:]  # DP's runner drops the latency steps
    sequential_delta = (executed - ours["action"]).abs().max().item()
    pred_delta = (dp_out["action_pred"] - ours["action_pred"]).abs().max().item()

    parallel = "paraddpm" if stochastic else "paraddim"
    policy.set_sampler(parallel, tolerance=args.picard_tolerance)
    par = policy.predict_action(obs, x_T=x_T, noise=noise)
    parallel_delta = (executed - par["action"]).abs().max().item()
    pc = policy.config
    return dict(
        name=name, overrides=CASES[name], params=sum(p.numel() for p in policy_dp.model.parameters()),
        network=pc.network, sample_dim=pc.sample_dim, horizon=pc.horizon, action_start=pc.action_start,
        scheduler=type(policy_dp.noise_scheduler).__name__, steps=len(dp_timesteps), sampler=sequential,
        parallel=parallel, rounds=int(par["rounds"]) if par["rounds"] is not None else None,
        sequential_delta=sequential_delta, pred_delta=pred_delta, parallel_delta=parallel_delta,
        action_std=executed.std().item(),
        ok=sequential_delta <= args.tolerance and parallel_delta <= args.picard_max,
        seconds=dict(build_convert=converted - start, plan=time.perf_counter() - converted))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(args.dp_src.resolve()))
    print("$ " + shlex.join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}; DP {args.dp_src}")
    failed, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="check_dp_transformer_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.cases:
            print(f"[{name}] {' '.join(CASES[name]) or '(DP robomimic settings)'}", flush=True)
            r = run_case(name, args, workdir)
            if not r["ok"]:
                failed.append(name)
            net = r["network"]
            print(f"  TransformerForDiffusion {r['params'] / 1e6:.2f}M: n_layer {net['n_layer']}, n_emb {net['n_emb']}, "
                  f"causal {net['causal_attn']}, time_as_cond {net['time_as_cond']}, obs_as_cond {net['obs_as_cond']}, "
                  f"n_cond_layers {net['n_cond_layers']}; sampled [{r['horizon']}, {r['sample_dim']}], executed from "
                  f"{r['action_start']}; {r['scheduler']}-{r['steps']}")
            print(f"  max |delta| executed actions: {r['sampler']} {r['sequential_delta']:.3g} (action_pred "
                  f"{r['pred_delta']:.3g}), {r['parallel']} tau={args.picard_tolerance:g} {r['parallel_delta']:.3g} "
                  f"in {r['rounds']} rounds; DP action std {r['action_std']:.3f}: {'OK' if r['ok'] else 'FAIL'}")
            print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()), flush=True)
    verdict = f"FAILED: {', '.join(failed)}" if failed else \
        f"all {len(args.cases)} cases within {args.tolerance:g} (parallel {args.picard_max:g})"
    print(f"{verdict} ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
