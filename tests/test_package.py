"""The package's surface: cheap import, explicit public names, inference kept apart from training."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import labelstudio_maskclip

# Every module of every subpackage (packages themselves only document their stage).
_PREFIX = "labelstudio_maskclip."
MODULES = sorted(
    m.name.removeprefix(_PREFIX) for m in pkgutil.walk_packages(labelstudio_maskclip.__path__, _PREFIX) if not m.ispkg
)


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
        "import labelstudio_maskclip.labelstudio.server, labelstudio_maskclip.labelstudio.backend, labelstudio_maskclip.training.student, "
        "labelstudio_maskclip.labelstudio.regions"
    )
    assert "labelstudio_maskclip.training.train" not in loaded
