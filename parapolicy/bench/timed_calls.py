"""Timed ``predict_action`` calls, round-robin over jobs, and the per-row summaries and headline.

Every timer brackets the call with ``torch.cuda.synchronize`` on CUDA (``parapolicy.devices.synchronize``), so a row is the
latency a control loop pays, not the time to enqueue kernels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from omegaconf import DictConfig

from parapolicy.bench.jobs import Job
from parapolicy.devices import synchronize


def stats(values_ms) -> dict:
    values = np.asarray(values_ms, dtype=np.float64)
    if values.size == 0:
        return {"p50": float("nan"), "p95": float("nan"), "mean": float("nan"), "min": float("nan"), "n": 0}
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": float(p50), "p95": float(p95), "mean": float(values.mean()), "min": float(values.min()),
            "n": int(values.size)}


@dataclass
class Record:
    latency_ms: list = field(default_factory=list)
    rounds: list = field(default_factory=list)
    model_evals: list = field(default_factory=list)
    converged: list = field(default_factory=list)
    deviation: list = field(default_factory=list)
    deviation_eager: list = field(default_factory=list)
    encode_ms: list = field(default_factory=list)  # image policies: the observation encoder's share


def _fast_path_of(job: Job):
    from parapolicy.policy.accel import FastPath

    fast = job.policy.fast_path
    return fast if isinstance(fast, FastPath) else None


def warm_up_jobs(jobs: list[Job], batch: int) -> None:
    """Fast-path warm-up (CPU: backend choice per shape) for every fast job, before any timed call;
    each job records the seconds it paid (a shape another job warmed costs nothing)."""
    from parapolicy.policy.accel import warm_up

    for job in jobs:
        if _fast_path_of(job) is not None:
            job.warmup_s += warm_up(job.policy, batch).get("warmup_s", 0.0)


def time_phase(jobs: list[Job], obs_pool, batch: int, cfg: DictConfig, device, bar=None,
               images: Optional[dict] = None) -> dict[str, Record]:
    """Warm-up, then ``repetitions`` rounds; each round calls every job once, starting one job later
    than the previous round. Call r gets observations r*batch.. (and those rows of ``images``, for an
    image policy: {camera: uint8 ``[n_obs, n_obs_steps, 3, H, W]``}) and noise seed + r for every job."""
    import torch

    records = {job.label: Record() for job in jobs}
    n_obs = obs_pool.shape[0]
    for job in jobs:
        job.bucket_calls = {}

    def call(job: Job, r: int):
        index = [(r * batch + i) % n_obs for i in range(batch)]
        obs = obs_pool[index]
        frames = None if images is None else {key: value[index] for key, value in images.items()}
        gen = torch.Generator(device=device).manual_seed(int(cfg.seed) + r)
        synchronize(device)
        start = time.perf_counter()
        out = job.policy.predict_action(obs, generator=gen, **({} if frames is None else {"images": frames}))
        synchronize(device)
        return (time.perf_counter() - start) * 1e3, out

    warm_up_jobs(jobs, batch)
    for job in jobs:
        for w in range(int(cfg.warmup)):
            call(job, w)
    for r in range(int(cfg.repetitions)):
        actions = {}
        shift = r % len(jobs)
        for job in jobs[shift:] + jobs[:shift]:
            fast = _fast_path_of(job)
            before = dict(fast.stats.per_bucket) if fast is not None else {}
            ms, out = call(job, r)
            if fast is not None:  # the shared fast path's calls per bucket during this call
                for bucket, n in fast.stats.per_bucket.items():
                    if n - before.get(bucket, 0):
                        job.bucket_calls[bucket] = job.bucket_calls.get(bucket, 0) + n - before.get(bucket, 0)
            rec = records[job.label]
            rec.latency_ms.append(ms)
            rec.rounds.append(_as_float(out["rounds"]))
            rec.model_evals.append(_as_float(out["model_evals"]))
            if images is not None and out.get("encode_ms") is not None:
                rec.encode_ms.append(float(out["encode_ms"]))
            converged = out["converged"]
            rec.converged.append(bool(converged.all()) if torch.is_tensor(converged) else bool(converged))
            actions[job.label] = out["action_pred"].float().cpu()
            if bar is not None:
                bar.update(1)
        for job in jobs:
            if job.twin is not None:
                records[job.label].deviation.append(float((actions[job.label] - actions[job.twin]).abs().max()))
            if job.fast != "off" and job.base in actions:  # the same sampler on the plain path, same call
                records[job.label].deviation_eager.append(float((actions[job.label] - actions[job.base]).abs().max()))
    return records


def _as_float(value) -> float:
    import torch

    if torch.is_tensor(value):
        value = value.float().max()
    return float(value) if value is not None else float("nan")


def summarize_phase(phase: str, jobs: list[Job], batch: int, records: dict[str, Record]) -> list[dict]:
    """One row per job; ``speedup`` against the same-mode twin, ``speedup_vs_fastest_twin`` against the
    fastest mode of the twin (the honest figure)."""
    p50 = {job.label: stats(records[job.label].latency_ms)["p50"] for job in jobs}
    variants: dict[str, list[str]] = {}  # base label -> labels of its modes
    for job in jobs:
        variants.setdefault(job.base, []).append(job.label)
    rows = []
    for job in jobs:
        rec = records[job.label]
        latency = stats(rec.latency_ms)
        n = max(len(rec.latency_ms), 1)
        row = {"phase": phase, **job.describe(), "batch": batch, "window": job.window,
               "latency_ms": latency, "per_sample_ms_p50": latency["p50"] / batch,
               "rounds_mean": float(np.mean(rec.rounds)), "model_evals_mean": float(np.mean(rec.model_evals)),
               "converged_fraction": float(np.mean(rec.converged)), "speedup": None, "twin_p50_ms": None,
               "fastest_twin": None, "fastest_twin_p50_ms": None, "speedup_vs_fastest_twin": None,
               "deviation_vs_twin": None, "deviation_vs_eager": None,
               "fast_path_warmup_s": job.warmup_s if job.fast != "off" else None,
               "speedup_vs_eager": None,  # the same sampler on the plain path over this row (fast modes)
               "calls_per_bucket": {str(k): v / n for k, v in sorted(job.bucket_calls.items())} or None,
               "encode_ms_p50": float(np.median(rec.encode_ms)) if rec.encode_ms else None,
               "latencies_ms": [round(v, 4) for v in rec.latency_ms]}
        if job.twin is not None:
            row["twin_p50_ms"] = p50[job.twin]
            row["speedup"] = p50[job.twin] / latency["p50"]
            row["deviation_vs_twin"] = {"max": max(rec.deviation), "p50": float(np.median(rec.deviation))}
            fastest = min(variants.get(job.twin_base, [job.twin]), key=lambda lbl: p50[lbl])
            row["fastest_twin"], row["fastest_twin_p50_ms"] = fastest, p50[fastest]
            row["speedup_vs_fastest_twin"] = p50[fastest] / latency["p50"]
        if job.fast != "off" and job.base in p50:
            row["speedup_vs_eager"] = p50[job.base] / latency["p50"]
        if rec.deviation_eager:
            row["deviation_vs_eager"] = {"max": max(rec.deviation_eager), "p50": float(np.median(rec.deviation_eager))}
        rows.append(row)
    return rows


def headline(rows: list[dict]) -> list[dict]:
    """Per parallel sampler and batch: its fastest mode over its twin's fastest mode (the honest
    speedup), next to eager over eager."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["phase"], row["base_label"], row["batch"]), []).append(row)
    for (phase, base, batch), mine in groups.items():
        if mine[0]["twin"] is None:
            continue
        best = min(mine, key=lambda r: r["latency_ms"]["p50"])
        eager = next((r for r in mine if r["fast_path"] == "off"), None)
        out.append({"phase": phase, "sampler": base, "steps": best["steps"], "batch": batch,
                    "window": best["window"], "best": best["label"], "best_p50_ms": best["latency_ms"]["p50"],
                    "fastest_twin": best["fastest_twin"], "fastest_twin_p50_ms": best["fastest_twin_p50_ms"],
                    "speedup": best["speedup_vs_fastest_twin"],
                    "predicted_speedup": best.get("predicted_speedup_vs_fastest_twin"),
                    "eager_speedup": eager["speedup"] if eager else None})
    return out

