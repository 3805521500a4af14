"""Where an eval's episodes run: in this process (``executor=local``) or on Ray workers (``executor=ray``).

An executor gets the eval's runs (``{label: policy}``), the episodes still to do and a ``record(label,
episode, rec)`` callback; the driver (``parapolicy.evaluation.driver.run_eval``) writes every record to
``episodes.jsonl`` as it arrives, then the summary, plot and table. Episode ``e`` always uses seed
``seed + e`` and its own noise generator (``parapolicy.realtime.runner``), so where it runs does not change it.

Ray (``pip install -e ".[ray]"``): one actor per worker loads the checkpoint once, from bytes shipped
through Ray's object store (no shared filesystem needed, only this package on every node), keeps one
environment alive across episodes and runs one (run, episode) pair per task. A task whose worker dies or
which raises is retried on a fresh worker up to ``ray.max_retries`` times, then recorded as a failed
episode with its reason; the run goes on.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable

from omegaconf import DictConfig

Record = Callable[[str, int, dict], None]  # (run label, episode index, episode record)
EXECUTORS = ("local", "ray")
# Test hook, read by the driver: "<label>:<episode>" kills the worker process on that episode's first
# attempt, "<label>:<episode>:always" on every attempt, "<label>:<episode>:raise" makes every attempt raise
# (the worker lives on); comma-separated for several.
CRASH_ENV = "PARAPOLICY_RAY_CRASH"
CHECKPOINT_FILES = ("config.json", "model.safetensors")


def make_executor(cfg: DictConfig, checkpoint: Path, specs: list):
    """The executor named by ``cfg.executor`` (``local`` default); raises ValueError on bad settings and
    ImportError (one line) when ``executor=ray`` and Ray is not installed."""
    kind = str(cfg.get("executor") or "local")
    if kind not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    from parapolicy.evaluation.realtime_options import timing_options

    realtime = timing_options(cfg)
    if kind == "local":
        return LocalExecutor(cfg.env.name, int(cfg.n_envs), cfg.max_episode_steps, realtime)
    return RayExecutor(cfg, checkpoint, specs)


class LocalExecutor:
    """Today's loop: batches of ``n_envs`` episodes, every run interleaved batch by batch (so machine
    drift hits all runs alike), one vector env for the whole eval."""

    def __init__(self, env_name: str, n_envs: int, max_episode_steps: int | None, realtime: dict | None = None):
        self.env_name, self.n_envs, self.max_episode_steps = env_name, n_envs, max_episode_steps
        self.realtime = realtime or {}  # PolicyRunner's timing, latency, transition, execution_horizon
        self.envs = None

    def run(self, runs: dict, label: str, shadow, episodes: Iterable[int], done: set, seed: int,
            record: Record) -> None:
        from parapolicy.realtime.runner import PolicyRunner, make_vector_env

        episodes = list(episodes)
        self.envs = make_vector_env(self.env_name, self.n_envs, self.max_episode_steps)
        for start in range(0, len(episodes), self.n_envs):
            batch = episodes[start : start + self.n_envs]
            for run_label, run_policy in runs.items():
                todo = [e for e in batch if (run_label, e) not in done]
                if not todo:
                    continue
                runner = PolicyRunner(self.envs, run_policy, shadow=shadow if run_label == label else None,
                                      label=run_label, **self.realtime)
                runner.run_batch([seed + e for e in todo],
                                 on_episode=lambda i, rec, lbl=run_label, todo=todo: record(lbl, todo[i], rec))

    def describe(self) -> dict:
        return {"executor": {"kind": "local"}}

    def close(self) -> None:
        if self.envs is not None:
            self.envs.close()
            self.envs = None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError('executor=ray needs Ray: pip install -e ".[ray]"') from None
    return ray


class EpisodeWorker:
    """A Ray actor: the policy (all runs) and one env, built once, then one episode per ``run`` call."""

    def __init__(self, files: dict, specs: list, shadow_label: str | None, env_name: str,
                 max_episode_steps: int | None, device: str, threads: int, fast_path, crash: dict,
                 realtime: dict | None = None):
        import tempfile

        import torch

        from parapolicy.devices import device_name, pick_device
        from parapolicy.evaluation.runs import build_runs
        from parapolicy.policy import load_policy
        from parapolicy.realtime.runner import make_vector_env

        torch.set_num_threads(threads)
        folder = Path(tempfile.mkdtemp(prefix="parapolicy-ckpt-"))
        for name, data in files.items():  # the checkpoint folder, as shipped through the object store
            (folder / name).write_bytes(data)
        device = pick_device(device)
        first = specs[0]
        from parapolicy.policy.accel import eval_fast_path

        policy = load_policy(str(folder), sampler=first.name, device=str(device), num_inference_steps=first.steps,
                             fast_path=eval_fast_path(fast_path, device), **first.options)
        self.runs = build_runs(policy, specs)  # the same construction as the driver's
        from parapolicy.policy.accel import warm_up

        for run_policy in self.runs.values():
            warm_up(run_policy, 1)
        self.label, self.shadow_label = specs[0].label, shadow_label
        self.envs = make_vector_env(env_name, 1, max_episode_steps)
        self.crash = crash
        self.realtime = realtime or {}
        self.host = socket.gethostname()
        self.device_name = device_name(device)

    def info(self) -> dict:
        return {"host": self.host, "device": self.device_name, "pid": os.getpid()}

    def run(self, label: str, episode: int, seed: int, attempt: int) -> dict:
        from parapolicy.realtime.runner import PolicyRunner

        when = self.crash.get((label, episode))
        if when == "always" or (when == "first" and attempt == 0):
            os._exit(1)  # test hook: a worker process that dies mid-run
        if when == "raise":
            raise RuntimeError(f"injected failure ({CRASH_ENV})")
        shadow = self.runs[self.shadow_label] if self.shadow_label and label == self.label else None
        rec = PolicyRunner(self.envs, self.runs[label], shadow=shadow, label=label, **self.realtime).run_batch([seed])[0]
        rec["host"] = self.host  # latency was measured there
        if attempt:
            rec["attempts"] = attempt + 1
        return rec


def _parse_crash(text: str | None) -> dict:
    crash = {}
    for item in (text or "").split(","):
        if item.strip():
            parts = item.strip().split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("always", "raise")):
                raise ValueError(f"{CRASH_ENV}: expected '<label>:<episode>[:always|:raise]', got {item!r}")
            crash[(parts[0], int(parts[1]))] = parts[2] if len(parts) == 3 else "first"
    return crash


class RayExecutor:
    """Episodes as tasks on Ray actors (one env + the policy each), results streamed back to the driver.

    ``ray.address``: null starts a Ray instance on this machine (loopback only, ``ray.num_cpus`` CPUs);
    ``auto`` or ``host:port`` joins a running cluster. ``ray.num_workers`` (null: as many as the
    cluster's CPUs allow at ``ray.num_cpus_per_worker`` each).
    """

    def __init__(self, cfg: DictConfig, checkpoint: Path, specs: list):
        rcfg = cfg.get("ray") or {}
        self.address = rcfg.get("address")
        self.num_cpus = rcfg.get("num_cpus")
        self.cpus_per_worker = float(rcfg.get("num_cpus_per_worker") or 1)
        self.gpus_per_worker = float(rcfg.get("num_gpus_per_worker") or 0)
        self.num_workers = rcfg.get("num_workers")
        self.max_retries = int(rcfg.get("max_retries", 2))
        self.timeout_s = rcfg.get("episode_timeout_s")
        if int(cfg.n_envs) != 1:
            raise ValueError(f"executor=ray runs one env per worker; got n_envs={cfg.n_envs} "
                             f"(use ray.num_workers for parallel episodes)")
        if self.cpus_per_worker <= 0 or self.max_retries < 0:
            raise ValueError("ray.num_cpus_per_worker must be > 0 and ray.max_retries >= 0")
        if self.num_workers is not None and int(self.num_workers) < 1:
            raise ValueError(f"ray.num_workers must be >= 1 or null, got {self.num_workers}")
        self.checkpoint, self.specs = checkpoint, specs
        from parapolicy.evaluation.realtime_options import timing_options

        self.realtime = timing_options(cfg)
        self.env_name, self.max_episode_steps = cfg.env.name, cfg.max_episode_steps
        self.device, self.fast_path = str(cfg.device), cfg.get("fast_path", "auto")
        self.threads = int(cfg.torch_threads or max(1, int(self.cpus_per_worker)))
        self.crash = _parse_crash(os.environ.get(CRASH_ENV))
        if self.address is None and "ray" not in __import__("sys").modules:
            # a Ray started here serves this eval only: keep it on loopback (Ray otherwise binds the
            # machine's routable address and rewrites 127.0.0.1 to it)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.ray = _import_ray()
        self.actors: list = []
        self.hosts: dict = {}
        self.connected_here = False  # ray.init called by this executor (else: inside a Ray job already)
        self.n_replaced = 0

    # ------------------------------------------------------------------ Ray plumbing
    def _connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        if self.address is None:
            for attempt in range(2):  # Ray gives its raylet a fixed 30 s to register: on a loaded machine, retry once
                try:
                    ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False,
                             log_to_driver=False, _node_ip_address="127.0.0.1")
                    break
                except Exception as err:
                    if attempt or "timed out during startup" not in str(err):
                        raise
                    ray.shutdown()
        else:
            ray.init(address=str(self.address), log_to_driver=False)
        self.connected_here = True

    def _new_actor(self, files_ref, shadow_label):
        worker = self.ray.remote(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
                                 max_restarts=0, max_task_retries=0)(EpisodeWorker)
        return worker.remote(files_ref, self.specs, shadow_label, self.env_name, self.max_episode_steps,
                             self.device, self.threads, self.fast_path, self.crash, self.realtime)

    def run(self, runs: dict, label: str, shadow, episodes: Iterable[int], done: set, seed: int,
            record: Record) -> None:
        ray = self.ray
        # episode-major, run-minor: the runs of one episode go out together, as in the local loop
        pending = deque((lbl, e) for e in episodes for lbl in runs if (lbl, e) not in done)
        if not pending:
            return
        self._connect()
        shadow_label = next((lbl for lbl, p in runs.items() if p is shadow), None) if shadow is not None else None
        files_ref = ray.put({name: (self.checkpoint / name).read_bytes() for name in CHECKPOINT_FILES})
        n_workers = self.num_workers
        if n_workers is None:
            n_workers = max(1, int(ray.cluster_resources().get("CPU", 1) // self.cpus_per_worker))
        n_workers = min(int(n_workers), len(pending))
        self.actors = [self._new_actor(files_ref, shadow_label) for _ in range(n_workers)]
        budget = n_workers + len(pending) * self.max_retries  # actor replacements before giving up
        attempts: dict = {}
        in_flight: dict = {}  # ObjectRef -> (slot, unit, submitted at)
        idle = deque(range(n_workers))
        last_error = None
        while pending or in_flight:
            while idle and pending:
                slot, unit = idle.popleft(), pending.popleft()
                ref = self.actors[slot].run.remote(unit[0], unit[1], seed + unit[1], attempts.get(unit, 0))
                in_flight[ref] = (slot, unit, time.monotonic())
            if not in_flight:
                raise RuntimeError(f"no Ray worker left after {self.n_replaced} replacements; last error: {last_error}")
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            if self.timeout_s:
                for ref, (slot, unit, t0) in in_flight.items():
                    if ref not in ready and time.monotonic() - t0 > float(self.timeout_s):
                        ray.kill(self.actors[slot])  # its task then fails with RayActorError: retried
            for ref in ready:
                slot, unit, _ = in_flight.pop(ref)
                try:
                    rec = ray.get(ref)
                except ray.exceptions.RayTaskError as err:  # the episode raised; the worker lives on
                    reason = f"task failed: {_first_line(err)}"
                    idle.append(slot)
                except ray.exceptions.RayError as err:  # the worker died (or Ray lost the task): replace it
                    died = isinstance(err, ray.exceptions.RayActorError)
                    reason = f"{'worker died' if died else 'ray error'}: {type(err).__name__}: {_first_line(err)}"
                    ray.kill(self.actors[slot])  # no-op when dead; frees one that is only unreachable
                    if budget > 0:
                        budget -= 1
                        self.n_replaced += 1
                        self.actors[slot] = self._new_actor(files_ref, shadow_label)
                        idle.append(slot)
                else:
                    idle.append(slot)
                    self.hosts.setdefault(rec.get("host"), None)
                    record(unit[0], unit[1], rec)
                    continue
                last_error = reason
                attempts[unit] = attempts.get(unit, 0) + 1
                if attempts[unit] <= self.max_retries:
                    pending.appendleft(unit)
                else:  # keeps failing: a failed episode with its reason; the run goes on
                    record(unit[0], unit[1], {"seed": seed + unit[1], "success": False, "length": 0,
                                              "reward": 0.0, "calls": [], "wall_s": 0.0, "attempts": attempts[unit],
                                              "error": f"ray: {reason} (after {attempts[unit]} attempts)"})
        self._describe_hosts()

    def _describe_hosts(self) -> None:
        try:
            for info in self.ray.get([a.info.remote() for a in self.actors], timeout=30):
                self.hosts[info["host"]] = info["device"]
        except Exception:  # a worker gone at the end: its episodes are logged already
            pass

    def describe(self) -> dict:
        return {"executor": {"kind": "ray", "address": self.address, "workers": len(self.actors),
                             "num_cpus_per_worker": self.cpus_per_worker, "replaced_workers": self.n_replaced,
                             "max_retries": self.max_retries, "hosts": self.hosts,
                             "checkpoint_shipping": "object store (checkpoint folder bytes)"}}

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:
                pass
        if self.connected_here:
            self.ray.shutdown()  # stops the Ray started here; only disconnects from a cluster


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    # RayTaskError's text starts with a header; the exception itself is on the last line
    return (text[-1] if text else type(err).__name__)[:300]
