"""The package's surface: cheap import, explicit public names, inference kept apart from training."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import labelstudio_maskclip
from labelstudio_maskclip import errors

PACKAGE = Path(labelstudio_maskclip.__file__).parent
_PREFIX = "labelstudio_maskclip."
MODULES = sorted(  # every module of every subpackage, e.g. "engine.segmenter"
    m.name.removeprefix(_PREFIX) for m in pkgutil.walk_packages(labelstudio_maskclip.__path__, _PREFIX) if not m.ispkg
)
SUBPACKAGES = sorted(m.name for m in pkgutil.iter_modules(labelstudio_maskclip.__path__) if m.ispkg)


def test_the_layout_is_the_pipeline():
    assert SUBPACKAGES == [
        "commands",
        "engine",
        "evaluation",
        "fetching",
        "labelstudio",
        "learning",
        "masks",
        "serving",
        "training",
    ]


def _package_imports(path: Path) -> set[str]:
    """Top-level names of this package that a module imports (relative or absolute), e.g. {"settings"}."""
    rel = path.relative_to(PACKAGE).parts[:-1]  # the module's subpackage, () at the top
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[: len(rel) - (node.level - 1)]) if node.level - 1 <= len(rel) else []
                parts = base + (node.module.split(".") if node.module else [a.name for a in node.names])
            elif node.module and node.module.startswith("labelstudio_maskclip."):
                parts = node.module.split(".")[1:]
            else:
                continue
            found.add(parts[0] if parts else "")
    return found


def test_engine_and_masks_import_nothing_of_the_rest():  # but the error classes, which import nothing
    for sub in ("engine", "masks"):
        for path in (PACKAGE / sub).glob("*.py"):
            assert _package_imports(path) <= {sub, "errors"}, f"{path.name} reaches outside {sub}/"


#: The package's layers, bottom first: a unit (a subpackage, or a top-level module) imports only itself and
#: units of lower layers, never a unit of its own layer or above (imports inside functions and under
#: TYPE_CHECKING count). README.md's Layout section lists them and draws the graph.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),  # the root of every error class, and its two branches
    ("engine", "masks"),  # the pure core: arrays and tensors in and out
    ("deadline", "files", "logs", "settings"),
    ("embeddings", "jobs"),
    ("models",),  # settings -> engine: the shared MaskCLIP, options, text embeddings
    ("evaluation",),
    ("fetching", "learning"),  # task images; the store of people's masks
    ("labelstudio", "training"),  # Label Studio's formats and client; the student
    ("serving",),  # the ML backend's web service
    ("commands",),  # bulk jobs that drive Label Studio
    ("cli", "__init__"),  # the command line; the package's public names
    ("__main__",),
]


def _unit(path: Path) -> str:
    """The layer unit of a module file: its subpackage, or its own name at the top ("settings")."""
    rel = path.relative_to(PACKAGE).parts
    return rel[0] if len(rel) > 1 else path.stem


def _unit_graph() -> dict[str, set[str]]:
    """unit -> the other units it imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        unit = _unit(path)
        imported = {name if name else "__init__" for name in _package_imports(path)}
        graph.setdefault(unit, set()).update(imported - {unit})
    return graph


def test_every_unit_imports_only_layers_below_it():
    layer_of = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    graph = _unit_graph()
    assert set(graph) == set(layer_of), "every subpackage and top-level module has a layer"
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer_of[b] >= layer_of[a])
    assert upward == [], "imports that go sideways or up the layers"


def _reduced_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The graph's edges that no longer path implies (its transitive reduction: the graph is acyclic)."""

    def reaches(start: str, goal: str, skip: tuple[str, str]) -> bool:
        todo, seen = [b for b in graph[start] if (start, b) != skip], set()
        while todo:
            unit = todo.pop()
            if unit == goal:
                return True
            if unit not in seen:
                seen.add(unit)
                todo.extend(graph[unit])
        return False

    return sorted((a, b) for a in graph for b in graph[a] if not reaches(a, b, (a, b)))


def _readme_layout() -> str:
    """The README's *Layout* section."""
    text = (PACKAGE.parent / "README.md").read_text()
    found = re.search(r"^## Layout\n(.*?)(?=^## )", text, re.S | re.M)
    assert found, "README.md has a ## Layout section"
    return found.group(1)


