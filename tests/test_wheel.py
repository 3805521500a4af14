"""The package as a new user gets it: build the wheel, install it into a fresh environment, use it from
another directory with the checkout nowhere on ``sys.path``.

The fresh venv sees the test venv's third-party packages through a ``.pth`` line (torch, robosuite, ...:
no downloads); a path in a ``.pth`` file is not itself scanned for ``.pth`` files, so the checkout's
editable install stays invisible and only the wheel provides ``parapolicy``. Checked: every module
imports, ``conf/`` and the shipped checkpoints are found (``load_policy("square")``), the top-level
names exist, and ``python -m parapolicy.eval env=square n_episodes=1`` runs an episode (shortened).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
# what a build reads: the source tree without environments, outputs and caches
IGNORED = shutil.ignore_patterns(".git", ".venv", "outputs", "multirun", "site", ".mutants", "build", "*.egg-info",
                                 "data", "wandb", ".whl", "__pycache__", ".pytest_cache", "runs", "logs", ".gl")

IMPORT_EVERYTHING = r"""
import importlib, json, pkgutil, sys
checkout = sys.argv[1]
assert checkout not in sys.path and "" not in sys.path[1:], sys.path  # the checkout is not on the path
import parapolicy
failed = {}
names = ["parapolicy"] + [m.name for m in pkgutil.walk_packages(parapolicy.__path__, "parapolicy.")]
for name in names:
    try:
        module = importlib.import_module(name)
    except Exception as err:
        failed[name] = f"{type(err).__name__}: {err}"
        continue
    if getattr(module, "__file__", None) and not module.__file__.startswith(sys.prefix):
        failed[name] = f"not imported from the installed wheel: {module.__file__}"
policy = parapolicy.load_policy("square", sampler="ddim", num_inference_steps=2)
print(json.dumps({"file": parapolicy.__file__, "modules": names, "failed": failed,
                  "async_policy": parapolicy.AsyncPolicy.__module__, "env": policy.config.env,
                  "samplers": __import__("parapolicy.configs", fromlist=["x"]).available_samplers()}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv holding the wheel, a working directory outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=IGNORED)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(source), "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp / "dist").glob("parapolicy-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return python, elsewhere, wheel


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    return env


def test_the_wheel_ships_the_packages_configs_and_checkpoints(installed):
    *_, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"parapolicy/{p.relative_to(ROOT / 'parapolicy')}" for p in (ROOT / "parapolicy").rglob("*.py")}
    assert sources <= names, sorted(sources - names)  # every module of the source tree, found automatically
    assert {"parapolicy/envs/robosuite_env.py", "parapolicy/conf/eval.yaml", "parapolicy/conf/sampler/paraddpm.yaml",
            "parapolicy/checkpoints/square/config.json", "parapolicy/checkpoints/square/model.safetensors"} <= names


def test_every_module_imports_from_the_installed_wheel(installed):
    python, elsewhere, _ = installed
    done = subprocess.run([str(python), "-c", IMPORT_EVERYTHING, str(ROOT)], cwd=elsewhere, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["failed"], result["failed"]
    assert not result["file"].startswith(str(ROOT)) and "site-packages" in result["file"]
    assert {"parapolicy.realtime", "parapolicy.realtime.schedule", "parapolicy.serving.client", "parapolicy.envs",
            "parapolicy.policy.accel"} <= set(result["modules"])
    assert result["async_policy"] == "parapolicy.realtime.async_policy" and result["env"] == "square"
    assert "paraddpm" in result["samplers"]


def test_the_eval_runs_an_episode_from_another_directory(installed):
    python, elsewhere, _ = installed
    out = elsewhere / "run"
    command = [str(python), "-m", "parapolicy.eval", "env=square", "n_episodes=1", "baseline=null",
               "max_episode_steps=16", "progress_bar=false", "torch_threads=1", f"hydra.run.dir={out}"]
    done = subprocess.run(command, cwd=elsewhere, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    episodes = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines() if line.strip()]
    assert len(episodes) == 1 and episodes[0]["length"] == 16 and episodes[0]["calls"], episodes
    assert summary["sampler_label"]
