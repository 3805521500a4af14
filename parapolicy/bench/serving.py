"""Load test of the policy server: N concurrent simulated robots on loopback, batching on vs off.
Its command line is ``python -m parapolicy.serve_bench`` (``parapolicy/serve_bench.py``):

    python -m parapolicy.serve_bench                                          # ddpm, paraddpm x 1/2/4/8 robots x on/off
    python -m parapolicy.serve_bench 'samplers=[paraddpm]' 'robots=[1,8]' requests_per_robot=30

For every (sampler, batching) it starts a server on a free loopback port (``server_mode=thread``: a
``PolicyServer`` on its own event loop and model thread in this process, the policy loaded once per
sampler; ``subprocess``: ``python -m parapolicy.serve``), then for each robot count runs that many client threads (one connection each). Robot r
resets with seed ``seed + r`` and sends ``requests_per_robot`` requests back to back (real observation
histories from the dataset, else env resets, else random), each waiting for its reply. Reported per row:
throughput (replies/s), end-to-end latency p50/p95/p99, server-side p50, mean batch size (requests per
model call), and the routing check: every reply must carry its own request's id (``lost`` counts
timeouts and errors, ``misrouted`` wrong ids), and a robot's first chunk is replayed alone on a fresh
connection and compared for the first and the last robot (``solo_dev``: max |action difference|; 0 up to float rounding for sequential
samplers, within the tolerance for parallel ones). Writes ``serve_bench.json`` to Hydra's run directory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

LISTEN_RE = re.compile(r"listening on (ws://\S+)")


def start_server(cfg: DictConfig, sampler: str, batching: bool, run_dir: Path) -> tuple[subprocess.Popen, str]:
    """A ``parapolicy.serve`` subprocess; returns it and its URL once it listens."""
    args = [sys.executable, "-u", "-m", "parapolicy.serve", f"checkpoint={cfg.checkpoint}", f"sampler={sampler}",
            "port=0", "host=127.0.0.1", f"device={cfg.device}", f"max_batch={int(cfg.max_batch) if batching else 1}",
            f"max_wait_ms={float(cfg.max_wait_ms) if batching else 0.0}", f"fast_path={cfg.get('fast_path', 'auto')}",
            f"hydra.run.dir={run_dir}"]
    if cfg.torch_threads:
        args.append(f"torch_threads={int(cfg.torch_threads)}")
    if cfg.num_inference_steps:
        args.append(f"sampler.num_inference_steps={int(cfg.num_inference_steps)}")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # keeps draining so the server never blocks on a full pipe
            lines.append(line)
            match = LISTEN_RE.search(line)
            if match and not found:
                found.append(match.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + float(cfg.startup_timeout_s)
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server ({sampler}) did not start:\n{''.join(lines[-30:])}")
        time.sleep(0.05)
    proc.log_lines = lines  # type: ignore[attr-defined]
    return proc, found[0]


def stop_server(proc: subprocess.Popen) -> str:
    proc.terminate()  # SIGTERM: graceful, prints the counters
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    time.sleep(0.1)
    counters = [line for line in proc.log_lines if "served " in line]  # type: ignore[attr-defined]
    return counters[-1].strip() if counters else ""


def run_robots(url: str, observations: np.ndarray, n_robots: int, n_requests: int, seed: int,
               timeout_s: float, tag: str) -> dict:
    """``n_robots`` concurrent clients, ``n_requests`` each; returns latencies, batches and the checks."""
    from parapolicy.serving.client import RemotePolicy

    clients = [RemotePolicy(url, timeout_s=timeout_s) for _ in range(n_robots)]
    barrier = threading.Barrier(n_robots)
    results = [dict(latency_ms=[], server_ms=[], batch=[], lost=0, misrouted=0, first=None, first_obs=None)
               for _ in range(n_robots)]

    def robot(r: int) -> None:
        client, res = clients[r], results[r]
        barrier.wait()
        for k in range(n_requests):
            obs = observations[(r * 7 + k) % len(observations)]  # [n_obs_steps, obs_dim]
            rid_before = client._next_id + 1
            try:
                reply = client.infer(obs, reset=k == 0, seed=seed + r if k == 0 else None)
            except Exception:
                res["lost"] += 1
                continue
            action = np.asarray(reply["action"])
            if reply.get("id") != rid_before or action.shape != (client.n_action_steps, int(client.metadata["action_dim"])):
                res["misrouted"] += 1
                continue
            if k == 0:
                res["first"], res["first_obs"] = action, obs
            res["latency_ms"].append(reply["latency_ms"])
            res["server_ms"].append(reply["timing"]["server_ms"])
            res["batch"].append(reply["timing"]["batch"])

    threads = [threading.Thread(target=robot, args=(r,)) for r in range(n_robots)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for client in clients:
        client.close()

    # routing check: the first chunk of robots 0 and R-1 again, alone on a fresh connection (same seed, obs)
    deviation = 0.0
    with RemotePolicy(url, timeout_s=timeout_s) as solo:
        for r, res in enumerate(results):
            if res["first"] is not None and r in (0, n_robots - 1):
                again = solo.infer(res["first_obs"], reset=True, seed=seed + r)
                deviation = max(deviation, float(np.abs(np.asarray(again["action"]) - res["first"]).max()))

    latency = np.concatenate([res["latency_ms"] for res in results]) if n_robots else np.zeros(0)
    server = np.concatenate([res["server_ms"] for res in results])
    batches = np.concatenate([res["batch"] for res in results]).astype(np.float64)
    replies = int(latency.size)
    p50, p95, p99 = np.percentile(latency, [50, 95, 99]).tolist() if replies else [float("nan")] * 3
    return {
        "run": tag, "robots": n_robots, "requests": n_robots * n_requests, "replies": replies,
        "lost": sum(res["lost"] for res in results), "misrouted": sum(res["misrouted"] for res in results),
        "wall_s": wall, "throughput_rps": replies / wall if wall > 0 else float("nan"),
        "latency_ms": {"p50": p50, "p95": p95, "p99": p99, "mean": float(latency.mean()) if replies else float("nan")},
        "server_ms_p50": float(np.percentile(server, 50)) if replies else float("nan"),
        # requests per model call: each reply reports its batch's size b, so a batch counts sum(1/b) = 1
        "mean_batch": float(replies / np.sum(1.0 / batches)) if replies else float("nan"),
        "solo_dev": deviation,
    }


def load_sampler_policy(cfg: DictConfig, sampler: str):
    """The checkpoint with ``conf/sampler/<sampler>.yaml``'s settings, for an in-process server."""
    import torch

    from parapolicy.configs import sampler_config, sampler_kwargs
    from parapolicy.policy import load_policy
    from parapolicy.policy.checkpoint import resolve_checkpoint

    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    name, steps, options = sampler_kwargs(sampler_config(sampler))
    if cfg.num_inference_steps:
        steps = int(cfg.num_inference_steps)
    return load_policy(str(resolve_checkpoint(str(cfg.checkpoint))), sampler=name, device=str(cfg.device),
                       num_inference_steps=steps, fast_path=cfg.get("fast_path", "auto"), **options)


