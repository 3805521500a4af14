"""The GPU check's cheap part, run by CI (the rest is `make gpu-wheels && make gpu-check DEVICE=cpu`).

scripts/gpu_check.py compiles; its wheel list (scripts/gpu-requirements.txt) covers every package the
check imports beyond the GPU image's own (scripts/gpu-image-packages.txt) and satisfies pyproject; and
the tracked tree plus the wheels stays under the 60 MiB cap (the device copies at most 64 MiB).
"""

import importlib.util
import json
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
CAP_MIB = 60


@pytest.fixture(scope="module")
def gpu_check():
    py_compile.compile(str(SCRIPT), doraise=True)
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_fits_the_window(gpu_check):
    """At most 8 result files; the CUDA parts' timeouts fit the 450 s budget, inside 8 minutes."""
    assert len(gpu_check.OUT_FILES) <= 8
    assert sum(cuda for cuda, _ in gpu_check.TIMEOUTS.values()) <= 450 < 8 * 60


def test_pins_are_wheels_that_satisfy_pyproject(gpu_check):
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pins = gpu_check.requirements()
    assert {"diffusers", "hydra_core", "omegaconf", "antlr4_python3_runtime"} <= set(pins)
    declared = {gpu_check.normalise(Requirement(r).name): Requirement(r)
                for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name, version in pins.items():
        if name in declared:
            assert declared[name].specifier.contains(version), (name, version, str(declared[name].specifier))
    image = gpu_check.image_packages()
    assert {"torch", "numpy", "h5py", "pytest"} <= image and not set(pins) & image  # carried only when missing


def test_wheel_list_covers_what_the_check_imports(gpu_check):
    """Import what the check's parts import (the bench CLI and library, the CUDA tests' modules); every
    third-party distribution that ends up loaded is the GPU image's (or a dependency of one) or pinned."""
    code = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "import parapolicy.bench.__main__, parapolicy.bench.run, parapolicy.bench.plots, parapolicy.accel\n"
        "import parapolicy.policy, parapolicy.samplers, parapolicy.configs, parapolicy.devices\n"
        "import policy_synthetic, pytest, matplotlib.pyplot, tqdm, hydra.core.hydra_config\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = set(json.loads(proc.stdout.splitlines()[-1]))
    import importlib.metadata as metadata

    owners = metadata.packages_distributions()
    provided, _ = gpu_check.provided_distributions()
    allowed = provided | set(gpu_check.requirements()) | {"parapolicy"}
    loaded = {gpu_check.normalise(dist) for m in modules - set(sys.stdlib_module_names) for dist in owners.get(m, [])}
    assert {"diffusers", "hydra_core", "omegaconf", "torch"} <= loaded  # the probe really imported the check's stack
    missing = sorted(loaded - allowed)
    assert not missing, f"imported by the check, neither on the GPU image nor in scripts/gpu-requirements.txt: {missing}"


def test_tracked_tree_plus_wheels_stays_under_the_cap(gpu_check):
    """The tracked tree (what a device call copies from a clean clone) plus the wheels' budget stays under
    60 MiB; `make gpu-wheels` checks the same with the real wheels and untracked files too."""
    tree = gpu_check.travelling_bytes(untracked=False) / 2**20
    assert tree + gpu_check.WHEELS_BUDGET_MIB <= CAP_MIB, (
        f"{tree:.2f} MiB of tree + {gpu_check.WHEELS_BUDGET_MIB} MiB of wheels would travel, over {CAP_MIB} MiB")
