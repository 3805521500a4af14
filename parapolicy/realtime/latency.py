"""How long a policy call takes in a real-time closed loop, in control steps.

``latency=measured``: each call's own measured wall-clock latency (what this machine does).
``latency=<ms>``: a fixed number of milliseconds for every call (reproducible, machine-independent).
``latency=profile:<file>``: per-call latencies replayed from another machine's measurements, so a CPU
machine reproduces what a GPU's or a robot computer's latency does to success; ``profile:<file>@<run>``
picks one run of the file (typed as it is on the command line: Hydra's override parser takes ``@``;
``#<run>`` is accepted too, where nothing parses it, e.g. ``PolicyRunner(latency=...)``). The file may be

- a ``latency_profile.json`` (``make gpu-check``): ``{"runs": {label: {"latency_ms": [ms, ...]}}}``;
- a ``bench.json`` (``python -m parapolicy.bench``): rows with ``label`` and ``latencies_ms``;
- an eval's ``episodes.jsonl``: every call's ``latency_ms``, per ``run`` (or its ``summary.json``, which
  points to the ``episodes.jsonl`` beside it).

The replayed latency of call k of episode e is drawn from that run's list by a generator seeded with
the episode seed (the first episode's, for a batch of envs sharing one call), so a run is reproducible
and independent of other runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# mixed into a profile's replay seed beside the episode seed, so the replayed latencies are independent of the
# episode's noise (which the same seed drives)
PROFILE_SEED_SALT = 0x1A7E


def delay_steps(latency_ms: float, control_period_s: float) -> int:
    """d = ceil(latency / control period): control steps that pass while a call runs (0 for no latency)."""
    if latency_ms < 0 or not math.isfinite(latency_ms):
        raise ValueError(f"latency must be a finite number of ms >= 0, got {latency_ms!r}")
    steps = latency_ms / (control_period_s * 1e3)
    return int(math.ceil(steps - 1e-9))  # 100 ms at 50 ms per step is 2 steps, not 3


RUN_SEPARATOR = "@"  # profile:<file>@<run>: a character Hydra's command-line parser accepts unquoted


def split_profile_spec(text: str) -> tuple[str, str]:
    """``"<file>@<run>"`` (or ``"<file>#<run>"``) -> (file, run); run "" when none is named. A file whose own
    name holds ``@`` is taken whole when it exists."""
    if "#" in text:
        file, _, run = text.partition("#")
        return file, run
    file, sep, run = text.rpartition(RUN_SEPARATOR)
    if not sep or Path(text).is_file() or "/" in run:
        return text, ""
    return file, run


def read_profile(path: str | Path) -> dict[str, list[float]]:
    """``{run label: [per-call latency ms, ...]}`` from any of the file kinds this module lists."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latency profile {str(path)!r} not found")
    runs: dict[str, list[float]] = {}
    if path.suffix == ".jsonl":
        for line in path.read_text().splitlines():
            if line.strip():
                episode = json.loads(line)
                runs.setdefault(str(episode["run"]), []).extend(float(c["latency_ms"]) for c in episode.get("calls", []))
    else:
        data = json.loads(path.read_text())
        if isinstance(data.get("runs"), dict):  # latency_profile.json
            for label, run in data["runs"].items():
                values = run.get("latency_ms") if isinstance(run, dict) else run
                if isinstance(values, list):
                    runs[str(label)] = [float(v) for v in values]
        for row in data.get("samplers", []) if isinstance(data.get("samplers"), list) else []:  # bench.json
            if row.get("latencies_ms") and int(row.get("batch") or 1) == 1:
                runs.setdefault(str(row["label"]), []).extend(float(v) for v in row["latencies_ms"])
        beside = path.parent / "episodes.jsonl"
        if not any(runs.values()) and "sampler_label" in data and beside.is_file():  # an eval's summary.json
            return read_profile(beside)
    runs = {label: values for label, values in runs.items() if values}
    if not runs:
        raise ValueError(f"latency profile {str(path)!r} holds no per-call latencies (expected a latency_profile.json, "
                         f"a bench.json or an eval's episodes.jsonl)")
    return runs


@dataclass
class LatencyModel:
    """``kind`` is "measured", "fixed" or "profile"; ``describe()`` is what summary.json records."""

    kind: str
    fixed_ms: float = 0.0
    source: str | None = None
    samples: list[float] = field(default_factory=list)

    @classmethod
    def parse(cls, spec, run_label: str | None = None, sampler_name: str | None = None) -> "LatencyModel":
        """``"measured"``, a number of ms (``0``, ``"200"``, ``"200ms"``) or ``"profile:<file>[@<run>]"``.

        For a profile, the run is ``@<run>`` (or ``#<run>``) if given, else the one named like ``run_label``, else like
        ``sampler_name``, else the file's only run; ValueError listing the runs otherwise.
        """
        if spec is None or str(spec).strip().lower() in ("measured", "none", "null", ""):
            return cls("measured")
        text = str(spec).strip()
        if text.startswith("profile:"):
            file, wanted = split_profile_spec(text[len("profile:"):])
            runs = read_profile(file)
            names = [wanted] if wanted else [n for n in (run_label, sampler_name) if n]
            chosen = next((n for n in names if n in runs), None)
            if chosen is None and not wanted and len(runs) == 1:
                chosen = next(iter(runs))
            if chosen is None:
                raise ValueError(f"latency profile {file!r} has no run {' or '.join(map(repr, names)) or '(none named)'}; "
                                 f"it has {', '.join(sorted(runs))}: pick one with latency=profile:{file}{RUN_SEPARATOR}<run>")
            return cls("profile", source=f"{file}#{chosen}", samples=runs[chosen])
        try:
            value = float(text[:-2] if text.endswith("ms") else text)
        except ValueError:
            raise ValueError(f"latency must be 'measured', a number of milliseconds or 'profile:<file>', got {spec!r}") from None
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"latency must be >= 0 ms, got {spec!r}")
        return cls("fixed", fixed_ms=value)

    def generator(self, seed: int) -> np.random.Generator:
        """The per-episode replay generator (profile only), independent of the episode's noise."""
        return np.random.default_rng([int(seed), PROFILE_SEED_SALT])

    def planned_ms(self, rng: np.random.Generator | None) -> float | None:
        """The latency the next call will have, known before it runs (fixed, profile); None if measured."""
        if self.kind == "fixed":
            return self.fixed_ms
        if self.kind == "profile":
            return float(self.samples[int(rng.integers(len(self.samples)))])
        return None

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.fixed_ms:g}"
        if self.kind == "profile":
            return f"profile:{self.source}"
        return "measured"
