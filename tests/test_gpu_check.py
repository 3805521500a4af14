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


def probe_imports(blocked=()) -> tuple[int, set, str]:
    """(exit status, top-level modules loaded, stderr) of importing what the check's parts import (the
    bench CLI and library, the CUDA tests' modules), with ``blocked`` modules made unimportable."""
    code = (
        "import sys, json\n"
        f"for name in {sorted(blocked)!r}:\n"
        "    sys.modules[name] = None  # import raises ModuleNotFoundError, as if not installed\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "import parapolicy.bench.__main__, parapolicy.bench.run, parapolicy.bench.plots, parapolicy.policy.accel\n"
        "import parapolicy.policy, parapolicy.samplers, parapolicy.configs, parapolicy.devices\n"
        "import policy_synthetic, pytest, matplotlib.pyplot, tqdm, hydra.core.hydra_config\n"
        "print(json.dumps(sorted({m.split('.')[0] for m, v in sys.modules.items() if v is not None})))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
    modules = set(json.loads(proc.stdout.splitlines()[-1])) if proc.returncode == 0 else set()
    return proc.returncode, modules, proc.stderr


def test_wheel_list_covers_what_the_check_imports(gpu_check):
    """Every third-party distribution that the check's imports load is the GPU image's (or a dependency of
    one) or pinned; one outside both may only be an optional import (``try: import x``): with it made
    unimportable, the same imports still succeed."""
    import importlib.metadata as metadata

    status, modules, stderr = probe_imports()
    assert status == 0, stderr[-2000:]
    owners = metadata.packages_distributions()
    provided, _ = gpu_check.provided_distributions()
    allowed = provided | set(gpu_check.requirements()) | {"parapolicy"}
    loaded = {m: {gpu_check.normalise(d) for d in owners.get(m, [])} for m in modules - set(sys.stdlib_module_names)}
    assert {"diffusers", "hydra_core", "omegaconf", "torch"} <= set().union(*loaded.values())  # the probe really ran
    outside = sorted(m for m, dists in loaded.items() if dists and not dists & allowed)
    if outside:  # e.g. torch's `import dill` and anyio's `import sniffio`, both inside try/except ImportError
        status, _, stderr = probe_imports(blocked=outside)
        assert status == 0, (f"the check needs {outside} (neither on the GPU image nor in "
                             f"scripts/gpu-requirements.txt):\n{stderr[-2000:]}")


def test_tracked_tree_plus_wheels_stays_under_the_cap(gpu_check):
    """The tracked tree (what a device call copies from a clean clone) plus the wheels' budget stays under
    60 MiB; `make gpu-wheels` checks the same with the real wheels and untracked files too."""
    tree = gpu_check.travelling_bytes(untracked=False) / 2**20
    assert tree + gpu_check.WHEELS_BUDGET_MIB <= CAP_MIB, (
        f"{tree:.2f} MiB of tree + {gpu_check.WHEELS_BUDGET_MIB} MiB of wheels would travel, over {CAP_MIB} MiB")
