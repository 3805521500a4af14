"""Store a checkpoint's network weights in half precision, and measure what that changes in the actions.

    python scripts/half_checkpoint.py checkpoints/square --dtype float16            # measure only
    python scripts/half_checkpoint.py checkpoints/square --dtype float16 --write    # + rewrite the folder

Why: the whole tracked tree travels to a GPU machine within 64 MiB (``make gpu-check``), and the three
shipped fp32 checkpoints were 18 MB each. ``model.*`` tensors are rounded to ``--dtype``; the
normaliser's min / max stay float32 (they map actions back to robot units, and are tiny).
``load_checkpoint`` upcasts to float32 at load, so everything downstream runs as before, on weights
that differ by the rounding.

The measurement: the same observation histories (env resets, if robosuite is installed, plus random
draws over the normaliser's range) and the same noise planned by the float32 weights and by the
rounded ones, with DDPM-100 and DDIM-10; the max and mean absolute action difference (actions are in
[-1, 1]). ``--write`` records that in ``config.json`` under ``storage``, next to the float32 file's
sha256, so the loss is on record with the weights. Writing refuses a folder that is already rounded
(measure against the float32 original instead: ``git show <commit>:<folder>/model.safetensors``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

from parapolicy.policy.checkpoint import CONFIG_FILE, FORMAT, WEIGHTS_FILE, load_checkpoint, load_safetensors, save_safetensors

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def observation_histories(policy, n_env: int, n_random: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``[n, n_obs_steps, obs_dim]``: env resets (seeds ``seed..``; skipped without robosuite) and random draws."""
    pc = policy.config
    parts, where = [], []
    if n_env and pc.env and importlib.util.find_spec("robosuite") is not None:
        import numpy as np

        from parapolicy.envs import make_env

        env = make_env(pc.env)
        try:
            resets = [env.reset(seed=seed + i)[0] for i in range(n_env)]
        finally:
            env.close()
        parts.append(torch.from_numpy(np.stack([[obs] * pc.n_obs_steps for obs in resets])).float())
        where.append(f"{n_env} {pc.env} resets (seeds {seed}..{seed + n_env - 1})")
    gen = torch.Generator().manual_seed(seed)
    low, high = policy.normalizer.obs.min, policy.normalizer.obs.max
    parts.append(low + torch.rand((n_random, pc.n_obs_steps, pc.obs_dim), generator=gen) * (high - low))
    where.append(f"{n_random} uniform over the normaliser's range")
    return torch.cat(parts), " + ".join(where)


def rounded_state(state: dict, dtype: torch.dtype) -> dict:
    """``model.*`` floating tensors rounded to ``dtype``; everything else (the normaliser) as it is."""
    return {k: v.to(dtype) if k.startswith("model.") and v.is_floating_point() else v for k, v in state.items()}


@torch.inference_mode()
def action_change(folder: Path, dtype: torch.dtype, obs: torch.Tensor, seed: int = 0) -> dict:
    """Max / mean |action(rounded weights) - action(float32 weights)| per sampler, same obs and noise."""
    reference = load_checkpoint(folder)
    rounded = load_checkpoint(folder)
    state = rounded_state(reference.state_dict(), dtype)
    rounded.load_state_dict({k: v.float() for k, v in state.items()})
    out = {}
    for name, steps in (("ddpm", 100), ("ddim", 10)):
        plans = []
        for policy in (reference, rounded):
            policy.set_sampler(name, steps)
            policy.fast_path = None
            plans.append(policy.predict_action(obs, generator=torch.Generator().manual_seed(seed))["action_pred"])
        diff = (plans[1] - plans[0]).abs()
        out[f"{name}-{steps}"] = {"max": float(diff.max()), "mean": float(diff.mean())}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    parser.add_argument("--n-env", type=int, default=16, help="env-reset observation histories")
    parser.add_argument("--n-random", type=int, default=48, help="random observation histories")
    parser.add_argument("--write", action="store_true", help="rewrite model.safetensors and config.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    folder = args.folder
    weights = folder / WEIGHTS_FILE
    tensors = load_safetensors(weights, f"checkpoint {folder}")
    stored = {str(v.dtype).removeprefix("torch.") for k, v in tensors.items() if k.startswith("model.")}
    if stored != {"float32"}:
        print(f"{folder}: model weights are stored as {sorted(stored)}, not float32: measure against the "
              f"float32 original", file=sys.stderr)
        return 2
    policy = load_checkpoint(folder)
    obs, source = observation_histories(policy, args.n_env, args.n_random)
    change = action_change(folder, DTYPES[args.dtype], obs)
    size_before = weights.stat().st_size
    record = {"weights_dtype": args.dtype, "upcast_at_load": "float32",
              "float32_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "float32_bytes": size_before,
              "action_change_vs_float32": {"observations": source, "noise_seed": 0, **change},
              "command": " ".join(["python scripts/half_checkpoint.py", *(argv or sys.argv[1:])])}
    print(json.dumps(record, indent=2))
    if args.write:
        state = rounded_state(tensors, DTYPES[args.dtype])
        save_safetensors(state, weights, metadata={"format": FORMAT})
        config = json.loads((folder / CONFIG_FILE).read_text())
        config["storage"] = record
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        print(f"{weights}: {size_before / 2**20:.2f} MiB -> {weights.stat().st_size / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
