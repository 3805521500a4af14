#!/usr/bin/env python3
"""The GPU check: one command that spends a short GPU window on measuring, not on setting up.

    python3 scripts/gpu_check.py                         # on the GPU machine, from the checkout (= make gpu-check)
    python3 scripts/gpu_check.py --out DIR --device cpu  # the rehearsal (make gpu-check DEVICE=cpu runs it in a clean venv)
    python3 scripts/gpu_check.py --fetch-wheels          # here, with PyPI: the wheels into .whl/ (= make gpu-wheels)
    python3 scripts/gpu_check.py --make-venv DIR         # here: the rehearsal's clean venv (make gpu-check DEVICE=cpu)

The machine needs Python >= 3.10 with torch (a CUDA build on the GPU) and the packages its image holds
(``GPU_IMAGE_PROVIDES``); what it lacks travels as the wheels in ``.whl/`` (``make gpu-wheels``, pinned in
``scripts/gpu-requirements.txt``). Parts, each a subprocess with its own timeout, so that a hang loses
only that part (and the whole check stays within ``--budget-s``, 450 s on CUDA):

1. ``setup``: install the wheels into a temporary site (``pip install --no-index --no-deps --target``),
   expose the checkout there as the ``parapolicy`` package (``envs/`` and ``conf/`` mapped as the
   editable install maps them), import everything the check needs, record versions.
2. ``tests``: ``tests/test_cuda.py`` (fast path = eager, a CUDA graph per bucket and batch, bf16,
   parallel = sequential at tolerance -> 0, the shipped Square policy on CUDA) and ``tests/test_accel.py``.
3. ``bench_square``: ``python -m parapolicy.bench`` quick preset on the shipped Square policy: ddpm,
   paraddpm, ddim@10, paraddim (+ twins), batch 1 and 8, fast path off and on, windows 8/16/32.
4. ``bench_dp_lowdim`` / ``bench_dp_image``: the same on Diffusion Policy's 65.9M low-dim and 255.6M
   image U-Nets (random weights): ddpm vs paraddpm, batch 1 and 8, fast path off and on.
5. ``bench_dp_image_bf16`` (CUDA only): the 255.6M U-Net on the fast path with bf16 autocast.

Writes at most 8 files into ``--out`` (default ``outputs/gpu_check``): ``summary.json`` (device, versions,
every part's status / seconds / command, test counts, headline speedups), ``summary.md`` (the same as
tables, with every bench's printed tables), ``latency_profile.json`` (per-call latencies per sampler:
``python -m parapolicy.eval latency=profile:<file>`` replays them), ``bench.json`` (every bench part's
full result), ``tests.txt`` (pytest's output), ``gpu_check.log`` (every part's command and output),
``latency_vs_batch.png`` and ``denoiser_vs_k.png``. Exit status 0 only if every part passed.

``--size smoke`` (the default on CPU) runs every part at toy length (few steps and calls): the
rehearsal proves the wheels and the script, not the timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "scripts" / "gpu-requirements.txt"
IMAGE_PACKAGES = REPO / "scripts" / "gpu-image-packages.txt"
# Import names of packages the GPU machine's image holds (its full list: scripts/gpu-image-packages.txt):
# the setup part imports them to fail early and record versions; never carried.
GPU_IMAGE_PROVIDES = ("torch", "numpy", "h5py", "matplotlib", "safetensors", "huggingface_hub", "tqdm", "pytest",
                      "yaml", "PIL", "requests", "regex", "filelock", "packaging")
# Import names the carried wheels provide.
CARRIED = ("diffusers", "hydra", "omegaconf", "antlr4")
WHEELS_BUDGET_MIB = 7.0  # the pinned wheels measured 6.44 MiB (make gpu-wheels, 2026-12-06); the tree test adds this
OUT_FILES = ("summary.json", "summary.md", "latency_profile.json", "bench.json", "tests.txt", "gpu_check.log",
             "latency_vs_batch.png", "denoiser_vs_k.png")
REPORT_RESERVE_S = 15  # kept back from the budget for writing the results

# Seconds per part: (CUDA full size, CPU smoke). The CUDA column sums to the 450 s budget.
TIMEOUTS = {"setup": (60, 120), "tests": (100, 600), "bench_square": (110, 400), "bench_dp_lowdim": (60, 300),
            "bench_dp_image": (75, 400), "bench_dp_image_bf16": (45, 0)}


def requirements(path: Path = REQUIREMENTS) -> dict[str, str]:
    """``{normalised name: version}`` of the pinned wheels."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            if not version:
                raise ValueError(f"{path}: {line!r} must pin a version (name==version)")
            pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def image_packages(path: Path = IMAGE_PACKAGES) -> set[str]:
    """Normalised names of the distributions the GPU machine's image holds."""
    return {normalise(ln.strip()) for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")}


def travelling_bytes(untracked: bool = True) -> int:
    """Bytes of what a device call copies from this checkout: the tracked files (deleted ones excluded)
    and, with ``untracked``, the untracked files that git does not ignore."""
    which = ["--cached", "--others", "--exclude-standard"] if untracked else ["--cached"]
    listed = subprocess.run(["git", "ls-files", "-z", *which], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    files = {REPO / name for name in listed if name}
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def fetch_wheels(folder: Path, cap_mib: float) -> int:
    """Download the pinned wheels for CPython 3.12 manylinux x86-64 into ``folder`` (building the ones
    PyPI has only as sdists, which must come out pure Python), drop every other wheel there, report the
    sizes, and fail when what travels (tree + wheels) would pass ``cap_mib``."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = requirements()
    platforms = [a for p in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
                 for a in ("--platform", p)]
    for name, version in pins.items():
        have = [w for w in folder.glob("*.whl") if normalise(w.name.split("-")[0]) == name]
        if any(w.name.split("-")[1] == version for w in have):
            continue
        spec = f"{name}=={version}"
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), spec]
        if subprocess.run(download, capture_output=True).returncode != 0:
            print(f"{spec}: no wheel for CPython 3.12 on PyPI, building one (it must be pure Python)")
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder), spec], check=True)
    for wheel in folder.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        if pins.get(normalise(name)) != version:
            print(f"removing {wheel.name} (not pinned in {REQUIREMENTS.name})")
            wheel.unlink()
    wheels = wheel_files(folder, pins)
    impure = [w.name for w in wheels if not w.name.endswith("-py3-none-any.whl")
              and "cp312" not in w.name and "abi3" not in w.name]
    if impure:
        raise SystemExit(f"wheels built for this machine's Python, not for the GPU's 3.12: {impure}")
    total = sum(w.stat().st_size for w in wheels)
    if total > WHEELS_BUDGET_MIB * 2**20:
        print(f"note: the wheels ({total / 2**20:.2f} MiB) outgrew WHEELS_BUDGET_MIB ({WHEELS_BUDGET_MIB}), which "
              f"tests/test_gpu_check.py adds to the tracked tree: raise it", file=sys.stderr)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    tree = travelling_bytes()
    travelling = tree + total
    print(f"{total / 2**20:8.2f} MiB  wheels in all ({len(wheels)})")
    print(f"{tree / 2**20:8.2f} MiB  working tree that travels (tracked + untracked-not-ignored files)")
    print(f"{travelling / 2**20:8.2f} MiB  travels to the GPU machine (cap here {cap_mib:g} MiB; the machine's limit is 64)")
    if travelling > cap_mib * 2**20:
        print(f"FAILED: {travelling / 2**20:.2f} MiB would travel, over the {cap_mib:g} MiB cap", file=sys.stderr)
        return 1
    return 0


def provided_distributions() -> tuple[set[str], dict]:
    """(names, installed): the distributions installed in the running interpreter that the GPU image
    holds, closed over their installed dependencies (the image's packages come with theirs, in the
    versions the image's releases need), and every installed distribution by normalised name."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    installed = {normalise(d.metadata["Name"]): d for d in metadata.distributions()}
    chosen, todo = set(), [n for n in image_packages() if n in installed]
    while todo:
        name = todo.pop()
        if name in chosen:
            continue
        chosen.add(name)
        for text in installed[name].requires or []:
            req = Requirement(text)
            if (req.marker is None or req.marker.evaluate({"extra": ""})) and normalise(req.name) in installed:
                todo.append(normalise(req.name))
    return chosen, installed


def make_rehearsal_venv(target: Path) -> int:
    """A clean venv at ``target`` holding what the GPU machine's image holds (``provided_distributions``,
    linked from the running interpreter's installs: torch, numpy, ...), and nothing else: the check then
    installs the wheels into it as on the GPU, so a package missing from the wheel list fails the rehearsal."""
    import shutil

    chosen, installed = provided_distributions()
    if target.exists():
        shutil.rmtree(target)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    site = target / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    linked = set()
    for name in sorted(chosen):
        dist = installed[name]
        for file in dist.files or []:
            top = file.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth") or top in linked:
                continue
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
                linked.add(top)
    print(f"rehearsal venv {target}: {len(chosen)} distributions of the GPU image's list, linked from "
          f"{Path(sys.prefix)}; not on the image's list, not linked: "
          f"{', '.join(sorted(set(installed) - chosen)[:12])} ...")
    return 0


def wheel_files(folder: Path, pins: dict[str, str]) -> list[Path]:
    """The one wheel per pin in ``folder``; ValueError naming what is missing or doubled."""
    found: dict[str, list[Path]] = {}
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        found.setdefault(normalise(name), []).append(wheel)
        if normalise(name) in pins and version != pins[normalise(name)]:
            raise ValueError(f"{wheel.name}: {pins[normalise(name)]} is pinned; run make gpu-wheels")
    missing = sorted(set(pins) - set(found))
    extra = sorted(set(found) - set(pins))
    doubled = sorted(name for name, files in found.items() if len(files) > 1)
    if missing or extra or doubled:
        raise ValueError(f"{folder}: wheels missing {missing}, not pinned {extra}, doubled {doubled}; "
                         f"run make gpu-wheels")
    return [found[name][0] for name in pins]


def link_package(site: Path) -> None:
    """``site/parapolicy``: the checkout's package, with ``envs/`` as ``parapolicy.envs`` and ``conf/`` as
    ``parapolicy.conf`` (pyproject's package-dir), as links, so paths resolve into the checkout."""
    package = site / "parapolicy"
    package.mkdir(parents=True)
    for child in (REPO / "parapolicy").iterdir():
        if child.name != "__pycache__":
            (package / child.name).symlink_to(child)
    for name in ("envs", "conf"):
        (package / name).symlink_to(REPO / name)


# ------------------------------------------------------------------------------------------ parts
class Check:
    def __init__(self, args, work: Path):
        self.args = args
        self.work = work
        self.site = work / "site"
        self.out = args.out
        self.started = time.monotonic()
        self.parts: dict[str, dict] = {}
        self.log = open(self.out / "gpu_check.log", "w")
        self.env = {**os.environ, "PYTHONPATH": str(self.site), "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1",
                    "HYDRA_FULL_ERROR": "1", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started) - REPORT_RESERVE_S

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def run(self, part: str, command: list[str], timeout_s: float, shown: str | None = None) -> tuple[str, str]:
        """Run one part in its own process group; on timeout kill the group. Returns (status, output)."""
        timeout_s = max(1.0, min(timeout_s, self.remaining()))
        shown = shown or " ".join(shlex.quote(c) for c in command)
        self.say(f"\n=== {part} (timeout {timeout_s:.0f} s): {shown}")
        start = time.monotonic()
        proc = subprocess.Popen(command, cwd=self.work, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            status = "timeout"
        seconds = time.monotonic() - start
        self.log.write(output)
        self.parts[part] = {"status": status, "rc": proc.returncode, "seconds": round(seconds, 1),
                            "timeout_s": round(timeout_s), "command": shown}
        self.say(f"=== {part}: {status} in {seconds:.1f} s (rc {proc.returncode})")
        if status != "passed":
            print("\n".join(output.splitlines()[-25:]), flush=True)
        return status, output

    def skip(self, part: str, why: str) -> None:
        self.parts[part] = {"status": "skipped", "why": why}
        self.say(f"\n=== {part}: skipped ({why})")

    # -------------------------------------------------------------------------------------- setup
    def setup(self) -> dict:
        pins = requirements()
        try:
            wheels = wheel_files(self.args.wheels, pins)
        except ValueError as err:
            self.parts["setup"] = {"status": "failed", "why": str(err)}
            self.say(f"=== setup: failed: {err}")
            return {}
        self.say(f"wheels: {', '.join(w.name for w in wheels)} "
                 f"({sum(w.stat().st_size for w in wheels) / 2**20:.2f} MiB)")
        install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--disable-pip-version-check", "--target", str(self.site), *map(str, wheels)]
        status, _ = self.run("setup", install, TIMEOUTS["setup"][self.column])
        if status != "passed":
            return {}
        link_package(self.site)
        probe = ("import importlib, json, platform, sys, torch\n"
                 f"names = {list(GPU_IMAGE_PROVIDES + CARRIED)!r}\n"
                 "versions, missing = {}, []\n"
                 "for name in names:\n"
                 "    try:\n"
                 "        versions[name] = getattr(importlib.import_module(name), '__version__', '?')\n"
                 "    except Exception as err:\n"
                 "        missing.append(f'{name}: {type(err).__name__}: {err}')\n"
                 "import parapolicy.bench, parapolicy.conf, parapolicy.policy, parapolicy.samplers\n"
                 "cuda = torch.cuda.is_available()\n"
                 "print('PROBE ' + json.dumps({'python': sys.version.split()[0], 'platform': platform.platform(),\n"
                 "    'versions': versions, 'missing': missing, 'cuda_available': cuda,\n"
                 "    'cuda_version': torch.version.cuda, 'cudnn': torch.backends.cudnn.version() if cuda else None,\n"
                 "    'gpu': torch.cuda.get_device_name(0) if cuda else None,\n"
                 "    'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,\n"
                 "    'parapolicy': parapolicy.__file__}))\n"
                 "sys.exit(1 if missing else 0)\n")
        status, output = self.run("imports", [sys.executable, "-c", probe], 90,
                                  shown=f"{sys.executable} -c <import {', '.join(GPU_IMAGE_PROVIDES + CARRIED)}, parapolicy>")
        line = next((ln for ln in output.splitlines() if ln.startswith("PROBE ")), None)
        info = json.loads(line[len("PROBE "):]) if line else {}
        if status == "passed" and self.args.device == "cuda" and not info.get("cuda_available"):
            self.parts["imports"]["status"] = "failed"
            self.say("=== imports: torch sees no CUDA device (--device cpu rehearses on the CPU)")
        return info

    @property
    def column(self) -> int:
        return 0 if self.args.device == "cuda" else 1

    # -------------------------------------------------------------------------------------- tests
    def tests(self) -> dict:
        command = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--rootdir={REPO}",
                   str(REPO / "tests" / "test_cuda.py"), str(REPO / "tests" / "test_accel.py")]
        status, output = self.run("tests", command, TIMEOUTS["tests"][self.column])
        (self.out / "tests.txt").write_text(f"$ {self.parts['tests']['command']}\n{output}")
        counts = {}
        for key in ("passed", "failed", "skipped", "error", "errors"):
            found = re.findall(rf"(\d+) {key}\b", output.splitlines()[-1] if output.strip() else "")
            if found:
                counts["errors" if key == "error" else key] = int(found[-1])
        return counts

    # -------------------------------------------------------------------------------------- bench
    def bench_parts(self) -> list[tuple[str, list[str]]]:
        """(part, overrides) per bench run at this size."""
        smoke = self.args.size == "smoke"
        device = [f"device={self.args.device}", "obs_source=random", "progress_bar=false", "plots=false"]
        if self.args.device == "cpu":
            device.append("torch_threads=1")
        square = ["preset=quick", "checkpoint=" + str(REPO / "checkpoints" / "square"),
                  "samplers=[ddpm,paraddpm,ddim@10,paraddim]", "batch_sizes=[1,8]", "fast_path=both"]
        dp = ["samplers=[ddpm,paraddpm]", "batch_sizes=[1,8]", "fast_path=both", "repetitions=5", "warmup=1",
              "windows=[]", "denoiser.k=[1,4,16,32]", "denoiser.repetitions=5", "denoiser.warmup=1"]
        if smoke:  # toy length: every code path, no timing worth reading
            square += ["num_inference_steps=6", "repetitions=1", "warmup=0", "windows=[4]", "batch_sizes=[1,2]",
                       "denoiser.k=[1,4]", "denoiser.repetitions=1", "denoiser.warmup=0"]
            dp += ["num_inference_steps=4", "repetitions=1", "warmup=0", "batch_sizes=[1]", "denoiser.k=[1,2]",
                   "denoiser.repetitions=1", "denoiser.warmup=0"]
        parts = [("bench_square", square + device), ("bench_dp_lowdim", dp + ["network=dp_lowdim"] + device),
                 ("bench_dp_image", dp + ["network=dp_image"] + device)]
        if self.args.device == "cuda":
            bf16 = [o for o in dp if not o.startswith("fast_path=")] + ["fast_path=on", "+fast_path_options.dtype=bfloat16"]
            parts.append(("bench_dp_image_bf16", bf16 + ["network=dp_image", "denoiser.k=[1,16]"] + device))
        return parts

    def bench(self, part: str, overrides: list[str]) -> tuple[dict | None, str]:
        out = self.work / part
        command = [sys.executable, "-m", "parapolicy.bench", *overrides, f"out={out}",
                   f"hydra.run.dir={self.work / 'hydra' / part}"]
        status, output = self.run(part, command, TIMEOUTS[part][self.column])
        result = None
        if (out / "bench.json").is_file():
            result = json.loads((out / "bench.json").read_text())
        return result, output


# ------------------------------------------------------------------------------------------ results
def default_mode(device: str) -> str:
    """The fast-path mode the eval uses by default there (fast_path=auto: on for CUDA, off on CPU)."""
    return "on" if device == "cuda" else "off"


def latency_profile(results: dict[str, dict], device: str, meta: dict) -> dict:
    """The per-call latencies of every batch-1 row: ``<label>`` in the eval's default mode on that device,
    and ``<label>+fast`` / ``<label>+eager`` explicitly; DP-size networks prefixed ``<network>/``."""
    runs = {}
    for part, result in results.items():
        if not result:
            continue
        prefix = "" if part == "bench_square" else part.removeprefix("bench_") + "/"
        for row in result.get("samplers", []) + result.get("windows", []):
            if row["batch"] != 1 or not row.get("latencies_ms"):
                continue
            base = row["base_label"]
            entry = {"latency_ms": row["latencies_ms"], "p50": row["latency_ms"]["p50"], "p95": row["latency_ms"]["p95"],
                     "n": row["latency_ms"]["n"], "sampler": row["sampler"], "steps": row["steps"], "batch": 1,
                     "fast_path": row["fast_path"], "rounds_mean": row["rounds_mean"],
                     "network": result["meta"].get("network", {}).get("name", "checkpoint"),
                     "fast_path_dtype": ((result["meta"].get("fast_path") or {}).get("dtype")
                                         if row["fast_path"] == "on" else None)}
            runs[f"{prefix}{base}{'+fast' if row['fast_path'] == 'on' else '+eager'}"] = entry
            if row["fast_path"] == default_mode(device) or part == "bench_dp_image_bf16":
                runs[f"{prefix}{base}"] = entry
    return {"device": meta["device"], "date": meta["date"], "command": meta["command"],
            "note": "runs: per-call predict_action latency at batch 1, ms. <label>: the eval's default fast-path "
                    "mode on this device; +fast / +eager: that mode. <network>/: Diffusion Policy-size U-Nets with "
                    "random weights. Observations: random over the normaliser's range.",
            "runs": runs}


def summary_markdown(summary: dict, outputs: dict[str, str]) -> str:
    lines = [f"# GPU check: {summary['device']}", "",
             f"{summary['date']}, `{summary['command']}`, git {summary.get('git_commit') or '?'}, "
             f"size {summary['size']}, {summary['total_s']:.0f} s in all", "",
             "| part | status | seconds | timeout |", "|---|---|---|---|"]
    for part, info in summary["parts"].items():
        lines.append(f"| {part} | {info['status']} | {info.get('seconds', '-')} | {info.get('timeout_s', '-')} |")
    if summary.get("tests"):
        lines += ["", "tests: " + ", ".join(f"{v} {k}" for k, v in summary["tests"].items())]
    if summary.get("headline"):
        lines += ["", "| network | sampler | batch | best | ms | fastest twin | ms | speedup |", "|---|---|---|---|---|---|---|---|"]
        for h in summary["headline"]:
            lines.append(f"| {h['network']} | {h['sampler']} | {h['batch']} | {h['best']} | {h['best_p50_ms']:.2f} | "
                         f"{h['fastest_twin']} | {h['fastest_twin_p50_ms']:.2f} | {h['speedup']:.2f}x |")
    for part, output in outputs.items():
        printed = output.splitlines()
        # the bench prints its tables after a line naming the checkpoint, device and observations
        start = next((i for i, ln in enumerate(printed) if " checkpoint " in ln and "observations:" in ln), 0)
        lines += ["", f"## {part}", "", "```", "\n".join(printed[start:])[-12000:].strip(), "```"]
    return "\n".join(lines) + "\n"


def write_plots(results: dict[str, dict], out: Path, site: Path) -> list[str]:
    """latency_vs_batch.png (Square's sampler rows) and denoiser_vs_k.png (every network's curve)."""
    sys.path.insert(0, str(site))
    from parapolicy.bench.plots import make_plots

    square = results.get("bench_square") or {}
    denoiser = []
    for part, result in results.items():
        for row in (result or {}).get("denoiser", []):
            name = "square" if row["network"] == "checkpoint" else row["network"]
            denoiser.append({**row, "network": name + ("+bf16" if part.endswith("_bf16") else "")})
    return make_plots({"samplers": square.get("samplers", []), "windows": [], "denoiser": denoiser}, out)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu_check")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", choices=("full", "smoke"), default=None, help="default: full on CUDA, smoke on CPU")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl")
    parser.add_argument("--budget-s", type=float, default=None, help="whole check (default: 450 on CUDA, 2400 on CPU)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out (e.g. tests)")
    parser.add_argument("--fetch-wheels", action="store_true",
                        help="instead of the check: download the pinned wheels into --wheels (make gpu-wheels)")
    parser.add_argument("--cap-mib", type=float, default=60.0, help="--fetch-wheels fails above this travelling size")
    parser.add_argument("--make-venv", type=Path, default=None, metavar="DIR",
                        help="instead of the check: build the rehearsal's clean venv (make gpu-check DEVICE=cpu)")
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.wheels, args.cap_mib)
    if args.make_venv:
        return make_rehearsal_venv(args.make_venv)
    args.size = args.size or ("full" if args.device == "cuda" else "smoke")
    args.budget_s = args.budget_s or (450.0 if args.device == "cuda" else 2400.0)
    args.out = args.out.resolve()
    args.wheels = args.wheels.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in OUT_FILES:
        (args.out / stale).unlink(missing_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    command = " ".join(["python3 scripts/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    with tempfile.TemporaryDirectory(prefix="parapolicy-gpu-check-") as tmp:
        check = Check(args, Path(tmp))
        check.say(f"gpu check: device {args.device}, size {args.size}, budget {args.budget_s:.0f} s, out {args.out}")
        info = check.setup()
        ready = all(check.parts.get(p, {}).get("status") == "passed" for p in ("setup", "imports"))
        tests, results, outputs = {}, {}, {}
        if not ready:
            for part in ["tests"] + [p for p, _ in check.bench_parts()]:
                check.skip(part, "setup failed")
        else:
            if "tests" in skip:
                check.skip("tests", "--skip")
            else:
                tests = check.tests()
            for part, overrides in check.bench_parts():
                if part in skip:
                    check.skip(part, "--skip")
                    continue
                if TIMEOUTS[part][check.column] <= 0:
                    continue
                if check.remaining() < 10:
                    check.skip(part, "budget spent")
                    continue
                results[part], outputs[part] = check.bench(part, overrides)

        device = info.get("gpu") or (f"cpu ({info.get('platform', '?')})" if info else args.device)
        headline = []
        for part, result in results.items():
            for h in (result or {}).get("headline", []):
                if h.get("speedup") is not None and h["phase"] == "samplers":
                    headline.append({"network": part.removeprefix("bench_"), **h})
        summary = {"device": device, "device_type": args.device, "date": date, "command": command,
                   "git_commit": git_commit(), "size": args.size, "budget_s": args.budget_s, "environment": info,
                   "wheels": sorted(p.name for p in args.wheels.glob("*.whl")), "parts": check.parts,
                   "tests": tests, "headline": headline}
        meta = {"device": device, "date": date, "command": command}
        (args.out / "bench.json").write_text(json.dumps({**meta, "parts": results}, indent=1))
        profile = latency_profile(results, args.device, meta)
        (args.out / "latency_profile.json").write_text(json.dumps(profile, indent=1))
        try:
            written = write_plots(results, args.out, check.site) if results else []
        except Exception as err:  # a plot must not cost the numbers
            written = []
            check.say(f"plots failed: {type(err).__name__}: {err}")
        summary["total_s"] = round(time.monotonic() - check.started, 1)
        summary["files"] = ["summary.json", "summary.md", "latency_profile.json", "bench.json", "gpu_check.log"] + \
            (["tests.txt"] if (args.out / "tests.txt").exists() else []) + written
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
        (args.out / "summary.md").write_text(summary_markdown(summary, outputs))
        failed = [name for name, p in check.parts.items() if p["status"] not in ("passed", "skipped")]
        check.say(f"\ngpu check {'FAILED: ' + ', '.join(failed) if failed else 'passed'} in "
                  f"{summary['total_s']:.0f} s; {len(summary['files'])} files in {args.out}")
        check.log.close()
    extra = sorted(set(p.name for p in args.out.iterdir()) - set(OUT_FILES))
    if extra:
        print(f"note: {args.out} also holds {extra} from elsewhere", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
