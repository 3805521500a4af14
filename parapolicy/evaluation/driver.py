"""The closed-loop eval behind ``python -m parapolicy.eval``: plan the runs, run the episodes, summarise.

``run_eval(cfg, out_dir)`` takes the composed ``conf/eval.yaml`` and writes into ``out_dir``:
``episodes.jsonl`` (``episode_log``), ``summary.json``, ``latency.png`` (and ``videos/`` with
``video=true``). Where the episodes run is the executor's business (``executors``: this process or Ray
workers; ``remote``: a policy server); episode e has seed ``seed + e`` wherever it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from parapolicy.configs import sampler_kwargs
from parapolicy.policy.checkpoint import resolve_checkpoint
from parapolicy.evaluation.episode_log import EpisodeLog, summarize
from parapolicy.evaluation.runs import RunSpec, build_runs, check_episodes, plan_runs


def validate(cfg: DictConfig) -> tuple[Path, list[RunSpec]]:
    """Fail on bad values before any simulator starts; returns the checkpoint folder and the runs."""
    from parapolicy.evaluation.recording import validate_video

    from parapolicy.evaluation.realtime_options import timing_options

    check_episodes(cfg)
    timing_options(cfg)
    checkpoint = resolve_checkpoint(str(cfg.checkpoint))
    specs = plan_runs(cfg, checkpoint)
    validate_video(cfg)
    return checkpoint, specs


def _progress(cfg: DictConfig, total: int, initial: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="ep", disable=not cfg.progress_bar)


def _episode_range(cfg: DictConfig) -> range:
    # episode e has seed `seed + e` whichever process runs it, so a run split over processes by
    # first_episode gives the same episodes as one run
    return range(int(cfg.get("first_episode", 0)), int(cfg.n_episodes))


def run_eval(cfg: DictConfig, out_dir: Path) -> dict:
    """The whole evaluation; returns the summary dict (also written to ``out_dir/summary.json``)."""
    import torch

    from parapolicy.policy.accel import eval_fast_path, warm_up
    from parapolicy.devices import device_name, pick_device
    from parapolicy.evaluation.executors import make_executor
    from parapolicy.evaluation.metrics import format_table, plot_latency
    from parapolicy.policy import load_policy

    if cfg.get("server"):  # closed loop through a running policy server (python -m parapolicy.serve)
        return run_server_eval(cfg, out_dir)
    checkpoint, specs = validate(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    device = pick_device(str(cfg.device))
    name, steps, options = sampler_kwargs(cfg.sampler)
    policy = load_policy(str(checkpoint), sampler=name, device=str(device), num_inference_steps=steps,
                         fast_path=eval_fast_path(cfg.get("fast_path", "auto"), device),
                         **options)  # baselines share it (one per network)
    check_policy_fits_task(policy.config, cfg.env.name, checkpoint)

    runs = build_runs(policy, specs)  # labels and schedule lengths: plan_runs
    fast_path_warmup = {lbl: warm_up(p, int(cfg.n_envs)) for lbl, p in runs.items()}  # before any timed call
    label = specs[0].label
    baseline_label = list(runs)[1] if len(runs) > 1 else None  # the speedup is against the first baseline
    shadow = runs[baseline_label] if cfg.shadow and baseline_label else None

    wanted = _episode_range(cfg)
    log = EpisodeLog(out_dir / "episodes.jsonl", bool(cfg.resume), specs)
    done = log.done()
    executor = make_executor(cfg, checkpoint, specs)  # local: runs interleaved batch by batch; ray: workers
    bar = _progress(cfg, len(wanted) * len(runs), len(done & {(r, e) for r in runs for e in wanted}),
                    f"eval {cfg.env.name}")

    def record(run: str, episode: int, rec: dict) -> None:  # every finished episode, as it arrives
        log.append(run, episode, rec)
        bar.update(1)
        bar.set_postfix({lbl: f"{sum(ep['success'] for ep in log.episodes if ep['run'] == lbl)}"
                              f"/{sum(ep['run'] == lbl for ep in log.episodes)}" for lbl in runs})

    try:
        executor.run(runs, label, shadow, wanted, done, int(cfg.seed), record)
    finally:
        bar.close()
        executor.close()
        log.close()
    if cfg.get("video"):  # a replay with rendering, after the timed episodes
        from parapolicy.evaluation.recording import record_videos

        record_videos(cfg, out_dir, runs, specs, log.episodes, wanted)

    episodes = [ep for ep in log.episodes if ep["episode"] in wanted]  # a resumed log may hold others
    summary = {"env": cfg.env.name, "checkpoint": str(checkpoint), "device": device_name(device),
               "sampler": OmegaConf.to_container(cfg.sampler, resolve=True), "sampler_label": label,
               "baseline": baseline_label, "baselines": list(runs)[1:],
               "seed": int(cfg.seed), "first_episode": wanted.start, "n_envs": int(cfg.n_envs),
               "fast_path": str(cfg.get("fast_path", "auto")), "fast_path_warmup": fast_path_warmup,
               **executor.describe(),
               **summarize(episodes, list(runs), baseline_label, specs)}
    from parapolicy.evaluation.realtime_options import describe, timing_options

    realtime = timing_options(cfg)
    summary["timing"] = realtime["timing"]
    for run_label, run_summary in summary["runs"].items():
        run_summary.update(describe(realtime, run_label, runs[run_label].sampler_name,
                                    getattr(runs[run_label], "config", None)))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    latencies = {lbl: [c["latency_ms"] for ep in episodes if ep["run"] == lbl for c in ep["calls"]] for lbl in runs}
    plot_latency(latencies, out_dir / "latency.png")
    timing_text = "" if realtime["timing"] == "sync" else (
        f", timing {realtime['timing']}, latency {realtime['latency']}, transition {realtime['transition']}")
    print(f"\n{cfg.env.name}: {len(wanted)} episodes per sampler, seeds {int(cfg.seed) + wanted.start}.."
          f"{int(cfg.seed) + wanted.stop - 1}, device {summary['device']}, batch {int(cfg.n_envs)}{timing_text}")
    print(format_table(summary["runs"], summary["speedup_p50"]))
    print(f"results: {out_dir}")
    _log_wandb(cfg, summary, latencies, out_dir)
    return summary


def run_server_eval(cfg: DictConfig, out_dir: Path) -> dict:
    """The eval against the server at ``cfg.server`` (token: ``$PARAPOLICY_TOKEN``). The server's sampler
    is the one measured; ``baseline`` and ``sampler=`` are not run here."""
    import numpy as np

    from parapolicy.evaluation.metrics import format_table, latency_stats, summarize_run
    from parapolicy.evaluation.remote import ServerExecutor

    from parapolicy.evaluation.realtime_options import timing_options

    check_episodes(cfg)
    if timing_options(cfg)["timing"] != "sync":
        raise ValueError("timing=async/hold is simulated in-process (executor=local or ray); through a server, "
                         "run a real loop with parapolicy.realtime.AsyncPolicy(RemotePolicy(url))")
    url, n_envs = str(cfg.server), int(cfg.n_envs)
    executor = ServerExecutor(url, cfg.env.name, n_envs, cfg.max_episode_steps)
    try:
        meta, label = executor.metadata, executor.label
        obs_dim = _task_obs_dim(cfg.env.name)
        if int(meta["obs_dim"]) != obs_dim:
            raise ValueError(f"server policy expects obs_dim={meta['obs_dim']}, env {cfg.env.name!r} gives {obs_dim}")
        space, control = meta.get("action_space", "delta"), _task_control(cfg.env.name)
        if (space == "delta") != (control == "delta"):
            raise ValueError(f"server policy plans action_space={space!r}, env {cfg.env.name!r} takes {control} commands")
        sampler = meta["sampler"]
        print(f"eval through {url}: server plans with {sampler['name']} ({sampler['num_inference_steps']} steps, "
              f"options {sampler['options']}, warm_start {sampler.get('warm_start')}), checkpoint "
              f"{meta['checkpoint'].get('path')}; this process's sampler / baseline settings are not used")
        wanted = _episode_range(cfg)
        log = EpisodeLog(out_dir / "episodes.jsonl", bool(cfg.resume))
        done = log.done()
        bar = _progress(cfg, len(wanted), sum((label, e) in done for e in wanted), f"eval {cfg.env.name} via server")

        def record(run: str, episode: int, rec: dict) -> None:
            log.append(run, episode, rec)
            bar.update(1)

        try:
            executor.run({label: None}, label, None, wanted, done, int(cfg.seed), record)
        finally:
            bar.close()
            log.close()
    finally:
        executor.close()

    mine = log.of_run(label, wanted)
    run = summarize_run(mine)
    run["steps"] = sampler.get("num_inference_steps")  # the server's schedule length (table column)
    calls = [c for ep in mine for c in ep["calls"]]
    run["server_latency_ms"] = latency_stats([c["server_ms"] for c in calls])
    run["batch_mean"] = float(np.mean([c["batch"] for c in calls])) if calls else float("nan")
    summary = {"env": cfg.env.name, "server": url, "checkpoint": meta["checkpoint"], "server_device": meta.get("device"),
               "server_torch_threads": meta.get("torch_threads"), "sampler": sampler, "sampler_label": label,
               "seed": int(cfg.seed), "first_episode": wanted.start, "n_envs": n_envs, **executor.describe(),
               "eval_config": OmegaConf.to_container(cfg, resolve=True), "runs": {label: run}, "speedup_p50": None}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    srv, lat = run["server_latency_ms"], run["latency_ms"]
    print(f"\n{cfg.env.name}: {len(wanted)} episodes through {url}, seeds {int(cfg.seed) + wanted.start}.."
          f"{int(cfg.seed) + wanted.stop - 1}, server device {meta.get('device')}, {n_envs} robot(s)")
    print(format_table(summary["runs"]))
    print(f"latency per call: end-to-end p50 {lat['p50']:.1f} / p95 {lat['p95']:.1f} ms; "
          f"server-side p50 {srv['p50']:.1f} / p95 {srv['p95']:.1f} ms (network + client {lat['p50'] - srv['p50']:.1f} ms "
          f"at p50); mean batch {run['batch_mean']:.2f}")
    print(f"results: {out_dir}")
    return summary


def check_policy_fits_task(config, task_name: str, checkpoint) -> None:
    """ValueError unless the task gives what the policy reads: its low-dim vector (``obs_dim``; the
    proprioception of an image task) and a ``<camera>_image`` for each of its ``image_keys``, and takes
    the actions it plans (OSC_POSE deltas, or absolute poses: a ``*_abs`` task)."""
    from parapolicy.envs.robosuite_env import get_task

    task = get_task(task_name)
    if config.obs_dim != task.obs_dim:
        raise ValueError(f"checkpoint {checkpoint} expects obs_dim={config.obs_dim}, env {task_name!r} gives "
                         f"{task.obs_dim}: wrong checkpoint for this env?")
    missing = sorted(set(getattr(config, "image_keys", None) or ()) - {f"{cam}_image" for cam in task.cameras})
    if missing:
        raise ValueError(f"checkpoint {checkpoint} reads the images {missing}, env {task_name!r} has the cameras "
                         f"{list(task.cameras) or 'none'}: an image policy needs its image task (e.g. env=lift_image)")
    space = getattr(config, "action_space", "delta")
    if (space == "delta") != (task.control == "delta"):  # a pose sent as a delta (or back) is a wild command
        fix = f"{task_name}_abs" if space != "delta" else task_name.removesuffix("_abs")
        raise ValueError(f"checkpoint {checkpoint} plans {'absolute poses' if space != 'delta' else 'OSC_POSE deltas'} "
                         f"(action_space={space!r}), env {task_name!r} takes {task.control} commands: use env={fix}")


def _task_control(task: str) -> str:
    from parapolicy.envs.robosuite_env import get_task

    return get_task(task).control


def _task_obs_dim(task: str) -> int:
    from parapolicy.envs.robosuite_env import get_task

    return get_task(task).obs_dim


def _log_wandb(cfg: DictConfig, summary: dict, latencies: dict, out_dir: Path) -> None:
    mode = str(cfg.wandb.mode)
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(mode=mode, project=cfg.wandb.project, name=cfg.wandb.name, dir=str(out_dir),
                     config=OmegaConf.to_container(cfg, resolve=True))
    for label, run_summary in summary["runs"].items():
        run.summary[label] = run_summary
        run.log({f"{label}/latency_ms": wandb.Histogram(latencies[label])})
    run.summary["speedup_p50"] = summary["speedup_p50"]
    run.log({"latency": wandb.Image(str(out_dir / "latency.png"))})
    run.finish()
