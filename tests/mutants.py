"""Mutation testing (``make mutants``): mutmut, one module at a time, each against its own test files.

    python tests/mutants.py                     # every module below, one after another
    python tests/mutants.py picard safe_pickle  # some of them
    python tests/mutants.py --list              # the modules and their tests

mutmut reads its settings from the ``pyproject.toml`` of the folder it runs in, and rewrites a copy of
the sources under ``mutants/`` there. So each module gets a scratch folder ``.mutants/<name>/`` (a
snapshot of ``parapolicy/`` and ``tests/``, with a ``pyproject.toml`` that names only that module's file
and only its test files): the run never touches the working tree, and restricting the tests is what
makes it finish on a 2-core machine. ``parapolicy.envs`` / ``parapolicy.conf`` still resolve through the
editable install (they are not mutated). Survivors are listed in ``.mutants/<name>/survivors.txt``;
``mutmut show <mutant>`` inside that folder prints a diff.

Only tests that run in this process see the mutants: the CLI tests (subprocesses) do not, which is why
each module's list holds in-process tests.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRATCH = REPO / ".mutants"

# name -> (file to mutate, test files or test ids, optional mutmut name globs narrowing the functions run).
# Narrowed where a full run does not finish on a loaded 2-core machine (each surviving mutant reruns every
# test that reaches it): the functions named are the ones that carry the module's algorithm or routing.
MODULES: dict[str, tuple[str, list[str], list[str]]] = {
    "base": ("parapolicy/samplers/base.py", ["tests/test_samplers.py", "tests/test_srds_parataa.py"],
             # what the parallel samplers build on: windows, budgets, noise levels, noise, the initial
             # trajectory (not: x0 clipping / prediction types / the sequential loop, which every
             # parallel = sequential test covers, nor repr and option listing)
             ["*_slide_window*", "*_out_of_budget*", "*step_alphas_cumprod*", "*xǁSamplerǁscaled_noise*",
              "*unit_noise*", "*initial_trajectory*"]),
    "picard": ("parapolicy/samplers/picard.py", ["tests/test_samplers.py", "tests/test_warm_start.py",
                                                 "tests/test_tolerance.py"], []),
    "srds": ("parapolicy/samplers/srds.py", ["tests/test_srds_parataa.py", "tests/test_tolerance.py"], []),
    "parataa": ("parapolicy/samplers/parataa.py", ["tests/test_srds_parataa.py"], []),
    "safe_pickle": ("parapolicy/importers/safe_pickle.py", ["tests/test_convert.py", "tests/test_dp_importer.py"], []),
    "dp_importer": ("parapolicy/importers/diffusion_policy.py", ["tests/test_convert.py",
                                                               "tests/test_dp_importer.py"],
                    # what decides whether and how a checkpoint converts: the refusals, the normalisers,
                    # the scheduler (not: dims read from weights, config assembly, hashing, excerpts)
                    ["*check_supported*", "*x__affine*", "*dp_affine_to_minmax*", "*read_scheduler*"]),
    # the row routing: which env's observation goes to which row, which generator draws which row's noise
    # (run_batch itself: every surviving mutant costs the 40 s of robosuite episodes; see RESULTS.md)
    "runner": ("parapolicy/realtime/runner.py", ["tests/test_runner.py"], ["*x_row_of*", "*x_policy_inputs*"]),
    "planner": ("parapolicy/realtime/planner.py", ["tests/test_runner.py", "tests/test_executor.py"],
                ["*x_draw_noise*", "*x_draw_candidates*", "*x_draw_prefix_noise*"]),
    # the real-time schedule (which action runs at which step, delays, stalls, holds, transitions), pure:
    # against its own tests and the fake-env tests of tests/test_realtime.py (no robosuite)
    "schedule": ("parapolicy/realtime/schedule.py", ["tests/test_executor.py", "tests/test_realtime.py"], []),
    "runner_schedule": ("parapolicy/realtime/runner.py", ["tests/test_realtime.py"], ["*run_batch__mutmut_*7"]),
    "server": ("parapolicy/serving/server.py",
               ["tests/test_serve_batching.py",
                "tests/test_serve.py::test_remote_warm_start_equals_local_and_robots_keep_separate_histories",
                "tests/test_serve.py::test_batching_gives_each_robot_its_unbatched_actions"],
               # the batching proper: forming a batch (who waits how long), the loop that hands it to the
               # model, the grouping of rows by what predict_action does for all of them, the batched plan
               # and the routing of its rows back (not: parsing one request, _answer, the bad-input matrix)
               ["*_Pendingǁsignature*", "*_next_batch*", "*_batch_loop*", "*_plan__*"]),
}

# pytest marker expression per module (default: no robosuite episodes, no GPU). The runner's tests are
# robosuite episodes by nature: without them nothing runs its row bookkeeping.
MARKERS: dict[str, str] = {"runner": "not gpu"}
DEFAULT_MARKERS = "not slow and not gpu"


def pyproject(source: str, tests: list[str], markers: str = DEFAULT_MARKERS) -> str:
    existing = [t for t in tests if (REPO / t.split("::")[0]).exists()]
    lines = [
        "[tool.mutmut]",
        'source_paths = ["parapolicy"]',
        f'only_mutate = ["{source}"]',
        f"pytest_add_cli_args_test_selection = {json.dumps(existing)}",
        # quiet; one torch thread per test process (the harness forks one per mutant)
        f'pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-m", "{markers}"]',
        # a mutant that never ends (a loop that stops advancing) is stopped after (its tests' time + 10 s)
        # x 2 x 1.5 CPU seconds; the 10 s cover the per-mutant pytest start (collection, fixtures), which
        # the tests' time leaves out. mutmut's defaults (+1 s, x 15) cost half an hour per such mutant here
        "timeout_constant = 10.0",
        "timeout_multiplier = 1.5",
        "",
        "[tool.pytest.ini_options]",
        'testpaths = ["tests"]',
        'markers = ["slow: runs robosuite episodes (seconds each)", "gpu: needs a CUDA device"]',
        "",
    ]
    return "\n".join(lines)


def run_module(name: str, max_children: int, log, mutants: list[str] | None = None, tag: str = "",
               resume: bool = False) -> dict:
    source, tests, globs = MODULES[name]
    globs = mutants or globs
    work = SCRATCH / (name + (f"-{tag}" if tag else ""))
    if not (resume and (work / "mutants").exists()):
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        shutil.copytree(REPO / "parapolicy", work / "parapolicy", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        # mutmut runs the tests inside mutants/, and the package finds the repository two folders above its
        # (mutated) files: the shipped checkpoints, the configs and the env side are linked in there
        (work / "mutants").mkdir()
        for linked in ("checkpoints", "conf", "envs", "benchmarks", "README.md"):
            if (REPO / linked).exists():
                os.symlink(REPO / linked, work / "mutants" / linked)
    # (resuming: mutmut keeps the verdicts it has and tests the rest; a changed timeout retests timeouts)
    (work / "pyproject.toml").write_text(pyproject(source, tests, MARKERS.get(name, DEFAULT_MARKERS)))
    mutmut = Path(sys.executable).with_name("mutmut")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    start = time.time()
    cmd = [str(mutmut), "run", "--max-children", str(max_children), *globs]
    print(f"[{name}] {' '.join(cmd)} in {work}", file=log, flush=True)
    proc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    # mutmut's own totals count every mutant of the file; these count the ones this run selected
    # ("not checked": outside the function globs, or not reached when a run was stopped)
    results = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=work, env=env, capture_output=True,
                             text=True).stdout
    verdicts = dict(line.strip().rsplit(": ", 1) for line in results.splitlines() if ": " in line)
    counts = collections.Counter(verdicts.values())
    checked = {k: v for k, v in verdicts.items() if v != "not checked"}
    survivors = [f"{k}: {v}" for k, v in checked.items() if v in ("survived", "timeout", "no tests", "suspicious")]
    (work / "survivors.txt").write_text("\n".join(survivors) + "\n")
    stats = {"total": len(checked), "killed": counts["killed"], "survived": counts["survived"],
             "no_tests": counts["no tests"], "timeout": counts["timeout"], "suspicious": counts["suspicious"],
             "not_checked": counts["not checked"]}
    stats.update(module=name, source=source, tests=tests, functions=globs or "all", returncode=proc.returncode,
                 minutes=round((time.time() - start) / 60, 1), survivors=[s.split(":")[0] for s in survivors])
    print(json.dumps({k: v for k, v in stats.items() if k != "survivors"}), file=log, flush=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help=f"some of: {', '.join(MODULES)} (default: all)")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--mutants", nargs="+", help="only these mutant names / globs (e.g. an earlier run's survivors)")
    parser.add_argument("--survivors-of", help="only the survivors (and timeouts) listed in this earlier run's "
                        "survivors.txt")
    parser.add_argument("--tag", default="", help="scratch folder suffix (keeps an earlier run's folder)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in its scratch folder "
                        "(same sources and tests) instead of starting over")
    args = parser.parse_args(argv)
    if args.list:
        for name, (source, tests, globs) in MODULES.items():
            print(f"{name:12s} {source}  <- {' '.join(tests)}  {' '.join(globs)}")
        return 0
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown modules {unknown}; known: {', '.join(MODULES)}")
    # One run at a time: a second run of the same module deletes the scratch folder under the first, whose
    # mutmut then dies on its next relative write (FileNotFoundError: mutants/....py.meta).
    SCRATCH.mkdir(exist_ok=True)
    lock = open(SCRATCH / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        parser.error(f"another mutation run holds {SCRATCH / '.lock'}; wait for it to end")
    summary = {}
    for name in args.modules or list(MODULES):
        mutants = args.mutants
        if args.survivors_of:
            lines = Path(args.survivors_of).read_text().split()
            mutants = [w.rstrip(":") for w in lines if "__mutmut_" in w]
        summary[name] = run_module(name, args.max_children, sys.stdout, mutants, args.tag, args.resume)
    # one file per tag, merged over runs (modules are often run one at a time)
    summary_path = SCRATCH / f"summary{'-' + args.tag if args.tag else ''}.json"
    merged = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary_path.write_text(json.dumps({**merged, **summary}, indent=1))
    print(f"{'module':12s} {'total':>6s} {'killed':>6s} {'survived':>8s} {'no tests':>8s} {'timeout':>7s}  minutes")
    for name, s in summary.items():
        print(f"{name:12s} {s.get('total', 0):6d} {s.get('killed', 0):6d} {s.get('survived', 0):8d} "
              f"{s.get('no_tests', 0):8d} {s.get('timeout', 0):7d}  {s['minutes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
