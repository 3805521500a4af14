"""Read torch checkpoints written with pickle / dill without running any code they contain.

``torch.load(weights_only=False)`` on a foreign checkpoint is remote code execution: a pickle can name
any importable callable (``os.system``, ``builtins.eval``) and have it called. ``torch.load(weights_only=True)``
is safe but refuses Diffusion Policy's workspace checkpoints, whose ``cfg`` is an OmegaConf object pickled
with dill. ``safe_torch_load`` takes the middle road: torch's own zip reader (``torch.load`` with a
``pickle_module`` whose ``Unpickler.find_class`` is restricted), so storages come from the archive's
``data/`` records as usual, while the pickle may only name

- tensor / storage rebuild functions of torch, ``collections.OrderedDict`` and plain built-in types;
- classes of OmegaConf (and the few dill / typing helpers its pickles use), which become *inert
  stand-ins* (``Inert``): no code of those libraries runs, the stand-in just records the constructor
  arguments and the pickled state, from which ``inert_to_plain`` reads the config values.

Anything else raises ``UnsafePickleError`` naming the global, before it is called.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any

import torch


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list (``.global_name`` is ``module.name``)."""

    def __init__(self, module: str, name: str):
        self.global_name = f"{module}.{name}"
        super().__init__(
            f"refusing to load global {self.global_name!r}: only tensors, plain containers and config "
            f"objects are allowed (parapolicy never runs code from a checkpoint)"
        )


class Inert:
    """Stand-in for an allow-listed foreign class or helper (an OmegaConf node, ``typing.Any``, ...).

    Creating, calling or restoring it never runs foreign code: it keeps ``args`` (constructor or call
    arguments) and ``state`` (what pickle's BUILD passed). Subclasses are made per global name by
    ``_stand_in``; ``inert_name`` is ``module.qualname`` of the global it replaces.
    """

    inert_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Inert":
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # pickle's REDUCE calls cls(*args)
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.inert_name}>"


_STAND_INS: dict[str, type[Inert]] = {}


def _stand_in(module: str, name: str) -> type[Inert]:
    key = f"{module}.{name}"
    if key not in _STAND_INS:
        _STAND_INS[key] = type(f"Inert[{key}]", (Inert,), {"inert_name": key})
    return _STAND_INS[key]


def _safe_codecs_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles spell bytes objects as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode arguments ({type(text).__name__}, {encoding!r})")
    return text.encode(encoding, errors)


def _plain_defaultdict(*args: Any) -> dict:
    # The default factory is dropped: a plain dict holds the same items and calls nothing later.
    return {}


def _safe_reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    # copyreg._reconstructor(cls, object, None): only ever builds our own stand-ins.
    if isinstance(cls, type) and issubclass(cls, Inert):
        return cls()
    raise pickle.UnpicklingError(f"copyreg._reconstructor asked to build {cls!r}")


_BUILTINS = {
    name: getattr(__import__("builtins"), name)
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
                 "bytearray", "bool", "slice", "range", "object")
}

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): _plain_defaultdict,
    ("_codecs", "encode"): _safe_codecs_encode,
    ("copyreg", "_reconstructor"): _safe_reconstructor,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    **{("builtins", name): value for name, value in _BUILTINS.items()},
}
# torch dtypes (optimizer states may carry them): plain objects, no behaviour.
_ALLOWED.update({("torch", n): getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)})

