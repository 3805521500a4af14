"""The import graph of ``parapolicy`` has no cycle, and no module imports a command-line module.

The graph is read from the source with ``ast`` (nothing is imported), counting every import, also the
ones inside functions: a lazy import still ties the two modules together. Imports under
``if TYPE_CHECKING:`` are left out (they never run). Importing ``a.b.c`` is an edge to ``a.b.c`` only,
not to the packages above it: a package's ``__init__`` importing its own modules is no cycle.

A command-line module is one with ``if __name__ == "__main__":``, a ``@hydra.main`` function, or the
name ``__main__``; CLIs stay thin, so nothing may import one (not even another CLI).

Layers, lowest first: the observation module (numpy only), the samplers, the policy, the chunk executor
(``parapolicy.realtime``), serving. No module imports one of a layer above its own (``LAYERS``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# package-dir of pyproject.toml: the folders that hold parapolicy's modules, by package name
PACKAGE_DIRS = {"parapolicy": ROOT / "parapolicy", "parapolicy.envs": ROOT / "envs"}
# the entry points the README documents; the detection below must find at least these
KNOWN_CLIS = {"parapolicy.eval", "parapolicy.bench.__main__", "parapolicy.serve", "parapolicy.train",
              "parapolicy.collect", "parapolicy.convert", "parapolicy.report", "parapolicy.serve_bench",
              "parapolicy.video"}


# lowest first; a module of a layer imports only its own layer and those below (by module-name prefix)
LAYERS = [("observation", ("parapolicy.observation",)),
          ("samplers", ("parapolicy.samplers",)),
          ("policy", ("parapolicy.policy",)),
          ("executor", ("parapolicy.realtime",)),
          ("serving", ("parapolicy.serving",))]


def layer_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """``a imports b`` for every edge from a layered module to a module of a higher layer, or from a
    layered module to an unlayered one of ours (the CLIs, evaluation, bench, ...: all above)."""
    found = []
    for module, targets in edges.items():
        rank = layer_of(module)
        if rank is None:
            continue
        for target in targets:
            other = layer_of(target)
            if target in ("parapolicy", "parapolicy.devices", "parapolicy.configs", "parapolicy.envs") or \
                    target.startswith("parapolicy.envs."):
                continue  # shared helpers (devices, configs) and the environment side may be used by any layer
            if other is None or other > rank:
                found.append(f"{module} ({LAYERS[rank][0]}) imports {target}"
                             f" ({LAYERS[other][0] if other is not None else 'above the layers'})")
    return sorted(found)


def find_modules(package_dirs: dict[str, Path]) -> dict[str, Path]:
    """``{module name: file}`` for every ``.py`` file under the package folders."""
    modules = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: dict) -> str | None:
    """The longest prefix of a dotted name that is one of ours (``parapolicy.x.func`` -> ``parapolicy.x``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: the modules of ours it imports}``."""
    edges: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's package, `level - 1` packages up
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                # `from pkg import name`: the module pkg.name if there is one, else pkg itself
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            targets.update(t for t in (_resolve(n, modules) for n in names) if t is not None and t != module)
        edges[module] = targets
    return edges


def cli_modules(modules: dict[str, Path]) -> set[str]:
    """Modules that are command lines: ``if __name__ == "__main__"``, ``@hydra.main`` or ``__main__.py``."""
    found = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            main_guard = (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                          and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
                          and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))
            hydra_main = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                "hydra.main" in ast.unparse(d) for d in node.decorator_list)
            if main_guard or hydra_main:
                found.add(module)
                break
        if module.endswith(".__main__"):
            found.add(module)
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def cli_imports(edges: dict[str, set[str]], clis: set[str]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in edges.items() for target in targets
                  if target in clis)


def test_parapolicy_has_no_import_cycle():
    edges = import_edges(find_modules(PACKAGE_DIRS))
    assert "parapolicy.evaluation.driver" in edges and edges["parapolicy.evaluation.driver"]  # the scan sees imports
    found = cycles(edges)
    assert not found, "import cycles, one per line:\n" + "\n".join(", ".join(cycle) for cycle in found)


def test_no_module_imports_a_command_line_module():
    modules = find_modules(PACKAGE_DIRS)
    clis = cli_modules(modules)
    assert KNOWN_CLIS <= clis, f"not recognised as CLIs: {sorted(KNOWN_CLIS - clis)}"
    found = cli_imports(import_edges(modules), clis)
    assert not found, "imports of a command-line module (move what they need out of it):\n" + "\n".join(found)


def test_no_layer_imports_one_above_it():
    """observation < samplers < policy < executor (realtime) < serving; e.g. the executor must not import the
    protocol, the samplers not the policy's networks."""
    edges = import_edges(find_modules(PACKAGE_DIRS))
    assert "parapolicy.observation" in edges and edges["parapolicy.observation"] == set()  # numpy only
    assert "parapolicy.realtime.planner" in edges["parapolicy.serving.server"]  # the scan sees the layers' imports
    found = upward_imports(edges)
    assert not found, "imports from a lower layer to a higher one (move the shared code down):\n" + "\n".join(found)


