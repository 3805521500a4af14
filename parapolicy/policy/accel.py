"""Fast path for the policy's denoiser: static shapes, CUDA graphs, reduced-precision autocast, compile.

A sampler calls ``denoise(x [K, B, H, A], t [K])`` with K that changes between rounds (a Picard window
shrinks at the end of the trajectory; sequential samplers use K = 1). ``FastPath.wrap`` returns a
drop-in denoiser that

1. copies the K * B network rows into preallocated static buffers of a fixed *bucket* size (the
   smallest bucket >= K, e.g. 1 or the window p), pads the rest (zeros at timestep 0), runs the model
   on the whole bucket, so every round has one of a few shapes, and slices the output back. Padding
   rows cannot touch the real rows: every layer of the U-Net, GroupNorm included, works per row;
2. on CUDA, captures the model call once per (bucket, batch) in a ``torch.cuda.CUDAGraph`` (warm-up on
   a side stream first) and replays it: one graph launch per round instead of ~100 kernel launches;
3. optionally runs the model under bf16 / fp16 autocast and returns float32 (the samplers accumulate
   the trajectory in float32), and optionally through ``torch.compile``.

On CPU no graph is captured; instead each static shape (bucket) gets the fastest of a few *backends*,
picked at warm-up by measurement (``backend="auto"``, the default of an explicit fast path):

- ``eager``: the model as it is, on the real rows only (no padding: it would cost CPU FLOPs for
  nothing). Bit-identical to the plain path: MKL / oneDNN pick GEMM and convolution kernels by the
  number of rows, so padding would change float32 rounding in the last bit;
- ``trace``: ``torch.jit.trace`` at the bucket's shape, ``torch.jit.freeze`` (weights become constants)
  and ``torch.jit.optimize_for_inference`` (oneDNN convolutions, fused ops): fewer Python and dispatcher
  calls per layer, which is most of the cost of a small-batch call on CPU;
- ``openvino`` / ``onnxruntime``: the model exported to ONNX at the bucket's shape and run by OpenVINO
  or ONNX Runtime (``parapolicy.policy.accel_runtimes``): fused convolutions and normalisations, no Python
  per layer. Optional extras (``pip install parapolicy[openvino]`` / ``[onnx]``); a backend whose
  library is missing is skipped with a note. Exported graphs are cached on disk, keyed by the weights,
  the architecture, the shape and the library versions (``$PARAPOLICY_CACHE``, default
  ``~/.cache/parapolicy``), so a second process does not export again. They run on ``threads``
  intra-op threads (1 by default);
- ``compile``: ``torch.compile`` (inductor, ``dynamic=False``), only when asked for
  (``compile=True`` or ``backend=[..., "compile"]``): compiling one shape takes minutes on a small CPU
  (docs/benchmark.md, "Fast path"), more than it saves in a typical eval.

TorchScript is deprecated in torch 2.x but still shipped (2.13 here); if a torch release drops it,
``trace`` fails at warm-up and eager is used, with a note.

A graph backend runs the whole bucket (padding included) since its shape is fixed. Before it is used,
its output on two inputs (the first call's real data and a random one) must equal eager's within
``atol`` (1e-5); a backend that fails that check, raises, or runs out of the warm-up budget
(``warmup_budget_s`` per shape) is dropped with a note (``stats.notes``, and a warning when it
raised), and eager is the fallback. Warm-up time per shape is in ``stats.warmup_s``; call
``warm_up(policy, batch)`` before a timed loop so that the first control step doesn't pay it.
``backend="eager"`` keeps the plain path's results bit for bit; ``pad=True`` computes the padding on
CPU too (the tests use it to exercise the bucketing as the GPU runs it): real rows then match the
plain path to float32 rounding (~1e-6), and do not depend on the padding's content at all.

    policy.enable_fast_path()                      # CUDA: graphs on; CPU: fastest backend per shape
    policy.enable_fast_path(dtype="bfloat16")      # + autocast (CPU: eager backend only)
    policy.enable_fast_path(backend="eager")       # CPU: bucketing only, bit-identical to the plain path
    policy.enable_fast_path(False)                 # plain path
    policy.fast_path = "auto"                      # the default: on for CUDA, off on CPU

An image policy's observation encoder, run once per ``predict_action`` call before sampling, has a
fast path of its own (``FastPath.encoder``, ``parapolicy.policy.accel_encoder``): per batch size, the fastest
CPU backend checked against eager within ``atol``, or a CUDA graph; ``global_condition(policy, ...)``
is the conditioning through it, and ``warm_up`` prepares it with the denoiser's shapes.

The graphs hold pointers to the model's parameters and to the buffers: loading weights in place
(``load_state_dict``) is fine; moving the model (``.to(...)``) invalidates them and they are
recaptured on the next call. Frozen CPU graphs hold a copy of the weights: they are rebuilt when a
parameter changes in place (its version counter moves) or moves.
"""

