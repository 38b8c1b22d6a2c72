"""The Label Studio REST client's retry rules, against a loopback HTTP server that fails on purpose."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from labelstudio_maskclip.fetching.images import ImageFetcher
from labelstudio_maskclip.labelstudio.api import AmbiguousWriteError, LabelStudioAPI, LabelStudioAPIError, task_filter
from tests.labelstudio import free_port


class Flaky:
    """Answers ``statuses`` in turn (then 200 with ``{"created": 1}``) and records every request."""

    def __init__(self, statuses: list[int]):
        self.statuses = list(statuses)
        self.seen: list[tuple[str, str, str]] = []
        flaky = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                flaky.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
                status = flaky.statuses.pop(0) if flaky.statuses else 200
                payload = json.dumps({"created": len(json.loads(body)) if body else 0, "tasks": []}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = _answer

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky():
    servers: list[Flaky] = []

    def make(statuses):
        servers.append(Flaky(statuses))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _api(url: str, retries: int = 3) -> LabelStudioAPI:
    return LabelStudioAPI(ImageFetcher(url, "a" * 40), retries=retries, backoff=0.01, timeout=10)


def test_reads_are_retried_on_5xx_until_they_succeed(flaky):
    server = flaky([503, 502])
    assert _api(server.url).request("GET", "/api/projects/1") == {"created": 0, "tasks": []}
    assert [m for m, _, _ in server.seen] == ["GET"] * 3
    assert server.seen[0][2] == "Token " + "a" * 40


def test_reads_give_up_after_the_retries(flaky):
    server = flaky([500] * 10)
    with pytest.raises(LabelStudioAPIError) as err:
        _api(server.url, retries=2).request("GET", "/api/tasks")
    assert err.value.status == 500 and len(server.seen) == 3


def test_a_bulk_write_answered_5xx_is_never_sent_again(flaky):
    server = flaky([503])
    with pytest.raises(AmbiguousWriteError):
        _api(server.url).import_predictions(1, [{"task": 1, "result": [], "score": 0.5, "model_version": "v"}])
    assert [m for m, _, _ in server.seen] == ["POST"]  # once: it may have been applied


def test_a_bulk_write_returns_what_label_studio_created(flaky):
    server = flaky([])
    preds = [{"task": t, "result": [], "score": 0.5, "model_version": "v"} for t in (1, 2, 3)]
    assert _api(server.url).import_predictions(7, preds) == 3
    assert server.seen == [("POST", "/api/projects/7/import/predictions", "Token " + "a" * 40)]


def test_a_write_that_could_not_connect_is_retried_and_then_reported_as_not_sent():
    api = _api(f"http://127.0.0.1:{free_port()}", retries=2)  # nobody listens: never sent
    with pytest.raises(LabelStudioAPIError) as err:
        api.import_predictions(1, [])
    assert not isinstance(err.value, AmbiguousWriteError)


def test_client_errors_are_not_retried(flaky):
    server = flaky([400])
    with pytest.raises(LabelStudioAPIError) as err:
        _api(server.url).request("GET", "/api/tasks")
    assert err.value.status == 400 and len(server.seen) == 1


def test_task_filter_pages_by_id_and_filters_version_and_labels():
    q = task_filter(after_id=41, without_version="maskclip+-2", unlabeled=True)
    assert q["ordering"] == ["tasks:id"]
    items = {i["filter"]: i for i in q["filters"]["items"]}
    assert items["filter:tasks:id"]["operator"] == "greater" and items["filter:tasks:id"]["value"] == 41
    assert items["filter:tasks:predictions_model_versions"]["value"] == ["maskclip+-2"]
    assert items["filter:tasks:total_annotations"]["value"] == 0
    assert set(items) == {
        "filter:tasks:id",
        "filter:tasks:predictions_model_versions",
        "filter:tasks:total_annotations",
    }
    assert len(task_filter()["filters"]["items"]) == 1