def test_the_layer_check_catches_upward_imports():
    edges = {"parapolicy.realtime.async_policy": {"parapolicy.serving.protocol", "parapolicy.realtime.schedule"},
             "parapolicy.samplers.demo": {"parapolicy.policy.unet"},
             "parapolicy.policy.diffusion_policy": {"parapolicy.observation", "parapolicy.samplers.base",
                                                    "parapolicy.devices"},
             "parapolicy.observation": {"parapolicy.evaluation.sweeps"},
             "parapolicy.serving.server": {"parapolicy.realtime.planner", "parapolicy.policy.accel"}}
    assert upward_imports(edges) == [
        "parapolicy.observation (observation) imports parapolicy.evaluation.sweeps (above the layers)",
        "parapolicy.realtime.async_policy (executor) imports parapolicy.serving.protocol (serving)",
        "parapolicy.samplers.demo (samplers) imports parapolicy.policy.unet (policy)"]


def test_the_observation_module_is_numpy_only():
    tree = ast.parse((ROOT / "parapolicy" / "observation.py").read_text())
    names = {alias.name.split(".")[0] for node in _imports(tree) for alias in node.names
             if isinstance(node, ast.Import)} | {node.module.split(".")[0] for node in _imports(tree)
                                                 if isinstance(node, ast.ImportFrom) and node.module}
    assert names <= {"__future__", "math", "typing", "numpy"}, names


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_catch_a_planted_cycle_and_a_cli_import(tmp_path):
    """The checker on a small package: a two-module cycle through a lazy and a relative import, a
    three-module cycle, a module importing a CLI, and what must not count (TYPE_CHECKING, parents)."""
    _write(tmp_path / "pkg", {
        "__init__.py": "from pkg.sub import helper\n",
        "sub/__init__.py": "from pkg.sub.helper import f\n",
        "sub/helper.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\ndef f(): pass\n",
        "a.py": "def g():\n    from . import b\n",
        "b.py": "import pkg.a as a\n",
        "c.py": "from pkg.d import x\n",
        "d.py": "from pkg import e\nx = 1\n",
        "e.py": "import pkg.c\nimport os\n",
        "tool.py": "import hydra\n@hydra.main(version_base=None)\ndef main(cfg): pass\n",
        "user.py": "def run():\n    from pkg.tool import main\n",
        "script.py": "if __name__ == '__main__':\n    pass\n",
    })
    modules = find_modules({"pkg": tmp_path / "pkg"})
    edges = import_edges(modules)
    assert edges["pkg.sub.helper"] == set() and edges["pkg.sub"] == {"pkg.sub.helper"}
    assert sorted(cycles(edges)) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d", "pkg.e"]]
    assert cli_modules(modules) == {"pkg.tool", "pkg.script"}
    assert cli_imports(edges, cli_modules(modules)) == ["pkg.user imports pkg.tool"]
