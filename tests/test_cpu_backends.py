"""The OpenVINO and ONNX Runtime fast-path backends (parapolicy.policy.accel_runtimes): a missing library is
skipped with a note, exported graphs are cached on disk and not reused once the weights (or a library
version) change, and a runtime whose output differs from eager's is dropped (also in test_accel's
test_inexact_backend_is_dropped, for every backend).

Tests of a runtime skip where it is not installed (``pip install parapolicy[openvino]`` / ``[onnx]``);
the missing-library tests run everywhere.
"""

import sys
import warnings

import pytest
import torch

from parapolicy.policy import accel_runtimes
from parapolicy.policy.accel import FastPath
from parapolicy.policy.accel_runtimes import RUNTIMES, missing
from policy_synthetic import OBS_DIM, tiny_policy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARAPOLICY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "fast_path"


def plan(policy, seed=1, batch=2):
    obs = torch.randn(batch, 2, OBS_DIM, generator=torch.Generator().manual_seed(seed))
    return policy.predict_action(obs, generator=torch.Generator().manual_seed(seed))


def runtime_params():
    return [pytest.param(name, marks=pytest.mark.skipif(missing(name) is not None, reason=str(missing(name))))
            for name in RUNTIMES]


@pytest.mark.parametrize("name", RUNTIMES)
def test_missing_library_is_skipped_with_a_note(monkeypatch, name):
    """A runtime that does not import (here: hidden from the import system) is skipped with a note, no
    warning and no error; the plan is eager's, bit for bit, and "auto" still picks among the rest."""
    for module in ("openvino", "onnxruntime", "onnx"):
        monkeypatch.setitem(sys.modules, module, None)  # `import onnx` now raises ImportError
    policy = tiny_policy()
    policy.set_sampler("ddpm", 4)
    reference = plan(policy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped extra warns nothing
        policy.enable_fast_path(backend=name)
        forced = plan(policy)
        notes = policy.fast_path.stats.notes
        assert policy.fast_path.stats.backends == {"K1xB2": "eager"}
        assert any(note.startswith(f"{name} skipped") and "pip install" in note for note in notes)
        assert torch.equal(forced["action_pred"], reference["action_pred"])
        policy.enable_fast_path(backend="auto")
        plan(policy)
    stats = policy.fast_path.stats
    assert stats.backends["K1xB2"] in ("eager", "trace")
    assert all(stats.candidates_ms["K1xB2"][n] is None for n in RUNTIMES)
    assert sorted(note.split()[0] for note in stats.notes) == sorted(RUNTIMES)  # one note each, not per shape


@pytest.mark.parametrize("name", runtime_params())
def test_runtime_matches_eager_and_reuses_its_cache(cache, name):
    """A second fast path on the same weights reads the exported graphs from the disk cache (no export),
    and both give eager's plan within atol."""
    policy = tiny_policy()
    policy.set_sampler("paraddpm", 10, window=4, tolerance=0.1)
    reference = plan(policy)
    policy.enable_fast_path(backend=name)
    first = plan(policy)
    fast = policy.fast_path
    assert set(fast.stats.backends.values()) == {name} and fast.runtimes.exports == 2 and fast.runtimes.hits == 0
    assert len(list((cache / "onnx").glob("*.onnx"))) == 2  # K1 and K4
    policy.enable_fast_path(backend=name)
    second = plan(policy)
    assert policy.fast_path.runtimes.exports == 0 and policy.fast_path.runtimes.hits == 2
    for out in (first, second):
        assert out["rounds"] == reference["rounds"]
        torch.testing.assert_close(out["action_pred"], reference["action_pred"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", runtime_params())
def test_cache_is_not_reused_once_the_weights_change(cache, name):
    """Weights changed in place, or other weights loaded into a new policy object: a new export,
    the runtime still used (a stale graph would fail the check against eager and be dropped), and
    the plan follows the new weights."""
    policy = tiny_policy()
    policy.set_sampler("ddpm", 4)
    policy.enable_fast_path(backend=name)
    plan(policy)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.mul_(1.1)
    changed = plan(policy)
    fast = policy.fast_path
    assert fast.runtimes.exports == 2 and fast.stats.backends == {"K1xB2": name} and fast.stats.notes == []
    policy.enable_fast_path(False)
    torch.testing.assert_close(changed["action_pred"], plan(policy)["action_pred"], rtol=0, atol=1e-5)

    other = tiny_policy(seed=3)  # another policy object with other weights, same architecture and shapes
    other.set_sampler("ddpm", 4)
    reference = plan(other)
    other.enable_fast_path(backend=name)
    out = plan(other)
    assert other.fast_path.runtimes.exports == 1 and other.fast_path.stats.backends == {"K1xB2": name}
    torch.testing.assert_close(out["action_pred"], reference["action_pred"], rtol=0, atol=1e-5)
    assert len(list((cache / "onnx").glob("*.onnx"))) == 3


@pytest.mark.parametrize("name", runtime_params())
def test_cache_is_not_reused_across_library_versions(monkeypatch, name):
    policy = tiny_policy()
    policy.set_sampler("ddpm", 4)
    policy.enable_fast_path(backend=name)
    plan(policy)
    versions = accel_runtimes.library_versions
    monkeypatch.setattr(accel_runtimes, "library_versions", lambda *n: {**versions(*n), "torch": "99.0"})
    policy.enable_fast_path(backend=name)
    plan(policy)
    assert policy.fast_path.runtimes.exports == 1 and policy.fast_path.runtimes.hits == 0


def test_bad_thread_count_is_refused():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            FastPath(threads=bad)


def test_bench_backend_modes_and_per_shape_comparison():
    """fast_path_backends adds one forced mode per entry (rows +openvino, +eager-trace) whose jobs pair
    with the twin in the same mode; the comparison names each shape's winner and its margins."""
    from omegaconf import OmegaConf

    from parapolicy.bench.jobs import build_jobs, fast_modes, mode_backend
    from parapolicy.bench.tables import backend_comparison, format_backends

    cpu = torch.device("cpu")
    cfg = OmegaConf.create({"fast_path": "both", "fast_path_backends": [["eager", "trace"], "openvino"]})
    assert fast_modes(cfg, cpu) == ["off", "on", "eager-trace", "openvino"]
    assert mode_backend("eager-trace") == ["eager", "trace"] and mode_backend("openvino") == "openvino"
    with pytest.raises(ValueError, match="fast_path_backends"):
        fast_modes(OmegaConf.create({"fast_path": "off", "fast_path_backends": ["tensorrt"]}), cpu)

    policy = tiny_policy()
    fast = {mode: tiny_policy() for mode in ("on", "openvino")}
    for mode, p in fast.items():
        p.fast_path = FastPath(backend=mode_backend(mode)) if mode != "on" else FastPath()
    bench_cfg = OmegaConf.create({"samplers": ["paraddpm"], "num_inference_steps": 6, "sampler_options": {},
                                  "twins": {}, "windows": []})
    jobs = {job.label: job for job in build_jobs(bench_cfg, policy, [], ("off", "on", "openvino"), fast)["samplers"]}
    assert set(jobs) == {"paraddpm-6", "ddpm-6", "paraddpm-6+fast", "ddpm-6+fast",
                         "paraddpm-6+openvino", "ddpm-6+openvino"}
    assert jobs["paraddpm-6+openvino"].twin == "ddpm-6+openvino" and jobs["paraddpm-6+openvino"].fast == "openvino"
    assert jobs["ddpm-6+openvino"].policy.fast_path is fast["openvino"].fast_path

    stats = fast["on"].fast_path.stats
    stats.backends = {"K1xB1": "openvino", "K4xB1": "trace"}
    stats.candidates_ms = {"K1xB1": {"eager": 9.0, "openvino": 3.0, "onnxruntime": 4.5, "trace": None},
                           "K4xB1": {"eager": 10.0, "trace": 8.0}}
    rows = {row["shape"]: row for row in backend_comparison({"on": fast["on"].fast_path})}
    assert rows["K1xB1"]["vs_eager"] == pytest.approx(3.0) and rows["K1xB1"]["vs_runner_up"] == pytest.approx(1.5)
    assert rows["K4xB1"]["vs_eager"] == pytest.approx(1.25) and rows["K4xB1"]["vs_runner_up"] == pytest.approx(1.25)
    table = format_backends(list(rows.values()))
    assert "3.00x" in table and "1.50x" in table


def test_eval_auto_runs_openvino_on_cpu(monkeypatch):
    """The eval's fast_path=auto: on CPU, OpenVINO forced (the same backend in every process) where it
    is installed; without it, and on CUDA, "auto" as before; on / off untouched."""
    from parapolicy.policy.accel import eval_fast_path
    from parapolicy.policy import load_policy  # noqa: F401  (load_policy(fast_path=FastPath) is what the eval does)

    for mode in ("on", "off", True, False):
        assert eval_fast_path(mode, "cpu") == mode
    assert eval_fast_path("auto", "cuda") == "auto"
    if missing("openvino") is None:
        fast = eval_fast_path("auto", "cpu")
        assert isinstance(fast, FastPath) and fast.forced == "openvino"
        policy = tiny_policy()
        policy.enable_fast_path(fast)
        assert policy.fast_path is fast
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert eval_fast_path("auto", "cpu") == "auto"
