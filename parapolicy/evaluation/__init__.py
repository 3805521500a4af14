"""Closed-loop evaluation as a library; ``python -m parapolicy.eval`` is its command line.

Imports go one way, top to bottom:

- ``runs``: what an eval runs (``RunSpec``, ``plan_runs``, ``run_label``, ``parse_baseline``, ``build_runs``);
- ``metrics``: success intervals, latency percentiles, the table and the latency plot;
- ``episode_log``: ``episodes.jsonl`` (``EpisodeLog``: write, resume) and ``summarize``;
- ``executors``: where episodes run (``LocalExecutor``, ``RayExecutor``); ``remote``: through a policy
  server (``ServerExecutor``, ``run_episode``);
- ``video``: rollout mp4s and previews; ``report``: many summaries in one table;
- ``driver``: ``run_eval``, which ties them together.
"""

from parapolicy.evaluation.driver import run_eval, run_server_eval, validate
from parapolicy.evaluation.episode_log import EpisodeLog, read_episodes, summarize
from parapolicy.evaluation.runs import RunSpec, build_runs, parse_baseline, plan_runs, run_label

__all__ = ["EpisodeLog", "RunSpec", "build_runs", "parse_baseline", "plan_runs", "read_episodes", "run_eval",
           "run_label", "run_server_eval", "summarize", "validate"]
