"""Denoiser fast path (parapolicy.policy.accel): bucketing, padding, slicing, equality with the plain path,
CPU backends (eager / TorchScript trace / torch.compile) picked per shape with a checked fallback; an
image policy's encoder through the same backends (parapolicy.policy.accel_encoder).

Everything runs on CPU (graph capture is skipped there); the last test needs CUDA. The torch.compile
test takes a minute on 2 cores and runs when PARAPOLICY_TEST_COMPILE=1.
"""

import os
import warnings


import pytest
import torch

from parapolicy.policy.accel import (AUTO_BACKENDS, FastPath, apply_fast_path, choose_bucket, resolve_backends,
                             resolve_buckets, warm_up)
from parapolicy.policy.accel_runtimes import RUNTIMES, missing
from policy_synthetic import ACTION_DIM, CAMERAS, OBS_DIM, tiny_image_policy, tiny_policy

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Exported graphs (openvino / onnxruntime) go to a cache of this test's own."""
    monkeypatch.setenv("PARAPOLICY_CACHE", str(tmp_path / "cache"))


def installed_runtimes() -> tuple:
    return tuple(name for name in RUNTIMES if missing(name) is None)


def real_notes(stats) -> list:
    """The notes besides "not installed" ones (an optional runtime that is absent here)."""
    return [note for note in stats.notes if "does not import" not in note]


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


def plan(policy, seed=1, batch=3):
    obs = torch.randn(batch, 2, OBS_DIM, generator=torch.Generator().manual_seed(seed))
    return policy.predict_action(obs, generator=torch.Generator().manual_seed(seed))


def denoise_inputs(policy, k, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, batch, 16, ACTION_DIM, generator=g)
    t = torch.randint(100, (k,), generator=g)
    cond = torch.randn(batch, policy.config.global_cond_dim, generator=g)
    return x, t, cond


def test_choose_and_resolve_buckets(policy):
    assert [choose_bucket(k, (1, 4)) for k in (1, 2, 3, 4, 5)] == [1, 4, 4, 4, None]
    assert resolve_buckets([4, 1, 4]) == (1, 4) and resolve_buckets(8) == (8,)
    for bad in ([0], [], [2.5], [True]):
        with pytest.raises(ValueError):
            resolve_buckets(bad)
    policy.set_sampler("paraddpm", 10, window=16)
    assert resolve_buckets("auto", policy.sampler) == (1, 10)  # the window never exceeds N
    policy.set_sampler("paraddim", 15, window=4)
    assert resolve_buckets("auto", policy.sampler) == (1, 4)
    policy.set_sampler("ddpm", 10)
    assert resolve_buckets("auto", policy.sampler) == (1,)


def test_bucketing_pads_and_slices(policy):
    """K < bucket is padded (zeros, timestep 0) and sliced back; K == bucket is not padded;
    K > every bucket falls back to the plain path (or raises with overflow='error')."""
    fast = FastPath(buckets=[4], pad=True, backend="eager")  # bit-identity at K == bucket: eager
    x5, t5, cond = denoise_inputs(policy, 5)
    plain = policy.make_denoise_fn(cond)
    denoise = fast.wrap(plain, cond, policy.model)
    with torch.inference_mode():
        out2 = denoise(x5[:2], t5[:2])
        (runner,) = fast._runners.values()
        assert runner.rows == 8 and fast.stats.padded_rows == 4
        assert torch.equal(runner.x[:4], x5[:2].reshape(4, 16, ACTION_DIM)) and not runner.x[4:].any()
        assert runner.t.tolist() == [t5[0]] * 2 + [t5[1]] * 2 + [0] * 4  # row k*B + b has t[k]
        assert torch.equal(runner.cond, cond.repeat(4, 1))
        assert out2.shape == (2, 2, 16, ACTION_DIM)
        torch.testing.assert_close(out2, plain(x5[:2], t5[:2]), rtol=0, atol=1e-5)

        out4 = denoise(x5[:4], t5[:4])
        assert fast.stats.padded_rows == 4 and fast.stats.per_bucket == {4: 2}  # K == bucket: no padding
        assert torch.equal(out4, plain(x5[:4], t5[:4]))  # same shape as the plain call: bit-identical

        out1 = denoise(x5[0], t5[0])  # a plain [B, H, A] call with one timestep, as the plain path allows
        assert out1.shape == (2, 16, ACTION_DIM) and not runner.x[2:].any()  # stale real rows re-zeroed
        torch.testing.assert_close(out1, plain(x5[0], t5[0]), rtol=0, atol=1e-5)

        out5 = denoise(x5, t5)  # K above every bucket: the plain path
        assert fast.stats.fallbacks == 1 and torch.equal(out5, plain(x5, t5))

        strict = FastPath(buckets=[4], pad=True, overflow="error", backend="eager").wrap(plain, cond, policy.model)
        with pytest.raises(ValueError, match="exceeds the largest bucket"):
            strict(x5, t5)
        with pytest.raises(ValueError, match="batch"):
            denoise(x5[:, :1], t5)


