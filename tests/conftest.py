import pytest

from tests.labelstudio import LabelStudioServer, LabelStudioUnavailable


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> LabelStudioServer:
    """A real Label Studio on a loopback port for the whole session (about 30 s to start)."""
    server = LabelStudioServer(tmp_path_factory.mktemp("label-studio"))
    try:
        server.start()
    except LabelStudioUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()