from __future__ import annotations

import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from parapolicy.policy.accel_encoder import EncoderFastPath
from parapolicy.policy.accel_runtimes import RUNTIMES, RuntimeCache, missing

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
AUTO_PARALLEL_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # parallel samplers without a `window`
CPU_BACKENDS = ("eager", "trace", "compile", *RUNTIMES)
# "auto" measures these, in this order (the warm-up budget may stop the later ones on a large network)
AUTO_BACKENDS = ("eager", "openvino", "onnxruntime", "trace")


def choose_bucket(k: int, buckets: Sequence[int]) -> Optional[int]:
    """The smallest bucket >= k (buckets sorted ascending), or None when k exceeds them all."""
    for bucket in buckets:
        if bucket >= k:
            return bucket
    return None


def resolve_buckets(buckets: Any, sampler: Any = None) -> tuple[int, ...]:
    """Sorted unique bucket sizes.

    ``"auto"``: (1, p) for a sampler with a ``window`` p (capped at its number of steps), powers of two
    up to 64 for another parallel sampler, (1,) for a sequential one (or no sampler).
    """
    if buckets is None or buckets == "auto":
        if sampler is None:
            return (1,)
        window = getattr(sampler, "window", None)
        if window is not None:
            steps = getattr(sampler, "num_inference_steps", window)
            return tuple(sorted({1, max(1, min(int(window), int(steps)))}))
        if getattr(sampler, "is_parallel", False):
            return AUTO_PARALLEL_BUCKETS
        return (1,)
    if isinstance(buckets, int):
        buckets = [buckets]
    values = []
    for b in buckets:
        if isinstance(b, bool) or int(b) != b or int(b) < 1:
            raise ValueError(f"buckets must be positive integers, got {list(buckets)!r}")
        values.append(int(b))
    if not values:
        raise ValueError("buckets must not be empty")
    return tuple(sorted(set(values)))


def resolve_backends(backend: Any, compile: Any = False) -> tuple[str, ...]:
    """CPU backend candidates, in the order they are tried: ``"auto"`` is ``AUTO_BACKENDS`` (eager,
    openvino, onnxruntime, trace; a runtime that is not installed is skipped at warm-up with a note)
    plus compile when ``compile`` asks for it; a name or a list of names from ``CPU_BACKENDS`` is taken
    as given (eager is always measured too: it is the reference and the fallback)."""
    if backend in (None, "auto"):
        names = list(AUTO_BACKENDS) + (["compile"] if compile else [])
    else:
        names = [backend] if isinstance(backend, str) else list(backend)
        bad = [b for b in names if b not in CPU_BACKENDS]
        if bad or not names:
            raise ValueError(f"backend must be 'auto' or a list of {list(CPU_BACKENDS)}, got {backend!r}")
    return tuple(dict.fromkeys(["eager", *names]))


def parse_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"fast path dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"fast path dtype must be one of {sorted(DTYPES)}, got {dtype!r}") from None


@dataclass
class _Runner:
    """Static buffers (and maybe a CUDA graph) for one (bucket, batch, event shape, device)."""

    rows: int
    x: torch.Tensor  # [rows, *event]
    t: torch.Tensor  # [rows] long
    cond: torch.Tensor  # [rows, G]
    graph: Any = None  # torch.cuda.CUDAGraph
    out: Optional[torch.Tensor] = None  # the graph's static output [rows, *event] (float32)
    cond_token: int = -1  # which wrap() call last filled `cond`
    padded: int = 0  # rows currently zeroed as padding (skip re-zeroing)
    backend: Optional[str] = None  # CPU: the backend picked for this shape (None: not picked yet)
    fn: Optional[Callable] = None  # CPU: the picked backend's callable (x, t, cond) -> out


