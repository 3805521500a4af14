"""Record closed-loop episodes of a shipped policy (every action sent to the env, and the outcome) to compare
the runner's behaviour before and after a change of the executor: same seeds, same actions, same outcomes.

    OMP_NUM_THREADS=1 nice -n 15 python scripts/record_episodes.py --out before.json
    ... change the code ...
    OMP_NUM_THREADS=1 nice -n 15 python scripts/record_episodes.py --out after.json --compare before.json

Each case is (name, sampler, steps, timing, latency, transition, seeds); latency is fixed (ms) so that the
async episodes do not depend on this machine's speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

CASES = [
    # name, sampler, steps, timing, latency ms, transition, seeds
    ("ddim10-sync", "ddim", 10, "sync", "measured", "naive", [100000, 100001]),
    ("ddim10-async200-forecast", "ddim", 10, "async", 200, "forecast", [100000, 100001]),
    ("ddim10-async200-bid_prefix", "ddim", 10, "async", 200, "bid_prefix", [100002]),
    ("ddim10-async200-ensemble", "ddim", 10, "async", 200, "ensemble", [100003]),
    ("ddim10-hold120", "ddim", 10, "hold", 120, "naive", [100004]),
    ("paraddpm-sync", "paraddpm", 100, "sync", "measured", "naive", [100000]),
    ("paraddpm-async200-forecast", "paraddpm", 100, "async", 200, "forecast", [100000]),
]


class RecordingEnvs:
    """A vector env that remembers every action batch it is stepped with."""

    def __init__(self, envs):
        self._envs = envs
        self.actions: list[np.ndarray] = []

    def __getattr__(self, name):
        return getattr(self._envs, name)

    def step(self, actions):
        self.actions.append(np.asarray(actions, dtype=np.float32).copy())
        return self._envs.step(actions)


def _imports():
    try:
        from parapolicy.executor.runner import PolicyRunner, make_vector_env
    except ImportError:
        from parapolicy.realtime.runner import PolicyRunner, make_vector_env
    return PolicyRunner, make_vector_env


def record(case) -> list[dict]:
    import parapolicy

    PolicyRunner, make_vector_env = _imports()
    name, sampler, steps, timing, latency, transition, seeds = case
    policy = parapolicy.load_policy("square", sampler=sampler, num_inference_steps=steps)
    out = []
    for seed in seeds:
        envs = RecordingEnvs(make_vector_env("square", 1))
        try:
            rec = PolicyRunner(envs, policy, timing=timing, latency=latency, transition=transition).run_batch([seed])[0]
        finally:
            envs.close()
        actions = np.concatenate(envs.actions)
        out.append({"case": name, "seed": seed, "success": rec["success"], "length": rec["length"],
                    "reward": rec["reward"], "stall_steps": rec.get("stall_steps"), "hold_steps": rec.get("hold_steps"),
                    "calls": len(rec["calls"]), "delays": [c.get("delay_steps") for c in rec["calls"]],
                    "candidates": [c.get("candidate") for c in rec["calls"]],
                    "actions": actions.tolist()})
        print(f"{name} seed {seed}: success {rec['success']} length {rec['length']} calls {len(rec['calls'])} "
              f"stalls {rec.get('stall_steps')}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", help="an earlier --out file: exit 1 unless every episode is identical")
    parser.add_argument("--cases", nargs="*", help="case names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [c for c in CASES if not args.cases or c[0] in args.cases]
    episodes, began = [], time.perf_counter()
    for case in cases:
        episodes.extend(record(case))
    with open(args.out, "w") as f:
        json.dump({"episodes": episodes, "seconds": time.perf_counter() - began}, f)
    if not args.compare:
        return 0
    before = {(e["case"], e["seed"]): e for e in json.load(open(args.compare))["episodes"]}
    same = True
    for e in episodes:
        b = before.get((e["case"], e["seed"]))
        if b is None:
            print(f"{e['case']} seed {e['seed']}: not in {args.compare}")
            continue
        a_actions, b_actions = np.asarray(e["actions"]), np.asarray(b["actions"])
        equal = a_actions.shape == b_actions.shape and np.array_equal(a_actions, b_actions) and all(
            e[k] == b[k] for k in ("success", "length", "reward", "stall_steps", "hold_steps", "delays", "candidates"))
        same &= equal
        diff = float(np.abs(a_actions - b_actions).max()) if a_actions.shape == b_actions.shape else float("nan")
        print(f"{e['case']} seed {e['seed']}: {'identical' if equal else 'DIFFERENT'} (success {b['success']} -> "
              f"{e['success']}, length {b['length']} -> {e['length']}, {len(a_actions)} actions, max |diff| {diff:g})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
