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
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRATCH = REPO / ".mutants"

# name -> (file to mutate, test files, optional mutmut name globs narrowing the functions run)
MODULES: dict[str, tuple[str, list[str], list[str]]] = {
    "base": ("parapolicy/samplers/base.py", ["tests/test_samplers.py", "tests/test_srds_parataa.py"], []),
    "picard": ("parapolicy/samplers/picard.py", ["tests/test_samplers.py", "tests/test_warm_start.py",
                                                 "tests/test_tolerance.py"], []),
    "srds": ("parapolicy/samplers/srds.py", ["tests/test_srds_parataa.py", "tests/test_tolerance.py"], []),
    "parataa": ("parapolicy/samplers/parataa.py", ["tests/test_srds_parataa.py"], []),
    "safe_pickle": ("parapolicy/importers/safe_pickle.py", ["tests/test_convert.py", "tests/test_dp_importer.py"], []),
    "dp_importer": ("parapolicy/importers/diffusion_policy.py", ["tests/test_convert.py",
                                                               "tests/test_dp_importer.py"], []),
    "runner": ("parapolicy/runner.py", ["tests/test_runner.py"], []),
    "server": ("parapolicy/serving/server.py", ["tests/test_serve.py", "tests/test_serve_batching.py"],
               # the batching: the queue, the batch-forming loop and the per-robot bookkeeping
               ["*RobotSession*", "*_answer*", "*_next_batch*", "*_batch_loop*", "*_plan__*"]),
}


def pyproject(source: str, tests: list[str]) -> str:
    existing = [t for t in tests if (REPO / t).exists()]
    lines = [
        "[tool.mutmut]",
        'source_paths = ["parapolicy"]',
        f'only_mutate = ["{source}"]',
        f"pytest_add_cli_args_test_selection = {json.dumps(existing)}",
        # quiet; one torch thread per test process (the harness forks one per mutant)
        'pytest_add_cli_args = ["-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu"]',
        "timeout_multiplier = 10.0",
        "",
        "[tool.pytest.ini_options]",
        'testpaths = ["tests"]',
        'markers = ["slow: runs robosuite episodes (seconds each)", "gpu: needs a CUDA device"]',
        "",
    ]
    return "\n".join(lines)


def run_module(name: str, max_children: int, log, mutants: list[str] | None = None, tag: str = "") -> dict:
    source, tests, globs = MODULES[name]
    globs = mutants or globs
    work = SCRATCH / (name + (f"-{tag}" if tag else ""))
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
    (work / "pyproject.toml").write_text(pyproject(source, tests))
    mutmut = Path(sys.executable).with_name("mutmut")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    start = time.time()
    cmd = [str(mutmut), "run", "--max-children", str(max_children), *globs]
    print(f"[{name}] {' '.join(cmd)} in {work}", file=log, flush=True)
    proc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    subprocess.run([str(mutmut), "export-cicd-stats"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    stats_path = work / "mutants" / "mutmut-cicd-stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    results = subprocess.run([str(mutmut), "results"], cwd=work, env=env, capture_output=True, text=True).stdout
    survivors = [line.strip() for line in results.splitlines()
                 if line.strip().endswith((": survived", ": timeout", ": no tests"))]
    (work / "survivors.txt").write_text("\n".join(survivors) + "\n")
    stats.update(module=name, source=source, tests=tests, functions=globs or "all", returncode=proc.returncode,
                 minutes=round((time.time() - start) / 60, 1), survivors=[s.split(":")[0] for s in survivors])
    print(json.dumps({k: v for k, v in stats.items() if k != "survivors"}), file=log, flush=True)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help=f"some of: {', '.join(MODULES)} (default: all)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--mutants", nargs="+", help="only these mutant names / globs (e.g. an earlier run's survivors)")
    parser.add_argument("--survivors-of", help="only the survivors (and timeouts) listed in this earlier run's "
                        "survivors.txt")
    parser.add_argument("--tag", default="", help="scratch folder suffix (keeps an earlier run's folder)")
    args = parser.parse_args(argv)
    if args.list:
        for name, (source, tests, globs) in MODULES.items():
            print(f"{name:12s} {source}  <- {' '.join(tests)}  {' '.join(globs)}")
        return 0
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown modules {unknown}; known: {', '.join(MODULES)}")
    summary = {}
    for name in args.modules or list(MODULES):
        mutants = args.mutants
        if args.survivors_of:
            lines = Path(args.survivors_of).read_text().split()
            mutants = [w.rstrip(":") for w in lines if "__mutmut_" in w]
        summary[name] = run_module(name, args.max_children, sys.stdout, mutants, args.tag)
    (SCRATCH / f"summary{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(summary, indent=1))
    print(f"{'module':12s} {'total':>6s} {'killed':>6s} {'survived':>8s} {'no tests':>8s} {'timeout':>7s}  minutes")
    for name, s in summary.items():
        print(f"{name:12s} {s.get('total', 0):6d} {s.get('killed', 0):6d} {s.get('survived', 0):8d} "
              f"{s.get('no_tests', 0):8d} {s.get('timeout', 0):7d}  {s['minutes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