@dataclass
class FastPathStats:
    calls: int = 0
    rows: int = 0  # real network rows evaluated
    padded_rows: int = 0  # padding rows evaluated on top
    fallbacks: int = 0  # calls with K above every bucket, run on the plain path
    captures: int = 0  # CUDA graphs captured
    capture_failures: int = 0
    per_bucket: dict = field(default_factory=dict)
    # CPU backend choice, per shape "K<bucket>xB<batch>": the backend, the warm-up seconds spent,
    # every candidate's median ms at that shape (None: dropped), and why a candidate was dropped.
    backends: dict = field(default_factory=dict)
    warmup_s: dict = field(default_factory=dict)
    candidates_ms: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"calls": self.calls, "rows": self.rows, "padded_rows": self.padded_rows,
                "fallbacks": self.fallbacks, "captures": self.captures,
                "capture_failures": self.capture_failures,
                "per_bucket": {str(k): v for k, v in sorted(self.per_bucket.items())},
                "backends": dict(self.backends), "warmup_s": dict(self.warmup_s),
                "warmup_s_total": sum(self.warmup_s.values()), "candidates_ms": dict(self.candidates_ms),
                "notes": list(self.notes)}


class FastPath:
    """Denoiser wrapper with static shapes; CUDA graphs, autocast and torch.compile as options.

    Options:
      buckets: "auto" (default; see ``resolve_buckets``) or a list of K sizes. A call with K rows of
        trajectory points is padded to the smallest bucket >= K.
      pad: "auto" (default: run the model on the whole bucket on CUDA and for a CPU graph backend, on
        the real rows for eager CPU), True (always the whole bucket) or False (real rows only; no CUDA
        graph and only the eager CPU backend then, shapes vary).
      overflow: "fallback" (default: a K above every bucket runs on the plain path, counted in
        ``stats.fallbacks``) or "error" (raise ValueError).
      cuda_graph: "auto" (default: capture on CUDA, and fall back to eager with a warning if capture
        fails), True (capture, raise on failure; an error off CUDA), False (never).
      dtype: "float32" (default), "bfloat16" or "float16": autocast of the model call; the output is
        cast back to the input's dtype (float32).
      compile: False (default), True (torch.compile mode "default") or a torch.compile mode string. On
        CPU it makes ``compile`` one more backend candidate (see ``backend``).
      warmup: eager calls on a side stream before a capture (default 2); on CPU, untimed calls of each
        backend candidate before it is timed.
      backend (CPU only): "auto" (default: the fastest of eager, openvino, onnxruntime and trace, plus
        compile with ``compile=True``, measured per shape), a list from ("eager", "trace", "compile",
        "openvino", "onnxruntime") to measure (eager is always one: the reference and the fallback), or
        one name to use that backend without timing (still checked against eager; eager if it fails).
      threads: intra-op threads of the openvino / onnxruntime backends (default 1).
      cache_dir: where their exported graphs are kept (default ``$PARAPOLICY_CACHE``, else
        ``~/.cache/parapolicy``).
      atol: the largest |difference| from eager a CPU backend may show at warm-up (default 1e-5).
      timing_calls: timed calls per CPU backend candidate at warm-up (median taken; default 7).
      warmup_budget_s: seconds of backend warm-up per shape after which no further candidate is
        started (default 30; one that is running is not cut).
    """

    def __init__(self, *, buckets: Any = "auto", pad: Any = "auto", overflow: str = "fallback",
                 cuda_graph: Any = "auto", dtype: Any = "float32", compile: Any = False, warmup: int = 2,
                 backend: Any = "auto", atol: float = 1e-5, timing_calls: int = 7,
                 warmup_budget_s: float = 30.0, threads: int = 1, cache_dir: Optional[str] = None):
        if pad not in ("auto", True, False):
            raise ValueError(f"pad must be 'auto', true or false, got {pad!r}")
        if overflow not in ("fallback", "error"):
            raise ValueError(f"overflow must be 'fallback' or 'error', got {overflow!r}")
        if cuda_graph not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be 'auto', true or false, got {cuda_graph!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1, got {warmup!r}")
        if compile not in (False, True, None) and not isinstance(compile, str):
            raise ValueError(f"compile must be false, true or a torch.compile mode, got {compile!r}")
        if isinstance(timing_calls, bool) or not isinstance(timing_calls, int) or timing_calls < 1:
            raise ValueError(f"timing_calls must be an integer >= 1, got {timing_calls!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        if not float(atol) > 0 or not float(warmup_budget_s) > 0:
            raise ValueError(f"atol and warmup_budget_s must be > 0, got {atol!r}, {warmup_budget_s!r}")
        self.backend = backend if backend in (None, "auto") else (
            backend if isinstance(backend, str) else list(backend))
        self.backends = resolve_backends(backend, compile)
        self.forced = backend if isinstance(backend, str) and backend != "auto" else None
        self.atol = float(atol)
        self.timing_calls = timing_calls
        self.warmup_budget_s = float(warmup_budget_s)
        self.buckets = buckets if buckets in (None, "auto") else resolve_buckets(buckets)
        self.pad = pad
        self.overflow = overflow
        self.cuda_graph = cuda_graph
        self.dtype = parse_dtype(dtype)
        self.compile = compile or False
        self.warmup = warmup
        self.stats = FastPathStats()
        self._runners: dict = {}
        self._model_key = None
        self._compiled: Optional[Callable] = None
        self._token = 0
        self.threads = threads
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.runtimes = RuntimeCache(self.cache_dir, threads)  # openvino / onnxruntime: exports and disk cache
        self.encoder = EncoderFastPath(self)  # an image policy's observation encoder (parapolicy.policy.accel_encoder)

    # ------------------------------------------------------------------ public
    def options(self) -> dict:
        return {"buckets": self.buckets if isinstance(self.buckets, str) or self.buckets is None
                else list(self.buckets), "pad": self.pad, "overflow": self.overflow, "cuda_graph": self.cuda_graph,
                "dtype": str(self.dtype).replace("torch.", ""), "compile": self.compile, "warmup": self.warmup,
                "backend": self.backend or "auto", "atol": self.atol, "timing_calls": self.timing_calls,
                "warmup_budget_s": self.warmup_budget_s, "threads": self.threads, "cache_dir": self.cache_dir}

    def reset(self) -> None:
        """Drop every buffer, graph and compiled function (they are rebuilt on the next call)."""
        self._reset_denoiser()
        self.encoder.reset()

    def _reset_denoiser(self) -> None:
        self._runners.clear()
        self._compiled = None
        self._model_key = None

    def wrap(self, denoise: Denoiser, global_cond: torch.Tensor, model: nn.Module, sampler: Any = None) -> Denoiser:
        """A denoiser equivalent to ``denoise`` (``policy.make_denoise_fn(global_cond)``) for one
        ``predict_action`` call: conditioning ``global_cond [B, G]``, network ``model``; ``sampler``
        sets the "auto" buckets."""
        buckets = resolve_buckets(self.buckets, sampler)
        self._use_graph(global_cond.device)  # fail here, not mid-sampling, on impossible options
        self._check_model(model)
        self._token += 1
        token = self._token
        batch = global_cond.shape[0]

        def fast_denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            squeeze = x.ndim == 3  # a plain [B, H, A] call with one timestep, as the plain path allows
            if squeeze:
                x = x.unsqueeze(0)
            k = x.shape[0]
            if x.shape[1] != batch:
                raise ValueError(f"denoise got batch {x.shape[1]}, the conditioning has {batch}")
            bucket = choose_bucket(k, buckets)
            if bucket is None:
                if self.overflow == "error":
                    raise ValueError(f"fast path: K={k} exceeds the largest bucket {buckets[-1]} "
                                     f"(buckets {list(buckets)}); pass larger buckets or overflow='fallback'")
                self.stats.fallbacks += 1
                out = denoise(x, t)
                return out.squeeze(0) if squeeze else out
            out = self._run(model, x, t, global_cond, bucket, token)
            return out.squeeze(0) if squeeze else out

        return fast_denoise

    # ------------------------------------------------------------------ internals
    def _check_model(self, model: nn.Module) -> None:
        """Buffers and graphs belong to one model at one place in memory; recapture if it moved. Frozen
        CPU graphs copy the weights, so an in-place change of any parameter (its version) also counts."""
        params = list(model.parameters())
        first = params[0]
        versions = 0
        if first.device.type == "cpu":
            try:
                versions = sum(p._version for p in params)
            except RuntimeError:  # inference tensors have no version counter (and cannot change in place)
                versions = -1
        key = (id(model), first.device, first.data_ptr(), versions)
        if key != self._model_key:
            self._reset_denoiser()
            self._model_key = key

    def _forward_fn(self, model: nn.Module, device: Optional[torch.device] = None) -> Callable:
        if not self.compile or (device is not None and device.type == "cpu"):  # CPU: compile is a backend candidate
            return model
        if self._compiled is None:
            mode = "default" if self.compile is True else str(self.compile)
            self._compiled = torch.compile(model, mode=mode, dynamic=False)
        return self._compiled

    def _call_model(self, model: nn.Module, runner: _Runner, rows: Optional[int] = None) -> torch.Tensor:
        """The model on the buffers' first ``rows`` rows (all of them by default)."""
        forward = self._forward_fn(model, runner.x.device)
        x, t, cond = (runner.x, runner.t, runner.cond) if rows is None else (
            runner.x[:rows], runner.t[:rows], runner.cond[:rows])
        if self.dtype == torch.float32:
            return forward(x, t, cond)
        # cache_enabled=False: required for autocast inside CUDA graph capture, harmless otherwise.
        with torch.autocast(x.device.type, dtype=self.dtype, cache_enabled=False):
            out = forward(x, t, cond)
        return out.to(x.dtype)

    def _pads(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.pad == "auto" else bool(self.pad)

    def _use_graph(self, device: torch.device) -> bool:
        if self.cuda_graph is True:
            if device.type != "cuda":
                raise ValueError(f"cuda_graph=True needs a CUDA device, the model is on {device}")
            if not self._pads(device):
                raise ValueError("cuda_graph=True needs pad=True or 'auto': a graph has one static shape")
        return self.cuda_graph is not False and device.type == "cuda" and self._pads(device)

    def _runner(self, model, x, global_cond, bucket) -> tuple[_Runner, bool]:
        batch, event = x.shape[1], tuple(x.shape[2:])
        key = (bucket, batch, event, x.dtype, global_cond.shape[1], x.device)
        runner = self._runners.get(key)
        if runner is not None:
            return runner, False
        rows = bucket * batch
        runner = _Runner(
            rows=rows,
            x=torch.zeros((rows, *event), dtype=x.dtype, device=x.device),
            t=torch.zeros(rows, dtype=torch.long, device=x.device),
            cond=torch.zeros((rows, global_cond.shape[1]), dtype=global_cond.dtype, device=x.device),
        )
        self._runners[key] = runner
        return runner, True

    def _capture(self, model, runner: _Runner) -> None:
        """Warm up on a side stream, then capture the model call into a CUDA graph."""
        try:
            stream = torch.cuda.Stream(device=runner.x.device)
            stream.wait_stream(torch.cuda.current_stream(runner.x.device))
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    self._call_model(model, runner)
            torch.cuda.current_stream(runner.x.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._call_model(model, runner)
            runner.graph, runner.out = graph, out
            self.stats.captures += 1
        except Exception as err:
            self.stats.capture_failures += 1
            if self.cuda_graph is True:
                raise
            warnings.warn(f"fast path: CUDA graph capture failed ({type(err).__name__}: {err}); "
                          f"running this shape eagerly", RuntimeWarning, stacklevel=3)
            runner.graph = False  # don't try again for this shape

    # ------------------------------------------------------------------ CPU backends
    def _build_backend(self, name: str, model: nn.Module, inputs: tuple) -> Callable:
        """A callable (x, t, cond) -> out for backend ``name`` at the shape of ``inputs``."""
        if name == "eager":
            return model
        if name == "trace":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-to-int casts: shapes are static here
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated in torch 2.x, still shipped
                traced = torch.jit.trace(model, inputs, check_trace=False)
                frozen = torch.jit.freeze(traced.eval())
                try:
                    return torch.jit.optimize_for_inference(frozen)
                except Exception as err:  # oneDNN rewrites are an extra; the frozen graph alone still helps
                    self.stats.notes.append(f"trace: optimize_for_inference failed ({type(err).__name__}: {err}), "
                                            f"frozen graph kept")
                    return frozen
        if name == "compile":
            mode = "default" if self.compile in (False, True, None) else str(self.compile)
            return torch.compile(model, mode=mode, dynamic=False)
        if name in RUNTIMES:
            return self.runtimes.build(name, model, inputs)
        raise ValueError(f"unknown backend {name!r}")

    def _select_backend(self, model: nn.Module, runner: _Runner, bucket: int, batch: int) -> None:
        """Measure every candidate backend at this shape (the runner's buffers hold real inputs and
        zero padding) and keep the fastest one that gives eager's output within ``atol``."""
        shape = f"K{bucket}xB{batch}"
        inputs = (runner.x.clone(), runner.t.clone(), runner.cond.clone())
        gen = torch.Generator(device=runner.x.device).manual_seed(0)
        probe = (torch.randn(runner.x.shape, generator=gen, device=runner.x.device),
                 torch.randint(0, 100, runner.t.shape, generator=gen, device=runner.x.device),
                 torch.randn(runner.cond.shape, generator=gen, device=runner.x.device))
        candidates = self.backends
        if self.dtype != torch.float32 and len(candidates) > 1:
            self.stats.notes.append(f"{shape}: dtype {self.dtype} runs eagerly under autocast (no graph backend)")
            candidates = ("eager",)
        if self.pad is False and len(candidates) > 1:  # a graph backend needs the bucket's fixed shape
            self.stats.notes.append(f"{shape}: pad=False runs eagerly (graph backends need the padded bucket)")
            candidates = ("eager",)
        runner.backend, runner.fn = self.pick_backend(shape, model, inputs, probe, candidates)

    def pick_backend(self, shape: str, model: nn.Module, inputs: tuple, probe: tuple,
                     candidates: Sequence[str]) -> tuple[str, Callable]:
        """The fastest of ``candidates`` for ``model(*inputs)`` at this (static) shape that gives eager's
        output within ``atol`` on ``inputs`` and on ``probe`` (other values, same shapes): ``(name,
        callable)``. Recorded in ``stats`` under ``shape``; also used for the image encoder."""
        start = time.perf_counter()
        reference = [model(*inputs), model(*probe)]
        timings: dict[str, Optional[float]] = {}
        built: dict[str, Callable] = {}
        for name in candidates:
            reason = missing(name) if name in RUNTIMES else None
            if reason:  # an optional extra that is not installed: a note, never an error
                if reason not in self.stats.notes:
                    self.stats.notes.append(reason)
                timings[name] = None
                continue
            if name != "eager" and time.perf_counter() - start > self.warmup_budget_s:
                self.stats.notes.append(f"{shape}: {name} skipped, warm-up budget of {self.warmup_budget_s:g} s spent")
                timings[name] = None
                continue
            try:
                fn = self._build_backend(name, model, inputs)
                for _ in range(max(self.warmup, 2)):  # TorchScript profiles its first runs, inductor compiles
                    fn(*inputs)
                if name != "eager":
                    diff = max(float((fn(*args) - ref).abs().max()) for args, ref in zip((inputs, probe), reference))
                    if not diff <= self.atol:  # NaN fails too
                        self.stats.notes.append(f"{shape}: {name} dropped, max |difference| from eager "
                                                f"{diff:.2e} > atol {self.atol:g}")
                        timings[name] = None
                        continue
                built[name] = fn
            except Exception as err:
                if name == "eager":
                    raise  # the model itself fails: nothing to fall back to
                warnings.warn(f"fast path: backend {name} failed at {shape} ({type(err).__name__}: {err}); "
                              f"trying the others, eager is the fallback", RuntimeWarning, stacklevel=4)
                self.stats.notes.append(f"{shape}: {name} failed ({type(err).__name__}: {err})")
                timings[name] = None
        # Timed calls interleaved over the candidates, so that load on the machine hits them alike.
        times: dict[str, list] = {name: [] for name in built}
        for _ in range(0 if self.forced else self.timing_calls):
            for name, fn in built.items():
                tic = time.perf_counter()
                fn(*inputs)
                times[name].append(time.perf_counter() - tic)
        for name, values in times.items():
            timings[name] = float(sorted(values)[len(values) // 2]) * 1e3 if values else None
        if self.forced:
            best = self.forced if self.forced in built else "eager"
        else:
            best = min(built, key=lambda n: timings[n])
        self.stats.backends[shape] = best
        self.stats.candidates_ms[shape] = timings
        self.stats.warmup_s[shape] = time.perf_counter() - start
        return best, built[best]

    @torch.inference_mode()
    def prepare(self, model: nn.Module, global_cond: torch.Tensor, event: Sequence[int], sampler: Any = None) -> dict:
        """Warm up every bucket ``sampler`` uses (CPU: pick the backends) for conditioning
        ``global_cond [B, G]`` and samples of shape ``event`` ([H, A]) before a timed loop. Returns
        {shape: backend}. On CUDA nothing is done here (graphs are captured at the first call)."""
        if global_cond.device.type != "cpu":
            return {}
        self._check_model(model)
        batch = global_cond.shape[0]
        gen = torch.Generator(device=global_cond.device).manual_seed(0)
        for bucket in resolve_buckets(self.buckets, sampler):
            x = torch.randn((bucket, batch, *event), generator=gen, device=global_cond.device)
            runner, _ = self._runner(model, x, global_cond, bucket)
            if runner.backend is None:
                runner.x.copy_(x.reshape(runner.x.shape))
                runner.t.copy_(torch.randint(0, 100, runner.t.shape, generator=gen, device=x.device))
                runner.cond.view(bucket, batch, -1).copy_(global_cond)
                runner.cond_token = -1  # the next call refills the conditioning
                runner.padded = -1  # ... and re-zeroes the padding
                self._select_backend(model, runner, bucket, batch)
        return dict(self.stats.backends)

    @torch.inference_mode()
    def _run(self, model, x, t, global_cond, bucket: int, token: int) -> torch.Tensor:
        k, batch = x.shape[0], x.shape[1]
        real = k * batch
        runner, new = self._runner(model, x, global_cond, bucket)
        cpu = x.device.type == "cpu"
        # A CPU graph backend has the bucket's fixed shape; before the backend is picked, the buffers
        # get the padding too, so that the candidates are measured at that shape.
        pads = self._pads(x.device) or (cpu and runner.backend != "eager")
        # Inputs into the static buffers: real rows first (row k*B + b has t[k], cond[b], as in the
        # plain path), then padding (zeros at timestep 0) up to the bucket.
        runner.x[:real].copy_(x.reshape(real, *x.shape[2:]))
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        runner.t[:real].view(k, batch).copy_(t[:, None])  # broadcasts one shared timestep too
        if runner.cond_token != token:  # once per predict_action call (and bucket)
            runner.cond.view(bucket, batch, -1).copy_(global_cond)
            runner.cond_token = token
        pad = runner.rows - real if pads else 0
        if pad and runner.padded != pad:  # else those rows are still zero from the last call
            runner.x[real:].zero_()
            runner.t[real:].zero_()
        runner.padded = pad

        if cpu and runner.backend is None:
            self._select_backend(model, runner, bucket, batch)
            if runner.backend == "eager":
                pads = self._pads(x.device)  # eager runs the real rows only (bit-identical to the plain path)
                pad = pad if pads else 0
        if cpu and runner.backend != "eager":
            out = runner.fn(runner.x, runner.t, runner.cond)[:real]  # fixed shape: the whole bucket
        else:
            if new and self._use_graph(x.device):
                self._capture(model, runner)  # records the kernels; the replay below runs them
            if runner.graph:
                runner.graph.replay()
                out = runner.out[:real].clone()  # the static output is overwritten by the next replay
            elif pads:
                out = self._call_model(model, runner)[:real]
            else:
                out = self._call_model(model, runner, rows=real)
        self.stats.calls += 1
        self.stats.rows += real
        self.stats.padded_rows += pad
        self.stats.per_bucket[bucket] = self.stats.per_bucket.get(bucket, 0) + 1
        return out.reshape(x.shape)


# ---------------------------------------------------------------------------------- policy hook
# "auto" fast paths, one per network, shared by shallow policy copies (baselines, shadows).
_AUTO: "weakref.WeakKeyDictionary[nn.Module, FastPath]" = weakref.WeakKeyDictionary()


def make_fast_path(enabled: Any = True, **options: Any) -> Any:
    """The value of ``policy.fast_path`` for ``enabled``: a FastPath (True, or ``enabled`` itself when
    it is one), None (False) or "auto"."""
    if isinstance(enabled, FastPath):
        if options:
            raise ValueError("options go to FastPath(...) itself when passing a FastPath")
        return enabled
    if enabled == "auto":
        if options:
            raise ValueError("options need an explicit fast path (enabled=True); 'auto' uses the defaults")
        return "auto"
    if enabled in (False, None, "off"):
        return None
    if enabled not in (True, "on"):
        raise ValueError(f"fast path must be true, false, 'on', 'off' or 'auto', got {enabled!r}")
    return FastPath(**options)


def eval_fast_path(mode: Any, device: Any) -> Any:
    """The fast path an evaluation runs for its ``fast_path`` setting ``mode`` on ``device`` (what
    ``load_policy(fast_path=...)`` takes). "auto" on CPU with OpenVINO installed: a FastPath with the
    ``openvino`` backend (the fastest at every shape measured here, benchmarks/RESULTS.md; still
    checked against eager per shape, eager where it fails). Forced rather than timed, so that the
    driver and its workers (Ray, a split run) pick the same backend and plan the same episodes. Without
    OpenVINO "auto" stays "auto" (CUDA graphs on CUDA, the plain path on CPU); other values are kept."""
    if mode != "auto" or torch.device(device).type != "cpu" or missing("openvino") is not None:
        return mode
    return FastPath(backend="openvino")


def apply_fast_path(policy: Any, denoise: Denoiser, global_cond: torch.Tensor) -> Denoiser:
    """What ``DiffusionPolicy.predict_action`` calls: wrap ``denoise`` per ``policy.fast_path``.

    None: plain path. "auto": a default FastPath when the model is on CUDA, else the plain path.
    A FastPath: always (on CPU it pads and slices, without graphs).
    """
    fast = policy.fast_path
    if fast is None:
        return denoise
    if isinstance(fast, str):
        if fast != "auto":
            raise ValueError(f"policy.fast_path must be None, 'auto' or a FastPath, got {fast!r}")
        if global_cond.device.type != "cuda":
            return denoise
        fast = _AUTO.get(policy.model)
        if fast is None:
            fast = _AUTO[policy.model] = FastPath()
    return fast.wrap(denoise, global_cond, policy.model, policy.sampler)


def active_fast_path(policy: Any, device: Any = None) -> Optional[FastPath]:
    """The FastPath ``policy`` uses on ``device`` (default: its own), or None for the plain path."""
    fast = policy.fast_path
    if isinstance(fast, FastPath):
        return fast
    device = torch.device(device) if device is not None else policy.device
    if fast == "auto" and device.type == "cuda":
        fast = _AUTO.get(policy.model)
        if fast is None:
            fast = _AUTO[policy.model] = FastPath()
        return fast
    return None


def global_condition(policy: Any, obs_history: torch.Tensor, images: Any = None) -> torch.Tensor:
    """What ``DiffusionPolicy.predict_action`` calls for its conditioning ``[B, G]``: an image policy's
    encoder through the active fast path (``FastPath.encoder``), else ``policy.global_condition``."""
    fast = active_fast_path(policy, obs_history.device)
    if fast is None or images is None:
        return policy.global_condition(obs_history, images)
    return fast.encoder(policy, obs_history, images)


def warm_up(policy: Any, batch_size: int = 1) -> dict:
    """Warm the fast path of ``policy`` up for its sampler's buckets at ``batch_size`` observation
    histories per call (CPU: measure and pick the backends), so that a timed loop doesn't pay for it.

    Returns ``{"backends": {shape: backend}, "warmup_s": seconds spent now}``; empty for the plain
    path and on CUDA (whose graphs are captured at the first call)."""
    fast = active_fast_path(policy)
    if fast is None:
        return {}
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    cfg = policy.config
    norm = policy.normalizer.obs
    mid = ((norm.min + norm.max) / 2).to(policy.device)  # any valid observation: only shapes matter
    obs = mid.expand(int(batch_size), cfg.n_obs_steps, cfg.obs_dim)
    before = sum(fast.stats.warmup_s.values())
    if getattr(cfg, "image_keys", None):  # image policies: the conditioning is the encoder's output
        frames = {key: torch.zeros((int(batch_size), cfg.n_obs_steps, *cfg.image_shape), dtype=torch.uint8,
                                   device=policy.device) for key in cfg.image_keys}
        global_cond = global_condition(policy, obs, frames)  # CPU: picks the encoder's backend for this batch
    else:
        global_cond = norm.normalize(obs).flatten(1)
    if getattr(cfg, "max_delay", 0):  # a delay-conditioned network also takes the known-actions columns
        global_cond = torch.cat([global_cond, policy.known_condition(None, torch.zeros(int(batch_size)))], dim=-1)
    backends = fast.prepare(policy.model, global_cond, (cfg.horizon, cfg.sample_dim), policy.sampler)
    return {"backends": backends, "warmup_s": sum(fast.stats.warmup_s.values()) - before}