def test_padding_rows_do_not_affect_real_rows(policy):
    """At a fixed bucket shape, whatever the padding holds, the real rows are bit for bit the same:
    every layer (GroupNorm included) works per row."""
    fast = FastPath(buckets=[8], pad=True, backend="eager")
    x, t, cond = denoise_inputs(policy, 3)
    with torch.inference_mode():
        out = fast.wrap(policy.make_denoise_fn(cond), cond, policy.model)(x, t)
        (runner,) = fast._runners.values()
        runner.x[6:] = 100 * torch.randn_like(runner.x[6:])
        runner.t[6:] = 77
        runner.cond[6:] = -5.0
        garbage = policy.model(runner.x, runner.t, runner.cond)[:6]
    assert torch.equal(out, garbage.reshape(out.shape))


@pytest.mark.parametrize("name, options", [("ddpm", {}), ("paraddpm", {"window": 4, "tolerance": 0.1})])
@pytest.mark.parametrize("buckets", ["auto", [8]])
def test_fast_path_gives_the_plain_path_samples_bitwise(policy, name, options, buckets):
    """The eager CPU backend (pad='auto': real rows only) reproduces the plain path exactly."""
    policy.set_sampler(name, 10, **options)
    policy.enable_fast_path(False)
    reference = plan(policy)
    policy.enable_fast_path(buckets=buckets, backend="eager")
    fast = plan(policy)
    assert fast["rounds"] == reference["rounds"] and fast["model_evals"] == reference["model_evals"]
    assert torch.equal(fast["action_pred"], reference["action_pred"])
    assert torch.equal(fast["trajectory"], reference["trajectory"])
    stats = policy.fast_path.stats
    assert stats.calls == reference["rounds"] and stats.fallbacks == 0 and stats.padded_rows == 0
    if name == "paraddpm" and buckets == "auto":
        assert set(stats.per_bucket) <= {1, 4} and stats.per_bucket[4] >= 1


@pytest.mark.parametrize("name, options", [("ddpm", {}), ("paraddpm", {"window": 4, "tolerance": 0.1})])
def test_padded_fast_path_matches_the_plain_path(policy, name, options):
    """pad=True (what CUDA runs) on CPU: the same rounds and samples up to float32 rounding (MKL's
    kernels, picked by row count, round the last bit differently)."""
    policy.set_sampler(name, 10, **options)
    policy.enable_fast_path(False)
    reference = plan(policy)
    policy.enable_fast_path(buckets=[3, 8], pad=True, backend="eager")
    fast = plan(policy)
    assert policy.fast_path.stats.padded_rows > 0
    assert fast["rounds"] == reference["rounds"]
    torch.testing.assert_close(fast["trajectory"], reference["trajectory"], rtol=0, atol=1e-5)