# Globals that become inert stand-ins: OmegaConf's containers / nodes / metadata and the helpers their
# pickles reference (dill's type lookup, typing annotations, enum/pathlib values in a config).
_INERT_MODULE_PREFIXES = ("omegaconf.",)
_INERT_NAMES = {
    ("dill._dill", "_load_type"),
    ("dill._dill", "_get_attr"),
    ("typing", "Any"), ("typing", "Dict"), ("typing", "List"), ("typing", "Tuple"),
    ("typing", "Optional"), ("typing", "Union"), ("typing", "Sequence"), ("typing", "Mapping"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "Path"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` only admits the allow-list above (see module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 0-2 pickles (torch.save's default) spell names the Python 2 way (__builtin__.eval):
        # map them as pickle's fix_imports would, so the allow-list and messages use Python 3 names.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if module.startswith(_INERT_MODULE_PREFIXES) or module == "omegaconf" or key in _INERT_NAMES:
            return _stand_in(module, name)
        raise UnsafePickleError(module, name)


def _load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


def _loads(data: bytes, **kwargs: Any) -> Any:
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


# What torch.load needs from a ``pickle_module``: ``Unpickler`` (subclassed by torch's zip loader for
# persistent storages) and ``load``. A module object so torch's ``pickle_module.__name__`` checks work.
restricted_pickle = types.ModuleType("parapolicy_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = _load  # type: ignore[attr-defined]
restricted_pickle.loads = _loads  # type: ignore[attr-defined]
restricted_pickle.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` (a plain pickle, e.g. DP's ``pickles`` entries) with the restricted unpickler."""
    return _loads(data)


def safe_torch_load(path: str | Path, what: str | None = None) -> Any:
    """``torch.load`` of a zip-format checkpoint on the CPU, without running pickled code.

    Raises ``ValueError`` naming the file for a missing / truncated / corrupt / legacy-format file, and
    for a pickle that names a global outside the allow-list (the message names that global; nothing
    from the pickle was called).
    """
    path = Path(path)
    what = what or f"checkpoint {path.name}"
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found ({path})")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{what}: not a torch zip archive (truncated, corrupt, or the legacy pre-1.6 torch.save format, "
            f"which this reader does not accept)"
        )
    try:
        with zipfile.ZipFile(path) as archive:  # torch's reader does not check the records' CRC32s
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ValueError(f"{what}: corrupt zip archive ({err})") from err
    if bad is not None:
        raise ValueError(f"{what}: corrupt, record {bad!r} fails its CRC check")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except UnsafePickleError as err:
        raise ValueError(f"{what}: refused, its pickle asks for {err.global_name!r}, which is not a tensor, "
                         f"container or config object; nothing from it was run") from err
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, TypeError, AttributeError,
            IndexError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{what}: unreadable (truncated or corrupt?): {type(err).__name__}: {err}") from err


# ---------------------------------------------------------------------------------------- OmegaConf
_MAX_DEPTH = 64


def inert_to_plain(obj: Any, _depth: int = 0) -> Any:
    """An unpickled OmegaConf config (inert stand-ins) -> plain dicts / lists / scalars.

    Interpolation strings (``"${horizon}"``, ``"${eval:...}"``) are kept as the raw strings: nothing is
    resolved or evaluated here. Unknown stand-ins become their global's name in angle brackets.
    """
    if _depth > _MAX_DEPTH:
        raise ValueError("config nests too deeply")
    if isinstance(obj, Inert):
        state = obj.state if isinstance(obj.state, dict) else {}
        kind = obj.inert_name.rsplit(".", 1)[-1]
        if kind == "DictConfig":
            content = state.get("_content")
            if isinstance(content, dict):
                return {str(inert_to_plain(k, _depth + 1)): inert_to_plain(v, _depth + 1) for k, v in content.items()}
            return content if content is None or isinstance(content, str) else f"<{obj.inert_name}>"
        if kind == "ListConfig":
            content = state.get("_content")
            if isinstance(content, (list, tuple)):
                return [inert_to_plain(v, _depth + 1) for v in content]
            return content if content is None or isinstance(content, str) else f"<{obj.inert_name}>"
        if "_val" in state:  # AnyNode, IntegerNode, StringNode, ... (ValueNode subclasses)
            return inert_to_plain(state["_val"], _depth + 1)
        return f"<{obj.inert_name}>"
    if isinstance(obj, dict):
        return {str(inert_to_plain(k, _depth + 1)): inert_to_plain(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [inert_to_plain(v, _depth + 1) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return f"<{type(obj).__name__}>"
