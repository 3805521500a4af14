"""Closed-loop eval through a running policy server: ``python -m parapolicy.eval server=ws://127.0.0.1:8000``.

Each of ``n_envs`` threads owns one simulator and one ``RemotePolicy`` connection (one robot on the
server; several robots let the server batch). Episode e uses seed ``seed + e`` for the environment and,
sent with the reset, for the robot's generator on the server, which draws x_T and the step noise as
``PolicyRunner`` does: with the server's sampler and the same torch thread count, an episode ends as
the in-process eval's episode with the same seed.

Per call it records the end-to-end latency (``latency_ms``: network + queueing + sampling, measured
here) beside the server-side figure (``server_ms``) and the model call alone (``plan_ms``).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

REPLY_TIMEOUT_S = 600.0


def run_episode(env, policy, seed: int) -> dict:
    """One episode of ``env`` driven by ``policy`` (a ``RemotePolicy``) with ``seed``; the record has the
    fields of ``PolicyRunner.run_batch``'s plus per-call ``server_ms`` / ``plan_ms`` / ``queue_ms``."""
    record = {"seed": int(seed), "success": False, "length": 0, "reward": 0.0, "error": None, "calls": []}
    started = time.perf_counter()
    obs, _ = env.reset(seed=int(seed))
    policy.reset(seed=int(seed))
    while True:
        try:
            action = policy.act(obs)
        except Exception as err:  # a failing call fails this episode, not the run (as in-process)
            record["error"] = f"policy: {type(err).__name__}: {err}"
            break
        info = policy.last_info
        if info["replanned"]:
            record["calls"].append({
                "latency_ms": info["latency_s"] * 1e3, "server_ms": info["server_ms"], "batch": info["batch"],
                "rounds": info["rounds"], "model_evals": info["model_evals"], "converged": info["converged"],
                "warm": info["warm"], "deadline_missed": info["deadline_missed"]})
        obs, reward, terminated, truncated, step_info = env.step(action)
        record["length"] += 1
        record["reward"] += float(reward)
        record["success"] = record["success"] or bool(step_info.get("is_success", False))
        error = step_info.get("error")
        if terminated or truncated or error:
            record["error"] = error or None
            break
    record["wall_s"] = time.perf_counter() - started
    return record


def _validate(cfg: DictConfig) -> None:
    from parapolicy.envs.robosuite_env import get_task

    get_task(cfg.env.name)
    n_episodes, first = int(cfg.n_episodes), cfg.get("first_episode", 0)
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first < n_episodes:
        raise ValueError(f"first_episode must be an integer in [0, n_episodes) = [0, {n_episodes}), got {first!r}")
    if int(cfg.n_envs) < 1:
        raise ValueError(f"n_envs must be >= 1, got {cfg.n_envs}")
    if cfg.max_episode_steps is not None and int(cfg.max_episode_steps) < 1:
        raise ValueError(f"max_episode_steps must be >= 1, got {cfg.max_episode_steps}")


def run_remote_eval(cfg: DictConfig, out_dir: Path) -> dict:
    """The eval of ``parapolicy.eval`` against the server at ``cfg.server`` (token: ``$PARAPOLICY_TOKEN``).
    The server's sampler is the one measured; ``baseline`` and ``sampler=`` are not run here."""
    from tqdm import tqdm

    from parapolicy.client import RemotePolicy
    from parapolicy.envs import make_env
    from parapolicy.envs.robosuite_env import get_task
    from parapolicy.eval import read_episodes
    from parapolicy.metrics import format_table, latency_stats, summarize_run

    _validate(cfg)
    url, n_envs = str(cfg.server), int(cfg.n_envs)
    # a long reply timeout: an eval waits for a busy server (a dead one still fails the episode)
    policies = [RemotePolicy(url, timeout_s=REPLY_TIMEOUT_S) for _ in range(n_envs)]
    meta = policies[0].metadata
    task = get_task(cfg.env.name)
    if int(meta["obs_dim"]) != task.obs_dim:
        raise ValueError(f"server policy expects obs_dim={meta['obs_dim']}, env {cfg.env.name!r} gives {task.obs_dim}")
    sampler = meta["sampler"]
    label = sampler["name"] + ("+warm" if sampler.get("warm_start") else "") + "@server"
    print(f"eval through {url}: server plans with {sampler['name']} ({sampler['num_inference_steps']} steps, "
          f"options {sampler['options']}, warm_start {sampler.get('warm_start')}), checkpoint "
          f"{meta['checkpoint'].get('path')}; this process's sampler / baseline settings are not used")

    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "episodes.jsonl"
    episodes = read_episodes(log_path) if cfg.resume else []
    log_path.write_text("".join(json.dumps(ep) + "\n" for ep in episodes))
    done = {ep["episode"] for ep in episodes if ep["run"] == label}
    first_episode, n_episodes = int(cfg.get("first_episode", 0)), int(cfg.n_episodes)
    wanted = range(first_episode, n_episodes)
    todo = [e for e in wanted if e not in done]
    bar = tqdm(total=len(wanted), initial=len(wanted) - len(todo), desc=f"eval {cfg.env.name} via server",
               unit="ep", disable=not cfg.progress_bar)
    lock = threading.Lock()
    failures: list[BaseException] = []

    def worker(k: int) -> None:
        env = make_env(cfg.env.name, max_episode_steps=cfg.max_episode_steps)
        try:
            for e in todo[k::n_envs]:
                record = run_episode(env, policies[k], int(cfg.seed) + e)
                line = {"run": label, "episode": e, **record}
                with lock:
                    with log_path.open("a") as log:
                        log.write(json.dumps(line) + "\n")
                    episodes.append(line)
                    bar.update(1)
        except BaseException as err:  # surfaced after join
            failures.append(err)
        finally:
            env.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n_envs)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        bar.close()
        for policy in policies:
            policy.close()
    if failures:
        raise failures[0]

    mine = sorted((ep for ep in episodes if ep["run"] == label and ep["episode"] in wanted), key=lambda ep: ep["episode"])
    run = summarize_run(mine)
    run["steps"] = sampler.get("num_inference_steps")  # the server's schedule length (table column)
    calls = [c for ep in mine for c in ep["calls"]]
    run["server_latency_ms"] = latency_stats([c["server_ms"] for c in calls])
    run["batch_mean"] = float(np.mean([c["batch"] for c in calls])) if calls else float("nan")
    summary = {"env": cfg.env.name, "server": url, "checkpoint": meta["checkpoint"], "server_device": meta.get("device"),
               "server_torch_threads": meta.get("torch_threads"), "sampler": sampler, "sampler_label": label,
               "seed": int(cfg.seed), "first_episode": first_episode, "n_envs": n_envs,
               "eval_config": OmegaConf.to_container(cfg, resolve=True), "runs": {label: run}, "speedup_p50": None}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    srv = run["server_latency_ms"]
    print(f"\n{cfg.env.name}: {len(wanted)} episodes through {url}, seeds {int(cfg.seed) + first_episode}.."
          f"{int(cfg.seed) + n_episodes - 1}, server device {meta.get('device')}, {n_envs} robot(s)")
    print(format_table(summary["runs"]))
    print(f"latency per call: end-to-end p50 {run['latency_ms']['p50']:.1f} / p95 {run['latency_ms']['p95']:.1f} ms; "
          f"server-side p50 {srv['p50']:.1f} / p95 {srv['p95']:.1f} ms (network + client {run['latency_ms']['p50'] - srv['p50']:.1f} ms "
          f"at p50); mean batch {run['batch_mean']:.2f}")
    print(f"results: {out_dir}")
    return summary