def test_fast_path_modes(policy):
    assert tiny_policy().fast_path == "auto"
    x, t, cond = denoise_inputs(policy, 1)
    plain = policy.make_denoise_fn(cond)
    policy.fast_path = "auto"
    assert apply_fast_path(policy, plain, cond) is plain  # auto: plain path on CPU
    assert policy.enable_fast_path(False).fast_path is None
    assert policy.enable_fast_path("auto").fast_path == "auto"
    assert isinstance(policy.enable_fast_path(dtype="bf16").fast_path, FastPath)
    with pytest.raises(ValueError):
        policy.enable_fast_path("auto", dtype="bf16")
    for bad in (dict(pad="yes"), dict(overflow="drop"), dict(cuda_graph="maybe"), dict(dtype="int8"),
                dict(warmup=0), dict(buckets=[0]), dict(backend="onnx"), dict(backend=[]),
                dict(timing_calls=0), dict(atol=0)):
        with pytest.raises(ValueError):
            FastPath(**bad)
    policy.enable_fast_path(cuda_graph=True)  # impossible on CPU: fails at the call, before sampling
    policy.set_sampler("ddpm", 4)
    with pytest.raises(ValueError, match="CUDA"):
        plan(policy)
    policy.enable_fast_path(False)


def test_autocast_returns_float32_close_to_plain(policy):
    x, t, cond = denoise_inputs(policy, 4)
    fast = FastPath(buckets=[4], dtype="bfloat16")
    with torch.inference_mode():
        out = fast.wrap(policy.make_denoise_fn(cond), cond, policy.model)(x, t)
        reference = policy.make_denoise_fn(cond)(x, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0, atol=0.1)


def test_buffers_are_rebuilt_when_the_model_moves():
    policy = tiny_policy()
    x, t, cond = denoise_inputs(policy, 2)
    fast = FastPath(buckets=[2])
    with torch.inference_mode():
        fast.wrap(policy.make_denoise_fn(cond), cond, policy.model)(x, t)
    assert len(fast._runners) == 1
    policy.model.double().float()  # new parameter storage: graphs would point at freed memory
    fast.wrap(policy.make_denoise_fn(cond), cond, policy.model)
    assert len(fast._runners) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_matches_eager():
    policy = tiny_policy().cuda()
    policy.set_sampler("paraddpm", 10, window=4, tolerance=1e-3)
    obs = torch.randn(2, 2, OBS_DIM, device="cuda")
    policy.enable_fast_path(False)
    reference = policy.predict_action(obs, generator=torch.Generator("cuda").manual_seed(0))
    policy.enable_fast_path(cuda_graph=True)
    for _ in range(2):  # capture, then replay
        fast = policy.predict_action(obs, generator=torch.Generator("cuda").manual_seed(0))
        torch.testing.assert_close(fast["action_pred"], reference["action_pred"], rtol=0, atol=1e-3)
    stats = policy.fast_path.stats
    assert stats.captures == len(stats.per_bucket) and stats.capture_failures == 0  # one graph per bucket


# ---------------------------------------------------------------------------------- CPU backends
SAMPLERS = [("ddpm", {}), ("paraddpm", {"window": 4, "tolerance": 0.1})]


def test_resolve_backends():
    assert resolve_backends("auto") == ("eager", "openvino", "onnxruntime", "trace")
    assert resolve_backends("auto", compile=True) == ("eager", "openvino", "onnxruntime", "trace", "compile")
    assert resolve_backends("trace") == ("eager", "trace") and resolve_backends(["compile"]) == ("eager", "compile")


