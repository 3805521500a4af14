"""OpenVINO and ONNX Runtime as CPU fast-path backends (``backend="openvino"`` / ``"onnxruntime"``).

A module is exported once per static shape to ONNX (``torch.onnx.export``) and run by the runtime on
that shape; ``parapolicy.policy.accel.FastPath`` measures it beside eager and TorchScript and keeps it only
if its output equals eager's within ``atol`` (the check lives there, not here).

The exported graphs are cached on disk, so that a second process does not export again. A file's name
is a digest of everything its content depends on: the module's weights and buffers (their bytes), its
architecture (``repr`` and the source of its classes), the input shapes and dtypes, and the versions
of torch, onnx and onnxscript; both runtimes read the same file (OpenVINO's compiled blobs are kept
per OpenVINO version). A Diffusion Policy-size U-Net takes about 1 GB per shape (and as much again for
OpenVINO's blob): delete the folder to reclaim it. Changing a weight, the code, a shape or a library gives another name;
stale files are never read. The cache is ``$PARAPOLICY_CACHE`` if set, else
``$XDG_CACHE_HOME/parapolicy`` (``~/.cache/parapolicy``), subfolder ``fast_path``; OpenVINO also
keeps its compiled blobs there (its ``CACHE_DIR``, per OpenVINO version).

Both are optional extras (``pip install parapolicy[openvino]`` / ``[onnx]``): ``missing(name)`` says
why one cannot run (not installed, or failing to import), and the fast path then skips it with a note.
Both run float32 (OpenVINO's ``INFERENCE_PRECISION_HINT=f32``: on CPUs with bf16 units it would
otherwise pick bf16) on ``threads`` intra-op threads (1 by default: the cores are shared with the
simulator and other processes), one inference stream, latency hint, OpenVINO's threads not pinned.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

RUNTIMES = ("openvino", "onnxruntime")
# what each backend imports: the exporter needs onnx (torch.onnx writes through it), the runtime its own
_MODULES = {"openvino": ("onnx", "openvino"), "onnxruntime": ("onnx", "onnxruntime")}
_EXPORTER = ("onnx", "onnxscript")  # besides torch: what an exported graph's bytes depend on
_EXTRA = {"openvino": "openvino", "onnxruntime": "onnx"}
ONNX_OPSET = 17
CACHE_ENV = "PARAPOLICY_CACHE"


def missing(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run here (a sentence), or None when its libraries import."""
    for module in _MODULES[name]:
        try:
            importlib.import_module(module)
        except Exception as err:  # ImportError, or a broken install (ABI mismatch) failing at import
            return (f"{name} skipped: {module} does not import ({type(err).__name__}: {err}); "
                    f"pip install 'parapolicy[{_EXTRA[name]}]'")
    return None


def cache_dir(override: Optional[str] = None) -> Path:
    """Where exported graphs are kept: ``override``, else ``$PARAPOLICY_CACHE``, else the user cache."""
    if override:
        root = Path(override)
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "parapolicy"
    return root / "fast_path"


def library_versions(name: Optional[str] = None) -> dict:
    """The versions of torch and the exporter's libraries (an exported graph's cache key holds them),
    plus those of backend ``name``'s runtime when given."""
    versions = {"torch": torch.__version__}
    for module in (*_EXPORTER, *(_MODULES[name] if name else ())):
        try:
            versions[module] = str(getattr(importlib.import_module(module), "__version__", "?"))
        except Exception:  # onnxscript is optional (torch.export's exporter only)
            versions[module] = None
    return versions


# (id, first data pointer, parameter versions) -> digest: hashing 1 GB of weights costs a second or two,
# once per module state rather than once per shape
_DIGESTS: dict = {}


