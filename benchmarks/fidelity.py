"""Offline fidelity of the parallel samplers on a trained policy: rounds, evaluations, deviation.

    python benchmarks/fidelity.py --checkpoint checkpoints/square --dataset data/square.hdf5

Part 1: for observation histories from the dataset's held-out demos and the same x_T / step noise,
each parallel sampler against its sequential twin at several tolerances: mean rounds, mean model
evaluations, and the largest deviation of the executed action chunk (raw action units, actions live in
[-1, 1]). Part 2: along consecutive policy calls of a demo (observations n_action_steps apart), rounds
of cold vs warm-started paraddpm (both warm-start rules) and their deviation from the cold result, and
two oracle bounds that no real warm start can beat: "oracle-x0" is the rollout guess built from this
call's own converged sample (the best any clean-chunk guess can do), "oracle-trajectory" starts from
this call's own converged trajectory. Prints tables and writes a JSON file (--out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from parapolicy.policy import load_policy
from parapolicy.policy.dataset import load_demos, split_demos
from parapolicy.samplers import SAMPLERS

TWINS = [("ddpm", 100), ("ddim", 15), ("dpmsolver", 15)]


def histories_from_demos(demos, n_obs_steps: int, stride: int, limit: int) -> list[torch.Tensor]:
    """Observation histories ``[1, n_obs_steps, D]`` every ``stride`` steps of each demo, up to ``limit``."""
    out = []
    for obs in demos:
        for t in range(n_obs_steps - 1, len(obs), stride):
            out.append(torch.from_numpy(np.asarray(obs[t - n_obs_steps + 1 : t + 1], dtype=np.float32))[None])
            if len(out) >= limit:
                return out
    return out


def plan(policy, history, x_T, noise, warm_from=None):
    start = time.perf_counter()
    out = policy.predict_action(history, x_T=x_T, noise=noise if policy.sampler.is_stochastic else None,
                                warm_from=warm_from)
    out["seconds"] = time.perf_counter() - start
    return out


def fidelity(policy, histories, tolerances, window: int, extra: list[str]) -> list[dict]:
    rows = []
    cfg = policy.config
    pairs = [(f"para{name}", name, steps) for name, steps in TWINS]
    pairs += [(name, "ddim", 15) if name.endswith("ddim") else (name, "ddpm", 100) for name in extra]
    for parallel, sequential, steps in pairs:
        g = torch.Generator().manual_seed(0)
        draws = [(torch.randn((1, cfg.horizon, cfg.action_dim), generator=g),
                  torch.randn((steps, 1, cfg.horizon, cfg.action_dim), generator=g)) for _ in histories]
        policy.set_sampler(sequential, steps)
        reference = [plan(policy, h, x_T, noise)["action"] for h, (x_T, noise) in zip(histories, draws)]
        for tol in tolerances:
            options = {"tolerance": tol}
            if "window" in SAMPLERS[parallel].option_names():
                options["window"] = window
            policy.set_sampler(parallel, steps, **options)
            outs = [plan(policy, h, x_T, noise) for h, (x_T, noise) in zip(histories, draws)]
            deviation = max(float((o["action"] - r).abs().max()) for o, r in zip(outs, reference))
            rows.append({"sampler": parallel, "twin": sequential, "steps": steps, "tolerance": tol,
                         "rounds_mean": float(np.mean([o["rounds"] for o in outs])),
                         "model_evals_mean": float(np.mean([o["model_evals"] for o in outs])),
                         "max_action_deviation": deviation, "n": len(outs)})
            print(f"{parallel:<14} vs {sequential:<9} N={steps:<3} tol={tol:<5} rounds {rows[-1]['rounds_mean']:6.1f} "
                  f"evals {rows[-1]['model_evals_mean']:6.1f}  max |a - a_seq| {deviation:.2e}", flush=True)
    return rows


def warm_start(policy, demos, window: int, tolerance: float, calls_per_demo: int) -> list[dict]:
    cfg = policy.config
    rows = []
    variants = {"cold": None, "warm-rollout": "rollout", "warm-marginal": "marginal"}
    oracles = ("oracle-x0", "oracle-trajectory")
    stats = {name: {"rounds": [], "deviation": []} for name in (*variants, *oracles)}
    for d, obs in enumerate(demos):
        histories = histories_from_demos([obs], cfg.n_obs_steps, cfg.n_action_steps, calls_per_demo)
        g = torch.Generator().manual_seed(1000 + d)
        draws = [(torch.randn((1, cfg.horizon, cfg.action_dim), generator=g),
                  torch.randn((100, 1, cfg.horizon, cfg.action_dim), generator=g)) for _ in histories]
        cold_actions = []
        for name, rule in variants.items():
            policy.set_sampler("paraddpm", 100, window=window, tolerance=tolerance,
                               warm_start=rule is not None, warm_start_rule=rule or "rollout")
            previous = None
            for k, (h, (x_T, noise)) in enumerate(zip(histories, draws)):
                out = plan(policy, h, x_T, noise, warm_from=previous if rule else None)
                previous = out["sample"]
                if k == 0:
                    continue  # the first call of an episode is always cold
                stats[name]["rounds"].append(out["rounds"])
                if rule is None:
                    cold_actions.append(out["action"])
                    # Bounds: guesses that already know this call's answer (its noise-dependent part too).
                    sampler = policy.sampler
                    guesses = {"oracle-x0": sampler.guess_trajectory(x_T, out["sample"], noise),
                               "oracle-trajectory": out["trajectory"]}
                    for oracle, guess in guesses.items():
                        bound = policy.predict_action(h, x_T=x_T, noise=noise, init=guess)
                        stats[oracle]["rounds"].append(bound["rounds"])
                        stats[oracle]["deviation"].append(float((bound["action"] - out["action"]).abs().max()))
                else:
                    stats[name]["deviation"].append(float((out["action"] - cold_actions[k - 1]).abs().max()))
    for name, s in stats.items():
        rows.append({"variant": name, "rounds_mean": float(np.mean(s["rounds"])), "calls": len(s["rounds"]),
                     "max_action_deviation_vs_cold": max(s["deviation"]) if s["deviation"] else 0.0})
        print(f"paraddpm-100 {name:<17} rounds {rows[-1]['rounds_mean']:6.2f} over {len(s['rounds'])} calls  "
              f"max |a - a_cold| {rows[-1]['max_action_deviation_vs_cold']:.2e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/square")
    parser.add_argument("--dataset", default="data/square.hdf5")
    parser.add_argument("--n-obs", type=int, default=12, help="observation histories for part 1")
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.01, 0.1, 0.5])
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--warm-demos", type=int, default=3)
    parser.add_argument("--calls-per-demo", type=int, default=16)
    parser.add_argument("--extra", nargs="*", default=None,
                        help="more parallel samplers (default: every registered SRDS / ParaTAA variant)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warm-only", action="store_true", help="skip part 1 (sampler fidelity)")
    parser.add_argument("--out", default="benchmarks/fidelity_square.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    policy = load_policy(args.checkpoint)
    cfg = policy.config
    demos = load_demos(args.dataset, cfg.obs_keys)
    _, held_out = split_demos(demos, val_ratio=0.05, seed=0)  # the demos training held out (train.py)
    held = [d.obs for d in (held_out or demos[-3:])]
    extra = args.extra if args.extra is not None else sorted(n for n in SAMPLERS if "srds" in n or "taa" in n)
    started = time.time()
    histories = histories_from_demos(held, cfg.n_obs_steps, 24, args.n_obs)
    print(f"part 1: {len(histories)} observation histories from {len(held)} held-out demos")
    rows = [] if args.warm_only else fidelity(policy, histories, args.tolerances, args.window, extra)
    print(f"part 2: warm starts along {args.warm_demos} demos, tolerance 0.1, window {args.window}")
    warm_rows = warm_start(policy, held[: args.warm_demos], args.window, 0.1, args.calls_per_demo)
    result = {"checkpoint": args.checkpoint, "dataset": args.dataset, "window": args.window,
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
              "fidelity": rows, "warm_start": warm_rows, "seconds": time.time() - started}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