@pytest.mark.parametrize("name, options", SAMPLERS)
@pytest.mark.parametrize("backend", ["trace", "auto"])
def test_cpu_backend_matches_eager(policy, name, options, backend):
    """Sequential and parallel samplers: the traced + frozen graph (forced, or picked by measurement)
    gives the plain path's rounds and samples within 1e-5, and every sampler shape got a backend."""
    policy.set_sampler(name, 10, **options)
    policy.enable_fast_path(False)
    reference = plan(policy)
    policy.enable_fast_path(backend=backend, warmup_budget_s=600)  # every candidate, however loaded the CPU
    fast = plan(policy)
    stats = policy.fast_path.stats
    assert fast["rounds"] == reference["rounds"] and fast["model_evals"] == reference["model_evals"]
    torch.testing.assert_close(fast["trajectory"], reference["trajectory"], rtol=0, atol=1e-5)
    torch.testing.assert_close(fast["action_pred"], reference["action_pred"], rtol=0, atol=1e-5)
    assert set(stats.backends) == {f"K{b}xB3" for b in stats.per_bucket} and not real_notes(stats)
    assert all(s > 0 for s in stats.warmup_s.values())
    if backend == "trace":
        assert set(stats.backends.values()) == {"trace"}
        assert stats.padded_rows == sum(stats.per_bucket[b] * b for b in stats.per_bucket) * 3 - stats.rows
    else:  # the fastest of the measured candidates, each timed
        for shape, picked in stats.backends.items():
            times = stats.candidates_ms[shape]
            assert set(times) == set(AUTO_BACKENDS) and picked == min(times, key=lambda n: times[n] or 1e9)
            assert all(times[n] is not None for n in ("eager", "trace") + installed_runtimes())


def test_failing_backend_falls_back_to_eager(policy, monkeypatch):
    """A backend that raises is dropped with a warning and a note; eager (bit-identical) runs instead."""
    policy.set_sampler("paraddpm", 10, window=4, tolerance=0.1)
    policy.enable_fast_path(False)
    reference = plan(policy)
    build = FastPath._build_backend

    def broken(self, name, model, inputs):
        if name == "trace":
            raise RuntimeError("no TorchScript today")
        return build(self, name, model, inputs)

    monkeypatch.setattr(FastPath, "_build_backend", broken)
    policy.enable_fast_path(backend="trace")
    with pytest.warns(RuntimeWarning, match="backend trace failed"):
        fast = plan(policy)
    stats = policy.fast_path.stats
    assert set(stats.backends.values()) == {"eager"} and stats.padded_rows == 0
    assert any("no TorchScript today" in note for note in stats.notes)
    assert torch.equal(fast["action_pred"], reference["action_pred"])


def needs(name):
    """Skip a test of backend ``name`` where its optional library is not installed."""
    reason = missing(name) if name in RUNTIMES else None
    return pytest.mark.skipif(reason is not None, reason=reason or "")


@pytest.mark.parametrize("name", ["trace", pytest.param("openvino", marks=needs("openvino")),
                                  pytest.param("onnxruntime", marks=needs("onnxruntime"))])
def test_inexact_backend_is_dropped(policy, monkeypatch, name):
    """A backend whose output differs from eager's by more than atol is not used."""
    build = FastPath._build_backend

    def off_by_a_bit(self, which, model, inputs):
        fn = build(self, which, model, inputs)
        return (lambda x, t, c: fn(x, t, c) + 1e-3) if which == name else fn

    monkeypatch.setattr(FastPath, "_build_backend", off_by_a_bit)
    policy.set_sampler("ddpm", 4)
    policy.enable_fast_path(False)
    reference = plan(policy)
    policy.enable_fast_path(backend=[name])
    fast = plan(policy)
    stats = policy.fast_path.stats
    assert stats.backends == {"K1xB3": "eager"} and stats.candidates_ms["K1xB3"][name] is None
    assert any(f"{name} dropped" in note and "1.00e-03" in note for note in stats.notes)
    assert torch.equal(fast["action_pred"], reference["action_pred"])


def test_warmup_budget_skips_candidates(policy):
    policy.set_sampler("ddpm", 4)
    policy.enable_fast_path(backend="auto", warmup_budget_s=1e-9)
    plan(policy)
    stats = policy.fast_path.stats
    assert stats.backends == {"K1xB3": "eager"} and any("budget" in note for note in stats.notes)


