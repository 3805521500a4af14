"""``run_bench``: load the policy, build the jobs, time every phase, write ``bench.json`` and the plots."""

from __future__ import annotations

import copy
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from parapolicy.bench.denoiser import add_predictions, denoiser_networks, time_denoiser
from parapolicy.bench.jobs import build_jobs, fast_modes, mode_backend
from parapolicy.bench.networks import (CHECKPOINT, DP_NETWORKS, build_network, encoder_parameters, network_names,
                                       num_parameters, random_images)
from parapolicy.bench.observations import load_observations
from parapolicy.bench.plots import make_plots
from parapolicy.bench.tables import (backend_comparison, format_backends, format_denoiser_table, format_headline,
                                     format_table, format_vs_eager)
from parapolicy.bench.timed_calls import headline, summarize_phase, time_phase
from parapolicy.policy.checkpoint import resolve_checkpoint
from parapolicy.devices import device_name, pick_device


def resolve_fast_path(cfg: DictConfig, device) -> Optional[dict]:
    """FastPath options of the fast mode (None when no mode runs the fast path)."""
    options = OmegaConf.to_container(cfg.fast_path_options, resolve=True) if cfg.fast_path_options else {}
    if all(mode == "off" for mode in fast_modes(cfg, device)):
        if options:
            raise ValueError("fast_path_options need fast_path=on or both (auto uses them only on CUDA)")
        return None
    return options