def requests_per_robot(cfg: DictConfig, n_robots: int) -> int:
    """``requests_per_robot``, capped so a row sends at most ``max_requests_per_row`` (at least 2 each)."""
    n = int(cfg.requests_per_robot)
    cap = cfg.get("max_requests_per_row")
    return n if not cap else max(2, min(n, int(cap) // n_robots))


def format_rows(rows: list[dict]) -> str:
    header = (f"{'sampler':<10} {'batching':>8} {'robots':>6} {'replies':>7} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} "
              f"{'p99 ms':>8} {'srv p50':>8} {'batch':>6} {'lost':>5} {'misrt':>5} {'solo_dev':>9}")
    lines = [header, "-" * len(header)]
    for row in rows:
        lat = row["latency_ms"]
        lines.append(f"{row['sampler']:<10} {'on' if row['batching'] else 'off':>8} {row['robots']:>6} {row['replies']:>7} "
                     f"{row['throughput_rps']:>7.2f} {lat['p50']:>8.1f} {lat['p95']:>8.1f} {lat['p99']:>8.1f} "
                     f"{row['server_ms_p50']:>8.1f} {row['mean_batch']:>6.2f} {row['lost']:>5} {row['misrouted']:>5} "
                     f"{row['solo_dev']:>9.1e}")
    return "\n".join(lines)


def run_bench(cfg: DictConfig, out_dir: Path) -> dict:
    import platform

    from parapolicy.bench import load_observations
    from parapolicy.serving.client import RemotePolicy
    from parapolicy.policy import load_policy
    from parapolicy.policy.checkpoint import resolve_checkpoint
    from parapolicy.serving.server import PolicyServer, ServerThread

    if cfg.server_mode not in ("thread", "subprocess"):
        raise ValueError(f"server_mode must be thread or subprocess, got {cfg.server_mode!r}")
    robots = [int(n) for n in cfg.robots]
    if not robots or min(robots) < 1:
        raise ValueError(f"robots must be a non-empty list of counts >= 1, got {list(cfg.robots)}")
    if int(cfg.requests_per_robot) < 1:
        raise ValueError(f"requests_per_robot must be >= 1, got {cfg.requests_per_robot}")
    samplers = [str(s) for s in cfg.samplers]
    policy = load_policy(str(resolve_checkpoint(str(cfg.checkpoint))))  # for the observation layout only
    notes: list[str] = []
    obs, source = load_observations(cfg, policy, notes)
    observations = np.asarray(obs, dtype=np.float32)
    print(f"observations: {source} ({len(observations)} histories)" + "".join(f"\nnote: {n}" for n in notes))

    out_dir.mkdir(parents=True, exist_ok=True)
    rows, counters = [], {}
    for sampler in samplers:
        served = None if cfg.server_mode == "subprocess" else load_sampler_policy(cfg, sampler)
        for batching in cfg.batching:
            tag = f"{sampler}_{'on' if batching else 'off'}"
            if served is None:
                proc, url = start_server(cfg, sampler, bool(batching), out_dir / f"server_{tag}")
            else:
                thread = ServerThread(PolicyServer(
                    served, "127.0.0.1", 0, max_batch=int(cfg.max_batch) if batching else 1,
                    max_wait_ms=float(cfg.max_wait_ms) if batching else 0.0),
                    startup_timeout_s=float(cfg.startup_timeout_s))  # includes the fast path's warm-up
                url = thread.url
            try:
                with RemotePolicy(url, timeout_s=float(cfg.timeout_s)) as warm:
                    for k in range(int(cfg.warmup)):
                        warm.infer(observations[k % len(observations)], reset=k == 0, seed=0 if k == 0 else None)
                for n in robots:
                    row = run_robots(url, observations, n, requests_per_robot(cfg, n), int(cfg.seed),
                                     float(cfg.timeout_s), tag)
                    row.update(sampler=sampler, batching=bool(batching))
                    rows.append(row)
                    print(format_rows([row]).splitlines()[-1], flush=True)
            finally:
                if served is None:
                    counters[tag] = stop_server(proc)
                else:
                    thread.stop()
                    counters[tag] = thread.server.stats.format()
            print(f"server {tag}: {counters[tag]}", flush=True)

    import torch

    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": f"{platform.machine()}, {torch.get_num_threads()} "
              f"threads here", "device": str(cfg.device), "server_torch_threads": cfg.torch_threads,
              "observations": source, "config": OmegaConf.to_container(cfg, resolve=True), "rows": rows,
              "server_counters": counters}
    (out_dir / "serve_bench.json").write_text(json.dumps(result, indent=2))
    print()
    print(format_rows(rows))
    total_lost = sum(r["lost"] for r in rows)
    total_misrouted = sum(r["misrouted"] for r in rows)
    print(f"all rows: {sum(r['replies'] for r in rows)} replies, {total_lost} lost, {total_misrouted} misrouted")
    print(f"results: {out_dir / 'serve_bench.json'}")
    return result

