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

On CPU no graph is captured, and by default (``pad="auto"``) the model runs on the real rows of the
buffers only: padding would cost CPU FLOPs for nothing, and it changes float32 rounding in the last bit
(MKL / oneDNN pick GEMM and convolution kernels by the number of rows, so a row's result depends on
how many rows share the call, padding or not). The CPU fast path is therefore bit-identical to the
plain path. ``pad=True`` computes the padding on CPU too (the tests use it to exercise the bucketing
as the GPU runs it): real rows then match the plain path to float32 rounding (~1e-6), and do not
depend on the padding's content at all (bit for bit).

    policy.enable_fast_path()                      # CUDA: graphs on; CPU: padding only
    policy.enable_fast_path(dtype="bfloat16")      # + autocast
    policy.enable_fast_path(False)                 # plain path
    policy.fast_path = "auto"                      # the default: on for CUDA, off on CPU

The graphs hold pointers to the model's parameters and to the buffers: loading weights in place
(``load_state_dict``) is fine; moving the model (``.to(...)``) invalidates them and they are
recaptured on the next call.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
AUTO_PARALLEL_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # parallel samplers without a `window`


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


@dataclass
class FastPathStats:
    calls: int = 0
    rows: int = 0  # real network rows evaluated
    padded_rows: int = 0  # padding rows evaluated on top
    fallbacks: int = 0  # calls with K above every bucket, run on the plain path
    captures: int = 0  # CUDA graphs captured
    capture_failures: int = 0
    per_bucket: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"calls": self.calls, "rows": self.rows, "padded_rows": self.padded_rows,
                "fallbacks": self.fallbacks, "captures": self.captures,
                "capture_failures": self.capture_failures,
                "per_bucket": {str(k): v for k, v in sorted(self.per_bucket.items())}}


class FastPath:
    """Denoiser wrapper with static shapes; CUDA graphs, autocast and torch.compile as options.

    Options:
      buckets: "auto" (default; see ``resolve_buckets``) or a list of K sizes. A call with K rows of
        trajectory points is padded to the smallest bucket >= K.
      pad: "auto" (default: run the model on the whole bucket on CUDA, on the real rows on CPU), True
        (always the whole bucket) or False (real rows only; no CUDA graph then, shapes vary).
      overflow: "fallback" (default: a K above every bucket runs on the plain path, counted in
        ``stats.fallbacks``) or "error" (raise ValueError).
      cuda_graph: "auto" (default: capture on CUDA, and fall back to eager with a warning if capture
        fails), True (capture, raise on failure; an error off CUDA), False (never).
      dtype: "float32" (default), "bfloat16" or "float16": autocast of the model call; the output is
        cast back to the input's dtype (float32).
      compile: False (default), True (torch.compile mode "default") or a torch.compile mode string.
      warmup: eager calls on a side stream before a capture (default 2).
    """

    def __init__(self, *, buckets: Any = "auto", pad: Any = "auto", overflow: str = "fallback",
                 cuda_graph: Any = "auto", dtype: Any = "float32", compile: Any = False, warmup: int = 2):
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

    # ------------------------------------------------------------------ public
    def options(self) -> dict:
        return {"buckets": self.buckets if isinstance(self.buckets, str) or self.buckets is None
                else list(self.buckets), "pad": self.pad, "overflow": self.overflow, "cuda_graph": self.cuda_graph,
                "dtype": str(self.dtype).replace("torch.", ""), "compile": self.compile, "warmup": self.warmup}

    def reset(self) -> None:
        """Drop every buffer, graph and compiled function (they are rebuilt on the next call)."""
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
        """Buffers and graphs belong to one model at one place in memory; recapture if it moved."""
        first = next(model.parameters())
        key = (id(model), first.device, first.data_ptr())
        if key != self._model_key:
            self.reset()
            self._model_key = key

    def _forward_fn(self, model: nn.Module) -> Callable:
        if not self.compile:
            return model
        if self._compiled is None:
            mode = "default" if self.compile is True else str(self.compile)
            self._compiled = torch.compile(model, mode=mode, dynamic=False)
        return self._compiled

    def _call_model(self, model: nn.Module, runner: _Runner, rows: Optional[int] = None) -> torch.Tensor:
        """The model on the buffers' first ``rows`` rows (all of them by default)."""
        forward = self._forward_fn(model)
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

    @torch.inference_mode()
    def _run(self, model, x, t, global_cond, bucket: int, token: int) -> torch.Tensor:
        k, batch = x.shape[0], x.shape[1]
        real = k * batch
        runner, new = self._runner(model, x, global_cond, bucket)
        pads = self._pads(x.device)
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
    """The value of ``policy.fast_path`` for ``enabled``: a FastPath (True), None (False) or "auto"."""
    if enabled == "auto":
        if options:
            raise ValueError("options need an explicit fast path (enabled=True); 'auto' uses the defaults")
        return "auto"
    if enabled in (False, None, "off"):
        return None
    if enabled not in (True, "on"):
        raise ValueError(f"fast path must be true, false, 'on', 'off' or 'auto', got {enabled!r}")
    return FastPath(**options)


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
