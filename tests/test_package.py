"""The package's surface: cheap import, explicit public names, inference kept apart from training."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import labelstudio_maskclip

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


def test_engine_and_masks_import_nothing_of_the_rest():
    for sub in ("engine", "masks"):
        for path in (PACKAGE / sub).glob("*.py"):
            assert _package_imports(path) <= {sub}, f"{path.name} reaches outside {sub}/"


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