def test_the_readmes_graph_is_the_codes():
    documented = re.search(r"```mermaid\n(.*?)\n```", _readme_layout(), re.S)
    assert documented, "README.md's Layout section has a mermaid graph of the package"
    edges = _reduced_edges(_unit_graph())
    node = {unit: f'{unit.strip("_")}["{unit}"]' if unit.startswith("_") else unit for unit in _unit_graph()}
    expected = "\n".join(["flowchart TD"] + [f"  {node[a]} --> {node[b]}" for a, b in edges])
    assert documented.group(1) == expected, f"README.md's graph should read:\n{expected}"
    assert ("errors",) == LAYERS[0] and not any(a in LAYERS[0] for a, _ in edges)


def test_the_readmes_layout_lists_every_unit_once_lowest_first():
    """One line a unit (or a few of one layer), each unit once, in the order of the layers."""
    lines = [line for line in _readme_layout().splitlines() if line.startswith("- `")]
    named = [re.findall(r"`([\w/]+)`", line.split(":")[0]) for line in lines]
    units = [name.rstrip("/") for names in named for name in names]
    assert sorted(units) == sorted(_unit_graph()), "README.md's layout names every subpackage and top module once"
    layer_of = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    spans = [
        (min(layer_of[n.rstrip("/")] for n in names), max(layer_of[n.rstrip("/")] for n in names)) for names in named
    ]
    assert all(before[1] <= after[0] for before, after in zip(spans, spans[1:])), "lowest layer first"


def test_no_module_imports_another_modules_private_names():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(_PREFIX)):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                assert not private, f"{path.relative_to(PACKAGE)} imports {private} from {node.module}"


def test_every_module_declares_its_public_names_and_they_exist():
    assert {"engine.segmenter", "masks.brush", "learning.store", "settings"} <= set(MODULES)
    for name in MODULES:
        module = importlib.import_module(f"labelstudio_maskclip.{name}")
        assert hasattr(module, "__all__"), name
        for public in module.__all__:
            assert hasattr(module, public), f"{name}.{public}"
    for public in labelstudio_maskclip.__all__:
        assert getattr(labelstudio_maskclip, public) is not None


def _imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_importing_the_package_loads_no_model_code():
    loaded = _imported_after("import labelstudio_maskclip, labelstudio_maskclip.settings, labelstudio_maskclip.cli")
    assert "torch" not in loaded and "open_clip" not in loaded


def test_serving_never_imports_training_code():
    loaded = _imported_after(
        "import labelstudio_maskclip.serving.server, labelstudio_maskclip.serving.backend, labelstudio_maskclip.training.student, "
        "labelstudio_maskclip.labelstudio.regions"
    )
    assert "labelstudio_maskclip.training.train" not in loaded


