"""encode_ms of an image policy's observation encoder, plain path against the fast path (CPU, one thread).

    python scripts/time_encoder_fast_path.py [lift_image] [dp_image] [--calls 30] [--batch 1]

``lift_image``: the shipped Lift image policy (two 84x84 cameras, small conv trunks). ``dp_image``: the
bench's DP-size encoder (``parapolicy.bench.networks``: robomimic's ResNet-18/GroupNorm trunk +
SpatialSoftmax per camera, 76x76 centre crops; random weights) under a small U-Net, since only the
encoder is timed. Each ``predict_action`` call (DDIM, 1 step) reports its ``encode_ms``; plain and fast
calls alternate on the same inputs, so that load on the machine hits both alike, each after a short
pause (``--pause-ms``: on a loaded shared CPU a call that starts a fresh time slice is far less often
preempted); medians are printed, with the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch


def build(name: str):
    from parapolicy import load_policy
    from parapolicy.bench.networks import DP_NETWORKS, build_network

    policy = load_policy("lift_image", sampler="ddim", num_inference_steps=1)
    if name == "lift_image":
        return policy
    spec = dataclasses.replace(DP_NETWORKS["dp_image"], down_dims=(32, 64, 96), diffusion_step_embed_dim=64,
                               num_parameters=None)
    return build_network(name, policy, seed=0, spec=spec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("networks", nargs="*", default=["lift_image", "dp_image"])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--pause-ms", type=float, default=20.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from parapolicy.policy.accel import make_fast_path, warm_up
    from parapolicy.bench.networks import encoder_parameters, random_images

    for name in args.networks:
        policy = build(name)
        cfg = policy.config
        obs = torch.zeros(args.batch, cfg.n_obs_steps, cfg.obs_dim)
        images = random_images(policy, args.batch, seed=0)
        fast = make_fast_path(True)
        policy.fast_path = fast
        warm_up(policy, args.batch)
        times = {"plain": [], "fast": []}
        outs = {}
        for _ in range(args.calls + 2):  # the first two are not timed
            for label, path in (("plain", None), ("fast", fast)):
                time.sleep(args.pause_ms / 1e3)
                policy.fast_path = path
                plan = policy.predict_action(obs, images=images, generator=torch.Generator().manual_seed(0))
                times[label].append(plan["encode_ms"])
                outs[label] = plan["action_pred"]
        plain, quick = (statistics.median(times[k][2:]) for k in ("plain", "fast"))
        backend = fast.stats.backends.get(f"encoder B{args.batch}")
        print(f"{name}: encoder {encoder_parameters(policy) / 1e6:.2f}M params, batch {args.batch}, "
              f"{cfg.n_obs_steps} steps x {len(cfg.image_keys)} cameras {cfg.image_shape}: encode_ms median plain "
              f"{plain:.2f}, fast {quick:.2f} ({backend}; {plain / quick:.2f}x) over {args.calls} calls each; "
              f"load average {os.getloadavg()[0]:.1f}; warm-up candidates {fast.stats.candidates_ms.get(f'encoder B{args.batch}')}; "
              f"max |plan difference| {float((outs['plain'] - outs['fast']).abs().max()):.1e}; notes {fast.stats.notes}")


if __name__ == "__main__":
    main()