def test_warm_up_prepares_every_bucket_before_the_first_call(policy):
    policy.set_sampler("paraddpm", 10, window=4, tolerance=0.1)
    policy.enable_fast_path(False)
    assert warm_up(policy, 3) == {}  # plain path: nothing to do
    policy.enable_fast_path(backend="trace")
    info = warm_up(policy, 3)
    assert info["backends"] == {"K1xB3": "trace", "K4xB3": "trace"} and info["warmup_s"] > 0
    spent = dict(policy.fast_path.stats.warmup_s)
    policy.enable_fast_path(False)
    reference = plan(policy, seed=5)
    policy.fast_path = fast = FastPath(backend="trace")
    warm_up(policy, 3)
    spent = dict(fast.stats.warmup_s)
    out = plan(policy, seed=5)  # no further warm-up, and the warm-up inputs left nothing behind
    assert fast.stats.warmup_s == spent and warm_up(policy, 3)["warmup_s"] == 0
    torch.testing.assert_close(out["action_pred"], reference["action_pred"], rtol=0, atol=1e-5)


def test_frozen_graphs_are_rebuilt_when_weights_change_in_place():
    """torch.jit.freeze copies the weights: an in-place update must not leave a stale graph."""
    policy = tiny_policy()
    policy.set_sampler("ddpm", 4)
    policy.enable_fast_path(backend="trace")
    plan(policy)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.mul_(1.01)
    fast = plan(policy)
    policy.enable_fast_path(False)
    reference = plan(policy)
    torch.testing.assert_close(fast["action_pred"], reference["action_pred"], rtol=0, atol=1e-5)


@pytest.mark.skipif(os.environ.get("PARAPOLICY_TEST_COMPILE") != "1",
                    reason="torch.compile takes about a minute per shape on 2 cores; set PARAPOLICY_TEST_COMPILE=1")
def test_compile_backend_matches_eager(policy):
    policy.set_sampler("paraddpm", 6, window=2, tolerance=0.1)
    policy.enable_fast_path(False)
    reference = plan(policy, batch=1)
    policy.enable_fast_path(backend="compile", warmup_budget_s=600)
    fast = plan(policy, batch=1)
    assert set(policy.fast_path.stats.backends.values()) == {"compile"}, policy.fast_path.stats.notes
    torch.testing.assert_close(fast["action_pred"], reference["action_pred"], rtol=0, atol=1e-5)


def test_load_policy_takes_the_fast_path_option(tmp_path):
    """load_policy(fast_path=auto|on|off), as eval's `fast_path=` passes it."""
    from parapolicy.policy import load_policy, save_checkpoint

    folder = save_checkpoint(tiny_policy(), tmp_path / "ckpt")
    assert load_policy(folder).fast_path == "auto"
    assert isinstance(load_policy(folder, fast_path="on").fast_path, FastPath)
    assert load_policy(folder, fast_path="off").fast_path is None
    with pytest.raises(ValueError, match="fast path"):
        load_policy(folder, fast_path="sometimes")