def test_every_error_class_is_bad_input_or_unavailable():
    """Every public error class (and the server's private ones) derives from a branch; a module's private
    control-flow exceptions that never leave it (``serving.asgi``'s) may stay plain."""
    found = []
    for name in MODULES:
        module = importlib.import_module(f"labelstudio_maskclip.{name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == module.__name__:
                if not value.__name__.startswith("_") or name == "serving.server":
                    found.append(value)
    assert len(found) >= 24 and errors.MaskCLIPError in found
    for cls in found:
        if cls is not errors.MaskCLIPError:
            assert issubclass(cls, (errors.BadInput, errors.Unavailable)), f"{cls.__module__}.{cls.__qualname__}"
    assert issubclass(errors.BadInput, ValueError) and errors.BadInput.http_status == 400
    assert issubclass(errors.Unavailable, RuntimeError) and errors.Unavailable.http_status == 503


#: functions over the limit that are still to be split into named stages (none may join them)
LONG_FUNCTIONS_LEFT: set[str] = set()


def test_functions_fit_on_a_screen():
    """At most 60 lines a function (its docstring included): a longer one is split into named stages."""
    long = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.add(f"{path.relative_to(PACKAGE).as_posix()}:{node.name}")
    assert long <= LONG_FUNCTIONS_LEFT, f"split into named stages: {sorted(long - LONG_FUNCTIONS_LEFT)}"


#: Third-party packages heavy enough to import only where used (seconds and hundreds of MiB: torch and what
#: builds on it), or optional (``psycopg``: PostgreSQL stores only), or needed by one entry point only
#: (``a2wsgi``: gunicorn's worker).
HEAVY = frozenset(
    {"torch", "torchvision", "open_clip", "cv2", "pycocotools", "matplotlib", "label_studio_sdk", "a2wsgi", "psycopg"}
)
#: Modules whose imports inside functions need no other reason: the command line loads each command's modules
#: when that command runs (``--help`` and a light command start in a fraction of a second), and the package's
#: public names load on first use (PEP 562).
LAZY_MODULES = frozenset({"cli", "__init__"})
#: Imports inside functions still to move to the top: "module:function" -> why not yet (none may join them).
LAZY_LEFT: dict[str, str] = {}


def _module_name(path: Path) -> str:
    """``engine/segmenter.py`` -> ``engine.segmenter``; a package's ``__init__.py`` -> its package name."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """What an import statement loads: modules of this package (``"engine.text"``; a package's
    ``__init__`` by the package's name), and other packages by their root (``"torch"``, ``"json"``)."""
    if isinstance(node, ast.Import):
        return [
            a.name.removeprefix(_PREFIX) if a.name.startswith(_PREFIX) else a.name.split(".")[0] for a in node.names
        ]
    if not node.level and not (node.module or "").startswith(_PREFIX):
        root = (node.module or "").split(".")[0]
        return [] if root == "__future__" else [root]
    if node.level:
        here = module.split(".") if is_package else module.split(".")[:-1]
        here = [p for p in here if p != "__init__"]
        base = here[: len(here) - (node.level - 1)]
        parts = base + (node.module.split(".") if node.module else [])
    else:
        parts = node.module.removeprefix(_PREFIX).split(".")
    out = []
    for alias in node.names:  # `from . import x` / `from .engine import prompts`: a submodule, else the module
        sub = PACKAGE.joinpath(*parts, alias.name)
        out.append(
            ".".join([*parts, alias.name]) if sub.with_suffix(".py").exists() or sub.is_dir() else ".".join(parts)
        )
    return [o if o else "__init__" for o in out]


def _in_function(tree: ast.Module) -> tuple[list[ast.stmt], list[tuple[str, ast.stmt]]]:
    """The module's imports that run when it is imported (under ``if TYPE_CHECKING:`` left out), and those
    inside its functions (with the function's name)."""
    top: list[ast.stmt] = []
    inner: list[tuple[str, ast.stmt]] = []

    def walk(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (inner.append((function, child)) if function else top.append(child))
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            walk(child, name)

    walk(tree, None)
    return top, inner


def _import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str, int]]]:
    """(module -> what importing it loads directly, parent packages included; the imports inside functions:
    (module, function, what it loads, line))."""
    direct: dict[str, set[str]] = {}
    lazy = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, is_package = _module_name(path), path.name == "__init__.py"
        top, inner = _in_function(ast.parse(path.read_text()))
        parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)} | {"__init__"}
        direct[module] = (parents | {t for n in top for t in _targets(n, module, is_package)}) - {module}
        lazy += [(module, f, t, n.lineno) for f, n in inner for t in _targets(n, module, is_package)]
    return direct, lazy


def _loads(direct: dict[str, set[str]], start: str) -> set[str]:
    """Every module of this package and third-party root that importing ``start`` loads."""
    seen, todo = set(), [start]
    while todo:
        unit = todo.pop()
        if unit not in seen:
            seen.add(unit)
            todo.extend(direct.get(unit, ()))
    return seen


def test_an_import_inside_a_function_has_a_reason():
    """An import stays inside a function only to spare the module's importers a heavy dependency (:data:`HEAVY`)
    it does not load at its top, to break a cycle (the imported module loads this one), or in a module that
    loads lazily on purpose (:data:`LAZY_MODULES`); never for the standard library or a module this one loads
    at its top anyway. Else it goes to the top, where a reader looks for it."""
    direct, lazy = _import_graph()
    loads = {module: _loads(direct, module) for module in direct}
    unjustified = []
    for module, function, target, line in lazy:
        spared = (loads.get(target, {target}) - loads[module]) & HEAVY
        cycle = module in loads.get(target, set())
        pointless = target in sys.stdlib_module_names or target in loads[module]
        if f"{module}:{function}" in LAZY_LEFT:
            continue
        if pointless or not (spared or cycle or module in LAZY_MODULES):
            unjustified.append(f"{module}:{line} {function}: {target}")
    assert unjustified == [], "move these imports to the top of their module"
