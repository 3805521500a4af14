"""Demonstration collection: the HDF5 layout, the CLI, and its failure modes."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from parapolicy import collect as collect_mod
from parapolicy.collect import check_output_path, collect_demos


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "parapolicy.collect", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_collect_cli_writes_robomimic_layout(tmp_path):
    out = tmp_path / "lift.hdf5"
    proc = run_cli("env=lift", "n_demos=2", f"out={out}", "seed=77", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "collected 2/2 successful episodes" in proc.stdout
    with h5py.File(out) as f:
        data = f["data"]
        assert sorted(data.keys()) == ["demo_0", "demo_1"]
        assert data.attrs["n_success"] == 2 and data.attrs["n_attempts"] == 2
        env_args = json.loads(data.attrs["env_args"])
        assert env_args["env_name"] == "Lift" and env_args["env_kwargs"]["control_freq"] == 20
        total = 0
        for name in ("demo_0", "demo_1"):
            demo = data[name]
            n = demo["actions"].shape[0]
            total += n
            assert demo["actions"].shape == (n, 7) and np.abs(demo["actions"][:]).max() <= 1.0
            assert demo["obs/object"].shape == (n, 10)
            assert demo["obs/robot0_eef_pos"].shape == (n, 3)
            assert demo["states"].shape[0] == n and demo["rewards"].shape == (n,) and demo["dones"].shape == (n,)
            assert demo["dones"][-1] == 1
        assert data.attrs["total"] == total


def test_collect_is_deterministic_for_a_seed(tmp_path):
    a = collect_demos("lift", 1, tmp_path / "a.hdf5", seed=31, progress=False)
    b = collect_demos("lift", 1, tmp_path / "b.hdf5", seed=31, progress=False)
    assert a["n_success"] == b["n_success"] == 1
    with h5py.File(tmp_path / "a.hdf5") as fa, h5py.File(tmp_path / "b.hdf5") as fb:
        np.testing.assert_array_equal(fa["data/demo_0/actions"][:], fb["data/demo_0/actions"][:])
        np.testing.assert_array_equal(fa["data/demo_0/states"][:], fb["data/demo_0/states"][:])


def test_interrupted_collection_leaves_no_file(tmp_path, monkeypatch):
    from parapolicy.envs import experts

    calls = {"n": 0}
    real_rollout = experts.rollout

    def flaky_rollout(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(experts, "rollout", flaky_rollout)
    out = tmp_path / "lift.hdf5"
    with pytest.raises(KeyboardInterrupt):
        collect_mod.collect_demos("lift", 3, out, seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its temporary file


def test_bad_output_paths_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="expected a .hdf5 file path"):
        check_output_path(tmp_path / "demos.txt")
    (tmp_path / "dir.hdf5").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        check_output_path(tmp_path / "dir.hdf5")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_output_path(tmp_path / "file" / "demos.hdf5")


def test_cli_rejects_unknown_env_and_bad_out(tmp_path):
    proc = run_cli("env=sqaure", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "Could not find 'env/sqaure'" in proc.stderr and "square" in proc.stderr
    proc = run_cli("env=lift", f"out={tmp_path}/demos.txt", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "expected a .hdf5 file path" in proc.stderr
    with pytest.raises(ValueError, match="n_demos must be >= 1"):
        collect_demos("lift", 0, tmp_path / "x.hdf5")
