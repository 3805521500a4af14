"""The bare-denoiser curve: one ``denoise`` call with K stacked timesteps, per network and fast-path mode,
and the rounds x per-call-cost model it gives every sampler row (``predicted_ms``)."""

from __future__ import annotations

import time
from typing import Any, Optional

from omegaconf import DictConfig

from parapolicy.bench.jobs import PHASES
from parapolicy.bench.networks import CHECKPOINT, NetworkSpec, build_network, network_names, num_parameters
from parapolicy.bench.timed_calls import stats
from parapolicy.devices import synchronize


def denoiser_networks(cfg: DictConfig, policy, benched: Optional[tuple[str, Any]] = None) -> list[tuple[str, Any]]:
    """(name, policy) pairs whose networks the denoiser sweep times: ``benched`` (the network the
    sampler rows time, default the checkpoint's), then each of ``denoiser.networks`` (names from
    ``parapolicy.bench.networks``, built on ``policy``, the checkpoint's), then with
    ``denoiser.full_size`` a U-Net of ``full_size_down_dims`` (random weights, the checkpoint's dims)."""
    networks = [benched or (CHECKPOINT, policy)]
    for name in network_names(cfg.denoiser.get("networks")):
        if name not in [n for n, _ in networks]:
            networks.append((name, build_network(name, policy, int(cfg.seed))))
    if cfg.denoiser.full_size:
        spec = NetworkSpec(down_dims=tuple(int(d) for d in cfg.denoiser.full_size_down_dims),
                           diffusion_step_embed_dim=int(cfg.denoiser.full_size_step_embed_dim))
        networks.append(("full_size", build_network("full_size", policy, int(cfg.seed), spec)))
    return networks


def time_denoiser(cfg: DictConfig, networks: list, obs_pool, device, fast_options: Optional[dict], notes: list,
                  bar=None, modes: tuple = ("off",), pools: Optional[dict] = None,
                  fast_paths: Optional[dict] = None) -> list[dict]:
    """Bare ``denoise`` calls: K stacked timesteps x batch observation histories, per network
    (``denoiser_networks``) and fast-path mode, round-robin over K and modes (one bucket per K on
    the fast path, warmed up before timing). ``pools``: ``{network name: (obs_pool, images)}`` for
    networks whose observations differ from ``obs_pool`` (other dims, cameras). ``fast_paths``: filled
    with ``{"<mode> (denoiser <network>)": FastPath}``, for the per-shape backend comparison."""
    import torch

    from parapolicy.policy.accel import FastPath
    from parapolicy.bench.jobs import mode_backend

    dcfg = cfg.denoiser
    ks = sorted({int(k) for k in dcfg.k})
    if not ks or ks[0] < 1:
        raise ValueError(f"denoiser.k must hold positive integers, got {list(dcfg.k)}")
    rows_out = []
    for net_name, net in networks:
        pc = net.config
        n_params = num_parameters(net)
        # one FastPath per fast mode: "on" with the bench's options, a backend mode with that backend forced
        fasts = {mode: FastPath(**{**(fast_options or {}), "buckets": ks,
                                   **({} if mode == "on" else {"backend": mode_backend(mode)})})
                 for mode in modes if mode != "off"}
        if fast_paths is not None:
            fast_paths.update({f"{mode} (denoiser {net_name})": fast for mode, fast in fasts.items()})
        for batch in [int(b) for b in dcfg.batch_sizes]:
            ok = [k for k in ks if k * batch <= int(dcfg.max_rows)]
            if len(ok) < len(ks):
                notes.append(f"denoiser {net_name}: K {[k for k in ks if k not in ok]} at batch {batch} "
                             f"skipped (more than max_rows={dcfg.max_rows} rows)")
            if not ok:
                continue
            obs, images = (pools or {}).get(net_name, (obs_pool, None))
            index = [i % obs.shape[0] for i in range(batch)]
            frames = None if images is None else {k: v[index].to(device) for k, v in images.items()}
            cond = net.global_condition(obs[index].to(device), frames)  # the encoder, for image policies
            plain = net.make_denoise_fn(cond)
            denoisers = {}
            for mode in modes:
                if mode != "off":
                    fasts[mode].prepare(net.model, cond, (pc.horizon, pc.sample_dim), None)
                    denoisers[mode] = fasts[mode].wrap(plain, cond, net.model, None)
                else:
                    denoisers[mode] = plain
            gen = torch.Generator().manual_seed(int(cfg.seed))
            steps = net.noise_scheduler.config.num_train_timesteps
            inputs = {k: (torch.randn((k, batch, pc.horizon, pc.sample_dim), generator=gen).to(device),
                          torch.randint(steps, (k,), generator=gen).to(device)) for k in ok}
            cases = [(mode, k) for mode in modes for k in ok]
            times: dict[tuple, list] = {case: [] for case in cases}
            for mode, k in cases:
                for _ in range(int(dcfg.warmup)):
                    denoisers[mode](*inputs[k])
            synchronize(device)
            for r in range(int(dcfg.repetitions)):
                shift = r % len(cases)
                for mode, k in cases[shift:] + cases[:shift]:
                    synchronize(device)
                    start = time.perf_counter()
                    denoisers[mode](*inputs[k])
                    synchronize(device)
                    times[mode, k].append((time.perf_counter() - start) * 1e3)
                    if bar is not None:
                        bar.update(1)
            for mode in modes:
                base = stats(times[mode, ok[0]])["p50"] / ok[0]  # per-eval time at the smallest K
                for k in ok:
                    latency = stats(times[mode, k])
                    backend = None
                    if mode != "off" and device.type == "cpu":
                        backend = fasts[mode].stats.backends.get(f"K{k}xB{batch}")
                    rows_out.append({
                        "network": net_name, "down_dims": list(pc.down_dims), "num_parameters": n_params,
                        "fast_path": mode, "backend": backend,
                        "batch": batch, "k": k, "rows": k * batch, "latency_ms": latency,
                        "per_eval_ms": latency["p50"] / k,
                        # how many times faster than k separate calls at the smallest K: k evals for the price of 1
                        "throughput_gain": base * k / latency["p50"],
                        "latencies_ms": [round(v, 4) for v in times[mode, k]]})
    return rows_out