# ------------------------------------------------------------------------------------ image encoder
def image_plan(policy, seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(batch, 2, 9, generator=g)
    images = {key: torch.randint(0, 256, (batch, 2, 3, 84, 84), generator=g, dtype=torch.uint8) for key in CAMERAS}
    return policy.predict_action(obs, images=images, generator=torch.Generator().manual_seed(seed))


@pytest.mark.filterwarnings("ignore:fast path. backend:RuntimeWarning")
@pytest.mark.parametrize("backend", ["eager", "trace", "auto"])
def test_encoder_fast_path_matches_the_plain_path(backend):
    """The encoder gets a backend per batch size, picked (or forced) and checked like the denoiser's;
    new images through a prepared shape still give the plain path's plan; eager is bit for bit."""
    policy = tiny_image_policy()
    reference = [image_plan(policy, seed) for seed in range(2)] + [image_plan(policy, 2, batch=1)]
    encoder_calls = []
    policy.obs_encoder.register_forward_hook(lambda *args: encoder_calls.append(1))
    policy.enable_fast_path(backend=backend, warmup_budget_s=600)  # every candidate, however loaded the CPU
    fast = [image_plan(policy, seed) for seed in range(2)] + [image_plan(policy, 2, batch=1)]
    stats = policy.fast_path.stats
    assert {s for s in stats.backends if s.startswith("encoder")} == {"encoder B3", "encoder B1"}
    for shape in ("encoder B3", "encoder B1"):
        times = stats.candidates_ms[shape]
        if backend == "auto":
            assert set(times) == set(AUTO_BACKENDS)
            assert stats.backends[shape] == min(times, key=lambda n: times[n] or 1e9)
            assert times["eager"] is not None and times["trace"] is not None
            # the tiny encoder's antialiased resize: OpenVINO's differs from torch's (dropped, with a note)
            assert all(times[n] is not None or any(note.startswith((f"{shape}: {n} failed", f"{shape}: {n} dropped"))
                                                   for note in stats.notes) for n in installed_runtimes())
        else:
            assert stats.backends[shape] == backend
    assert not [n for n in real_notes(stats) if not (backend == "auto" and n.startswith("encoder"))]
    for got, want in zip(fast, reference):
        if backend == "eager":
            assert torch.equal(got["action_pred"], want["action_pred"])
        else:
            torch.testing.assert_close(got["action_pred"], want["action_pred"], rtol=0, atol=1e-5)
    if backend == "trace":  # the frozen graph stands in for the module once a shape is prepared
        encoder_calls.clear()
        image_plan(policy, seed=5)
        assert encoder_calls == []
        policy.obs_encoder.train()  # training: random crops, nothing static; the plain encoder runs
        image_plan(policy)
        assert encoder_calls == [1]


def test_inexact_encoder_backend_is_dropped(monkeypatch):
    build = FastPath._build_backend

    def off_by_a_bit(self, name, model, inputs):
        fn = build(self, name, model, inputs)
        return (lambda *args: fn(*args) + 1e-3) if name == "trace" else fn

    monkeypatch.setattr(FastPath, "_build_backend", off_by_a_bit)
    policy = tiny_image_policy()
    reference = image_plan(policy)
    policy.enable_fast_path(backend="trace")
    fast = image_plan(policy)
    stats = policy.fast_path.stats
    assert stats.backends["encoder B3"] == "eager" and stats.candidates_ms["encoder B3"]["trace"] is None
    assert any(note.startswith("encoder B3: trace dropped") for note in stats.notes)
    torch.testing.assert_close(fast["action_pred"], reference["action_pred"], rtol=0, atol=1e-5)


def test_traced_encoder_is_rebuilt_when_its_weights_or_statistics_change():
    policy = tiny_image_policy()
    policy.enable_fast_path(backend="trace")
    image_plan(policy)
    with torch.no_grad():
        for p in policy.obs_encoder.parameters():
            p.mul_(1.05)
        policy.normalizer.obs.max.add_(0.5)
    fast = image_plan(policy)
    policy.enable_fast_path(False)
    reference = image_plan(policy)
    torch.testing.assert_close(fast["action_pred"], reference["action_pred"], rtol=0, atol=1e-5)


def test_warm_up_prepares_the_encoder():
    policy = tiny_image_policy()
    reference = image_plan(policy, batch=2)
    policy.enable_fast_path(backend="trace")
    info = warm_up(policy, 2)
    assert info["backends"] == {"encoder B2": "trace", "K1xB2": "trace"} and info["warmup_s"] > 0
    spent = dict(policy.fast_path.stats.warmup_s)
    out = image_plan(policy, batch=2)
    assert policy.fast_path.stats.warmup_s == spent  # the call met prepared shapes only
    torch.testing.assert_close(out["action_pred"], reference["action_pred"], rtol=0, atol=1e-5)
