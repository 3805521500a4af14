"""``episodes.jsonl``: one JSON line per finished episode, written as it arrives, resumed, summarised.

A line is ``{"run": <label>, "episode": <index>, **record}`` with the record of
``PolicyRunner.run_batch`` (seed, success, length, reward, error, wall_s, per-call measurements).
An interrupted eval loses at most the episodes in flight: ``resume=true`` keeps every complete line
and runs only the (run, episode) pairs missing from it.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterable

from parapolicy.evaluation.metrics import summarize_run
from parapolicy.evaluation.runs import RunSpec, relabel_legacy


def read_episodes(path: Path) -> list[dict]:
    """The complete lines of an episode log (none if it does not exist)."""
    if not path.exists():
        return []
    episodes = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                episodes.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption: that episode reruns
                continue
    return episodes


class EpisodeLog:
    """The log of one eval directory; ``append`` is safe from several threads (the server eval's robots).

    ``resume``: keep the episodes already logged (``specs``: renaming lines of older label schemes to
    today's), else start empty. Either way the file is rewritten with complete lines only, so a line
    cut by an interruption cannot glue onto the next one.
    """

    def __init__(self, path: Path, resume: bool, specs: list[RunSpec] | None = None):
        self.path = path
        episodes = read_episodes(path) if resume else []
        self.episodes: list[dict] = relabel_legacy(episodes, specs) if specs else episodes
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(ep) + "\n" for ep in self.episodes))
        self._file = path.open("a")
        self._lock = threading.Lock()

    def done(self) -> set[tuple[str, int]]:
        """The (run label, episode) pairs logged so far."""
        return {(ep["run"], ep["episode"]) for ep in self.episodes}

    def append(self, run: str, episode: int, record: dict) -> dict:
        """Write (and flush) one finished episode; returns its line."""
        line = {"run": run, "episode": episode, **record}
        with self._lock:
            self._file.write(json.dumps(line) + "\n")
            self._file.flush()
            self.episodes.append(line)
        return line

    def of_run(self, label: str, wanted: Iterable[int]) -> list[dict]:
        """One run's lines among the ``wanted`` episodes, by episode index."""
        wanted = set(wanted)
        return sorted((ep for ep in self.episodes if ep["run"] == label and ep["episode"] in wanted),
                      key=lambda ep: ep["episode"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "EpisodeLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summarize(episodes: list[dict], labels: list[str], baseline_label: str | None,
              specs: list[RunSpec] | None = None) -> dict:
    """Per-run summaries (``metrics.summarize_run`` plus, from ``specs``, each run's sampler, role,
    ``steps`` and options) and the p50 speedup of the first run over ``baseline_label``."""
    by_label = {spec.label: spec for spec in specs or []}
    runs = {}
    for label in labels:
        mine = sorted((ep for ep in episodes if ep["run"] == label), key=lambda ep: ep["episode"])
        if mine:
            runs[label] = summarize_run(mine)
            if label in by_label:
                spec = by_label[label]
                runs[label].update(sampler=spec.name, role=spec.role, steps=spec.steps,
                                   timestep_spacing=spec.timestep_spacing, options=spec.options)
    speedup = None
    if baseline_label and baseline_label in runs and labels[0] in runs:
        speedup = runs[baseline_label]["latency_ms"]["p50"] / runs[labels[0]]["latency_ms"]["p50"]
    return {"runs": runs, "speedup_p50": speedup}