def _curve(den_rows: list[dict], mode: str, batch: int, network: str = CHECKPOINT) -> dict[int, float]:
    return {r["k"]: r["latency_ms"]["p50"] for r in den_rows
            if r["network"] == network and r["fast_path"] == mode and r["batch"] == batch}


def interpolate(curve: dict[int, float], k: float) -> Optional[float]:
    """Per-call ms at (possibly fractional) K, linear between the measured K (and beyond the ends)."""
    if not curve:
        return None
    ks = sorted(curve)
    if len(ks) == 1:
        return curve[ks[0]]
    if k in curve:
        return curve[k]
    lo = max([x for x in ks if x <= k], default=ks[0])
    hi = min([x for x in ks if x > lo], default=None)
    if hi is None or k < lo:
        lo, hi = (ks[-2], ks[-1]) if k > ks[-1] else (ks[0], ks[1])
    return curve[lo] + (curve[hi] - curve[lo]) * (k - lo) / (hi - lo)


def predict_latency(row: dict, den_rows: list[dict], network: str = CHECKPOINT) -> Optional[float]:
    """The rounds x per-call-cost model of one sampler row, from the bare-denoiser curve of the same
    mode and batch: on the fast path, sum over buckets of (calls per predict_action) x (the bucket's
    per-call ms: a graph backend runs the whole bucket); on the plain path, rounds x the per-call ms at
    the mean K (model evaluations per sample / rounds). What it leaves out (the sampler's own tensor
    work, normalisation) is ``measured - predicted``."""
    curve = _curve(den_rows, row["fast_path"], row["batch"], network)
    if not curve:
        return None
    if row["fast_path"] != "off" and row.get("calls_per_bucket"):
        parts = [n * interpolate(curve, int(b)) for b, n in row["calls_per_bucket"].items()]
        return float(sum(parts))
    rounds = row["rounds_mean"]
    if not rounds:
        return None
    return float(rounds * interpolate(curve, row["model_evals_mean"] / rounds))


def add_predictions(result: dict, network: str = CHECKPOINT) -> None:
    """``predicted_ms`` and ``unexplained_ms`` (measured p50 - predicted) per row, and the model's
    ``predicted_speedup_vs_fastest_twin``: a ratio of two predictions from one curve, so a load level
    that differs between the sampler and denoiser phases cancels out of it. ``network``: the denoiser
    rows of the network the sampler rows ran."""
    for phase in PHASES:
        for row in result[phase]:
            predicted = predict_latency(row, result["denoiser"], network)
            row["predicted_ms"] = predicted
            row["unexplained_ms"] = None if predicted is None else row["latency_ms"]["p50"] - predicted
        by_label = {(row["label"], row["batch"]): row for row in result[phase]}
        for row in result[phase]:
            twin = by_label.get((row.get("fastest_twin"), row["batch"]))
            ok = twin is not None and row["predicted_ms"] and twin["predicted_ms"] and twin["batch"] == row["batch"]
            row["predicted_speedup_vs_fastest_twin"] = twin["predicted_ms"] / row["predicted_ms"] if ok else None

