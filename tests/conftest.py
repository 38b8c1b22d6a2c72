import pytest

from tests.labelstudio import LabelStudioServer, started


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> LabelStudioServer:
    """A real Label Studio on a loopback port for the whole session (about 30 s to start)."""
    with started(tmp_path_factory.mktemp("label-studio")) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    """Settings come from the environment: no test sees the caller's MASKCLIP_* / LABEL_STUDIO_* values."""
    import os

    from labelstudio_maskclip.settings import ENV

    for name in ENV.values():
        if name in os.environ:
            monkeypatch.delenv(name)
