from pathlib import Path

import pytest

from tests.labelstudio import LabelStudioServer, started
from tests.postgres import postgres, postgres_url, store_url  # noqa: F401  (fixtures: a real PostgreSQL)
from tests.tiny import TINY_VIT, save_random_state


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> LabelStudioServer:
    """A real Label Studio on a loopback port for the whole session (about 30 s to start; its first start
    migrates the database, which can take minutes on a loaded machine). The one Label Studio of the suite: a
    test that needs other settings says so by starting its own through :func:`tests.labelstudio.started`."""
    with started(tmp_path_factory.mktemp("label-studio"), start_timeout=900) as server:
        yield server


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    """The tiny ViT's random weights (:data:`tests.tiny.TINY_VIT`, seed 0), written once for the session: the
    one weights file of every test that loads the tiny MaskCLIP (model versions read ``...tiny_vit.pt``)."""
    return save_random_state(TINY_VIT, tmp_path_factory.mktemp("weights") / "tiny_vit.pt")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """Settings come from the environment: no test sees the caller's MASKCLIP_* / LABEL_STUDIO_* values."""
    import os

    from labelstudio_maskclip.settings import ENV

    for name in ENV.values():
        if name in os.environ:
            monkeypatch.delenv(name)