def weights_digest(module: nn.Module) -> str:
    """A digest of ``module``'s state (every parameter and buffer: name, dtype, shape, bytes) and of its
    architecture (``repr`` and the source of the classes it is made of)."""
    tensors = list(module.state_dict(keep_vars=True).items())
    try:
        versions = sum(t._version for _, t in tensors)
    except RuntimeError:  # inference tensors: no version counter (and no in-place change either)
        versions = -1
    memo = (id(module), tensors[0][1].data_ptr() if tensors else 0, versions)
    if memo in _DIGESTS:
        return _DIGESTS[memo]
    digest = hashlib.blake2b(digest_size=20)
    digest.update(repr(module).encode())
    for cls in sorted({type(m) for m in module.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        digest.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        if not cls.__module__.startswith("torch."):  # our code may change; torch's is covered by its version
            try:
                digest.update(inspect.getsource(cls).encode())
            except (OSError, TypeError):
                pass
    for name, tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    if len(_DIGESTS) > 64:
        _DIGESTS.clear()
    _DIGESTS[memo] = digest.hexdigest()
    return _DIGESTS[memo]


def artifact_key(module: nn.Module, inputs: Sequence[torch.Tensor]) -> str:
    """The cache key of the ONNX graph of ``module`` at the shapes of ``inputs``: one file serves both
    runtimes (OpenVINO keeps its compiled blobs per OpenVINO version beside it)."""
    parts = {"weights": weights_digest(module), "opset": ONNX_OPSET,
             "inputs": [[list(x.shape), str(x.dtype)] for x in inputs], "versions": library_versions()}
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def _input_names(n: int) -> list[str]:
    return [f"in{i}" for i in range(n)]


def export_onnx(module: nn.Module, inputs: Sequence[torch.Tensor], path: Path) -> Path:
    """``module(*inputs)`` as an ONNX graph of those static shapes at ``path`` (written to a temporary
    file first, then renamed: a concurrent reader never sees half a file). The TorchScript-based
    exporter is tried first (under a second for the Square U-Net here, against ~8 s for torch.export's),
    then torch.export's (``dynamo=True``, needs onnxscript)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    modes = [(m, m.training) for m in module.modules()]  # the exporters may leave modules in training mode
    module.eval()
    try:
        return _export(module, inputs, path)
    finally:
        for m, training in modes:
            m.training = training


def _export(module: nn.Module, inputs: Sequence[torch.Tensor], path: Path) -> Path:
    with torch.inference_mode(False), torch.no_grad():
        args = tuple(x.clone() for x in inputs)  # normal tensors: export traces, inference tensors refuse that
        errors = []
        for dynamo in (False, True):
            fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
            os.close(fd)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # deprecation and tracer warnings: shapes are static here
                    kwargs = {"opset_version": ONNX_OPSET} if not dynamo else {"external_data": False, "verbose": False}
                    torch.onnx.export(module, args, tmp, input_names=_input_names(len(args)),
                                      output_names=["out"], dynamo=dynamo, **kwargs)
                os.replace(tmp, path)
                return path
            except Exception as err:
                first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
                errors.append(f"{'torch.export' if dynamo else 'TorchScript'} exporter: {type(err).__name__}: {first}")
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    raise RuntimeError("ONNX export failed (" + "; ".join(errors) + ")")


class RuntimeCache:
    """Exports (or finds) a module's graph and opens it in a runtime. ``exports`` counts the graphs this
    object exported (the rest came from the disk cache)."""

    def __init__(self, directory: Optional[str] = None, threads: int = 1):
        self.directory = directory
        self.threads = int(threads)
        self.exports = 0
        self.hits = 0

    def graph(self, name: str, module: nn.Module, inputs: Sequence[torch.Tensor]) -> Path:
        """The cached ONNX file for ``module``'s weights at these shapes (whichever runtime ``name``
        opens it), exported now if absent."""
        path = cache_dir(self.directory) / "onnx" / f"{artifact_key(module, inputs)}.onnx"
        if path.exists():
            self.hits += 1
            return path
        export_onnx(module, inputs, path)
        self.exports += 1
        return path

    def build(self, name: str, module: nn.Module, inputs: Sequence[torch.Tensor]) -> Callable:
        """A callable ``(*tensors) -> tensor`` running ``module``'s graph in runtime ``name`` at the
        shapes of ``inputs``. Raises when the runtime is missing (callers check ``missing`` first)."""
        reason = missing(name)
        if reason:
            raise RuntimeError(reason)
        path = self.graph(name, module, inputs)
        if name == "onnxruntime":
            return _onnxruntime(path, self.threads, len(inputs))
        if name == "openvino":
            return _openvino(path, self.threads, len(inputs), cache_dir(self.directory) / "openvino-blobs")
        raise ValueError(f"unknown runtime {name!r}")


def _numpy(x: torch.Tensor):
    return x.detach().contiguous().numpy()


def _onnxruntime(path: Path, threads: int, n_inputs: int) -> Callable:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = _input_names(n_inputs)
    used = {i.name for i in session.get_inputs()}  # the exporter drops an input the graph does not read

    def run(*args: torch.Tensor) -> torch.Tensor:
        feeds = {n: _numpy(a) for n, a in zip(names, args) if n in used}
        return torch.from_numpy(session.run(None, feeds)[0])

    return run


def _openvino(path: Path, threads: int, n_inputs: int, blobs: Path) -> Callable:
    import openvino as ov

    core = ov.Core()
    blobs = blobs / str(ov.__version__).split("-")[0]
    blobs.mkdir(parents=True, exist_ok=True)
    # no pinning: the cores are shared (simulator, other processes), and a thread pinned to a busy core
    # waits for it (benchmarks/RESULTS.md, issue #36)
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False, "CACHE_DIR": str(blobs)}
    try:
        compiled = core.compile_model(str(path), "CPU", config)
    except RuntimeError as err:
        # OpenVINO 2026.4's subgraph fusion ("snippets") fails to compile some shapes here ("Supported
        # precisions set is not available for Mish operation", one thread, 3 rows); without it they compile
        if "snippets" not in str(err).lower() and "precisions" not in str(err).lower():
            raise
        compiled = core.compile_model(str(path), "CPU", {**config, "SNIPPETS_MODE": "DISABLE"})
    request = compiled.create_infer_request()
    names = _input_names(n_inputs)
    # each runtime input by the exported name it carries (a folded Cast may add names; order is kept)
    slots = {}
    for index, port in enumerate(compiled.inputs):
        found = [i for i, n in enumerate(names) if n in port.get_names()]
        slots[index] = found[0] if found else index

    def run(*args: torch.Tensor) -> torch.Tensor:
        request.infer({index: _numpy(args[arg]) for index, arg in slots.items()}, share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())  # the next infer overwrites it

    return run
