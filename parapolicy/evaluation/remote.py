"""Episodes through a running policy server: ``python -m parapolicy.eval server=ws://127.0.0.1:8000``.

Each of ``n_envs`` threads owns one simulator and one ``RemotePolicy`` connection (one robot on the
server; several robots let the server batch). Episode e uses seed ``seed + e`` for the environment and,
sent with the reset, for the robot's generator on the server, which draws x_T and the step noise as
``PolicyRunner`` does: with the server's sampler and the same torch thread count, an episode ends as
the in-process eval's episode with the same seed.

Per call it records the end-to-end latency (``latency_ms``: network + queueing + sampling, measured
here) beside the server-side figure (``server_ms``) and the model call alone (``plan_ms``).
"""

from __future__ import annotations

import threading
import time
from typing import Iterable

from parapolicy.evaluation.executors import Record

REPLY_TIMEOUT_S = 600.0  # an eval waits for a busy server; a dead one still fails the episode


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


class ServerExecutor:
    """The executor for ``server=<url>``: ``n_envs`` robot threads, each with its own env and connection.

    The server's sampler is the one measured, so there is one run, labelled ``label`` (the server's
    sampler name, ``+warm`` for warm starts, ``@server``); ``metadata`` is the server's.
    """

    def __init__(self, url: str, env_name: str, n_envs: int, max_episode_steps: int | None,
                 timeout_s: float = REPLY_TIMEOUT_S):
        from parapolicy.serving.client import RemotePolicy

        self.url, self.env_name, self.max_episode_steps = url, env_name, max_episode_steps
        self.policies = [RemotePolicy(url, timeout_s=timeout_s) for _ in range(n_envs)]
        self.metadata = self.policies[0].metadata
        sampler = self.metadata["sampler"]
        self.label = sampler["name"] + ("+warm" if sampler.get("warm_start") else "") + "@server"

    def run(self, runs: dict, label: str, shadow, episodes: Iterable[int], done: set, seed: int,
            record: Record) -> None:
        """Every episode not in ``done`` for the one run ``label`` (``runs`` and ``shadow``: unused, the
        server holds the policy); ``record`` is called from one thread at a time."""
        from parapolicy.envs import make_env

        todo = [e for e in episodes if (label, e) not in done]
        n_robots = len(self.policies)
        lock = threading.Lock()
        failures: list[BaseException] = []

        def robot(k: int) -> None:
            env = make_env(self.env_name, max_episode_steps=self.max_episode_steps)
            try:
                for e in todo[k::n_robots]:
                    rec = run_episode(env, self.policies[k], seed + e)
                    with lock:
                        record(label, e, rec)
            except BaseException as err:  # surfaced after join
                failures.append(err)
            finally:
                env.close()

        threads = [threading.Thread(target=robot, args=(k,), daemon=True) for k in range(n_robots)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise failures[0]

    def describe(self) -> dict:
        return {"executor": {"kind": "server", "url": self.url, "robots": len(self.policies)}}

    def close(self) -> None:
        for policy in self.policies:
            policy.close()
