"""Offscreen OpenGL for MuJoCo: the backend chosen before robosuite is imported.

MuJoCo picks its backend from ``MUJOCO_GL`` when it is imported, in this process and in every env
worker process (they inherit the variable). ``select_gl_backend`` sets it first: the user's value if
given, else the first of egl, osmesa that creates a context (probed in a subprocess, so a failed
backend leaves this process free to try the next). Rendered videos and camera observations need it.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import subprocess
import sys

BACKENDS = ("egl", "osmesa")
# the system library each backend loads, and where Debian/Ubuntu ship it
LIBRARIES = {"egl": ("EGL", "libEGL.so.1", "libegl1"), "osmesa": ("OSMesa", "libOSMesa.so", "libosmesa6")}
_PROBE = "import mujoco; c = mujoco.GLContext(16, 16); c.make_current(); c.free()"


def _probe(backend: str, timeout: float = 60.0) -> str | None:
    """None if MuJoCo makes an offscreen context with ``backend`` (in a fresh process), else why not."""
    env = {**os.environ, "MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no context within {timeout:.0f} s"
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def _missing_library(backend: str) -> str:
    name, soname, package = LIBRARIES[backend]
    found = ctypes.util.find_library(name)
    state = f"{soname} not found" if found is None else f"{found} found but no context"
    return f"MUJOCO_GL={backend}: {state} (Debian/Ubuntu: apt-get install {package})"


def _active_backend() -> str | None:
    """The backend robosuite already chose in this process (it reads MUJOCO_GL once, at import)."""
    binding = sys.modules.get("robosuite.utils.binding_utils")
    return getattr(binding, "_MUJOCO_GL", None) if binding is not None else None


def select_gl_backend() -> str:
    """Set ``MUJOCO_GL`` (and ``PYOPENGL_PLATFORM``) for offscreen rendering before robosuite is imported;
    returns the backend. Raises RuntimeError, one line naming the missing system library, when none works.
    """
    logging.getLogger("OpenGL").setLevel(logging.WARNING)  # PyOpenGL's INFO line about an optional module
    active = _active_backend()
    if active:  # too late to choose: robosuite is imported; use what it has
        return active
    wanted = os.environ.get("MUJOCO_GL", "").strip().lower()
    candidates = (wanted,) if wanted else BACKENDS
    failures = []
    for backend in candidates:
        error = _probe(backend)
        if error is None:
            os.environ["MUJOCO_GL"] = backend
            if backend in BACKENDS:
                os.environ.setdefault("PYOPENGL_PLATFORM", backend)
            return backend
        failures.append(_missing_library(backend) if backend in LIBRARIES else f"MUJOCO_GL={backend}: {error}")
    raise RuntimeError("offscreen rendering (video=true, camera observations) needs OpenGL for MuJoCo: " + "; ".join(failures))




def available_gl_backend() -> str | None:
    """The first of egl, osmesa that makes a context, or None; sets nothing (for tests)."""
    return next((backend for backend in BACKENDS if _probe(backend) is None), None)