def run_bench(cfg: DictConfig, out_dir: Path) -> dict:
    import torch
    from tqdm import tqdm

    from parapolicy.policy.accel import FastPath
    from parapolicy.policy import load_policy
    from parapolicy.policy.checkpoint import git_commit

    started = time.perf_counter()
    for key in ("repetitions", "warmup"):
        if int(cfg[key]) < (1 if key == "repetitions" else 0):
            raise ValueError(f"{key} must be >= {1 if key == 'repetitions' else 0}, got {cfg[key]}")
    batch_sizes = [int(b) for b in cfg.batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be a non-empty list of positive integers, got {list(cfg.batch_sizes)}")
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    device = pick_device(str(cfg.device))
    checkpoint = resolve_checkpoint(str(cfg.checkpoint))
    notes: list[str] = []
    modes = tuple(fast_modes(cfg, device))
    fast_options = resolve_fast_path(cfg, device)

    checkpoint_policy = load_policy(str(checkpoint), device=str(device), fast_path="off")
    (network,) = network_names(cfg.get("network") or CHECKPOINT)
    # the policy every sampler row runs: the checkpoint's, or a Diffusion Policy-size network with
    # random weights and the checkpoint's horizon, scheduler and (where the dims match) normaliser
    policy = build_network(network, checkpoint_policy, int(cfg.seed))
    fast_policies = {}  # per fast mode: the same network; one fast path shared by that mode's jobs
    for mode in modes:
        if mode != "off":
            fast_policies[mode] = copy.copy(policy)
            forced = {} if mode == "on" else {"backend": mode_backend(mode)}
            fast_policies[mode].fast_path = FastPath(**{**fast_options, **forced})
    fast_policy = fast_policies.get("on")
    source = None
    if policy.config.obs_dim != checkpoint_policy.config.obs_dim and str(cfg.obs_source) != "random":
        source = "random"  # the checkpoint's observations do not fit this network's conditioning
        notes.append(f"network {network}: {policy.config.obs_dim} conditioning features per step, not the "
                     f"checkpoint's {checkpoint_policy.config.obs_dim}: random observations")
    obs_pool, obs_source = load_observations(cfg, policy, notes, source)
    obs_pool = obs_pool.to(device)
    images = random_images(policy, obs_pool.shape[0], int(cfg.seed))  # image policies: random uint8 frames
    if images is not None:
        images = {key: value.to(device) for key, value in images.items()}
        notes.append(f"network {network}: random uint8 frames for {', '.join(policy.config.image_keys)}")
    phases = build_jobs(cfg, policy, notes, modes, fast_policies)
    denoiser_fast_paths: dict = {}  # the denoiser curve's own fast paths (one per mode and network)
    networks = denoiser_networks(cfg, checkpoint_policy, (network, policy)) if cfg.denoiser.k else []
    pools = {network: (obs_pool, images)}
    for name, net in networks:  # other networks of the curve with other inputs: random ones
        if name not in pools and (net.config.obs_dim != obs_pool.shape[-1] or net.config.image_keys):
            gen = torch.Generator().manual_seed(int(cfg.seed))
            obs = torch.rand((obs_pool.shape[0], net.config.n_obs_steps, net.config.obs_dim), generator=gen) * 2 - 1
            pools[name] = (obs.to(device), random_images(net, obs_pool.shape[0], int(cfg.seed)))

    with torch.inference_mode():
        n_calls = len(phases["samplers"]) * len(batch_sizes) * int(cfg.repetitions) \
            + len(phases["windows"]) * int(cfg.repetitions)
        bar = tqdm(total=n_calls, desc="bench", unit="call", disable=not cfg.progress_bar)
        result: dict[str, Any] = {"samplers": [], "windows": [], "denoiser": []}
        try:
            if phases["samplers"]:
                for batch in batch_sizes:
                    bar.set_postfix(phase="samplers", batch=batch)
                    records = time_phase(phases["samplers"], obs_pool, batch, cfg, device, bar, images)
                    result["samplers"] += summarize_phase("samplers", phases["samplers"], batch, records)
            if phases["windows"]:
                bar.set_postfix(phase="windows", batch=1)
                records = time_phase(phases["windows"], obs_pool, 1, cfg, device, bar, images)
                result["windows"] += summarize_phase("windows", phases["windows"], 1, records)
        finally:
            bar.close()
        if networks:
            result["denoiser"] = time_denoiser(cfg, networks, obs_pool, device, fast_options, notes, modes=modes,
                                               fast_paths=denoiser_fast_paths,
                                               pools=pools)
    add_predictions(result, network)
    result["headline"] = headline(result["samplers"]) + headline(result["windows"])
    result["backends"] = backend_comparison({**{mode: p.fast_path for mode, p in fast_policies.items()},
                                             **denoiser_fast_paths})

    fast = fast_policy.fast_path if fast_policy is not None else None
    result["meta"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m parapolicy.bench", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "checkpoint": str(checkpoint),
        "network": {"name": network, "num_parameters": num_parameters(policy),
                    "encoder_parameters": encoder_parameters(policy), "image_keys": list(policy.config.image_keys),
                    "down_dims": list(policy.config.down_dims),
                    "diffusion_step_embed_dim": policy.config.diffusion_step_embed_dim,
                    "obs_dim": policy.config.obs_dim, "action_dim": policy.config.action_dim,
                    "random_weights": network != CHECKPOINT,
                    "description": DP_NETWORKS[network].description if network in DP_NETWORKS else "the checkpoint's"},
        "env": str(cfg.env.name),
        "preset": cfg.get("preset_name"),
        "obs_source": obs_source,
        "n_obs": int(cfg.n_obs),
        "seed": int(cfg.seed),
        "repetitions": int(cfg.repetitions),
        "warmup": int(cfg.warmup),
        "batch_sizes": batch_sizes,
        "fast_path_modes": list(modes),
        "fast_path": None if fast is None else {**fast.options(), "stats": fast.stats.as_dict()},
        "fast_path_modes_stats": {mode: {**p.fast_path.options(), "stats": p.fast_path.stats.as_dict()}
                                  for mode, p in fast_policies.items()},
        "runtime_versions": runtime_versions(),
        "jobs": {phase: [job.describe() for job in jobs] for phase, jobs in phases.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    result["notes"] = notes
    out_dir.mkdir(parents=True, exist_ok=True)
    result["meta"]["duration_s"] = time.perf_counter() - started
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    result["plots"] = make_plots(result, out_dir) if cfg.plots else []

    meta = result["meta"]
    warm = "" if fast is None else f" (warm-up {fast.stats.as_dict()['warmup_s_total']:.1f} s, backends " \
        f"{', '.join(f'{k}: {v}' for k, v in fast.stats.backends.items())})"
    net = meta["network"]
    which = "" if network == CHECKPOINT else f" (sampler rows: network {network}, {net['num_parameters'] / 1e6:.1f}M, random weights)"
    print(f"\n{meta['env']} checkpoint {checkpoint}{which}, {meta['device_name']}, observations: {obs_source}, "
          f"fast path: {'/'.join(modes)}{warm}, {meta['repetitions']} timed calls each, "
          f"{meta['duration_s']:.0f} s in all")
    if result["headline"]:
        print("\nspeedup over the fastest sequential twin (p50 latency per call):")
        print(format_headline(result["headline"]))
    if result["backends"]:
        print("\nfast-path backends per shape (p50 ms of each candidate at warm-up; the winner over eager and "
              "over the runner-up):")
        print(format_backends(result["backends"]))
    vs_eager = format_vs_eager(result["samplers"] + result["windows"])
    if vs_eager:
        print("\neach fast mode over the same sampler on the plain path (p50):")
        print(vs_eager)
    if result["samplers"]:
        print("\nsamplers (speedup: vs the twin in the same mode; vs best: vs the twin's fastest mode; model: "
              "rounds x per-call ms from the denoiser curve):")
        print(format_table(result["samplers"]))
    encoded = [r for r in result["samplers"] if r.get("encode_ms_p50") is not None]
    if encoded:
        print("\nimage encoder, once per call (p50 ms of the call's p50): " + ", ".join(
            f"{r['label']} b{r['batch']}: {r['encode_ms_p50']:.1f} of {r['latency_ms']['p50']:.1f}" for r in encoded))
    if result["windows"]:
        print("\nwindow sweep (batch 1):")
        print(format_table(result["windows"]))
    if result["denoiser"]:
        print("\nbare denoiser, K stacked timesteps per call (gain: K evals vs K calls at the smallest K):")
        print(format_denoiser_table(result["denoiser"]))
    mode_notes = [f"fast path {mode}: {n}" for mode, fast in [*((m, p.fast_path) for m, p in fast_policies.items()),
                                                               *denoiser_fast_paths.items()] for n in fast.stats.notes]
    for note in notes + list(dict.fromkeys(mode_notes)):
        print(f"note: {note}")
    print(f"results: {out_dir}")
    return result



def runtime_versions() -> dict:
    """Versions of the optional fast-path runtimes (None: not installed)."""
    from parapolicy.policy.accel_runtimes import RUNTIMES, library_versions, missing

    return {name: None if missing(name) else library_versions(name) for name in RUNTIMES}
