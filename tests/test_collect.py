"""Webhook events -> store: decoding, ordering, rejections, acceptance figures, backfill."""

from __future__ import annotations

import copy
import json
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

from labelstudio_maskclip.labelstudio import webhooks as collect
from labelstudio_maskclip.labelstudio.webhooks import (
    CollectError,
    backfill_from_api,
    backfill_from_export,
    handle_event,
    image_reference,
)
from labelstudio_maskclip.learning.store import Store
from labelstudio_maskclip.masks.brush import mask_to_brush_rle
from labelstudio_maskclip.masks.polygons import points_to_percent, polygons_to_mask

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools + numpy 2

H, W = 40, 60
CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="cat"/><Label value="dog"/></BrushLabels>'
    '<PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels></View>'
)


def disc(cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def brush(region_id: str, label: str, mask: np.ndarray) -> dict:
    return {
        "id": region_id,
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": mask.shape[1],
        "original_height": mask.shape[0],
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_brush_rle(mask), "brushlabels": [label]},
    }


def polygon(region_id: str, label: str, points: np.ndarray) -> dict:
    return {
        "id": region_id,
        "from_name": "poly",
        "to_name": "image",
        "type": "polygonlabels",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"points": points_to_percent(points, H, W).tolist(), "closed": True, "polygonlabels": [label]},
    }


def event(
    annotation_id: int,
    task_id: int,
    result: list,
    *,
    action: str = "ANNOTATION_CREATED",
    updated_at: str = "2026-11-02T10:00:00.000000Z",
    **annotation: Any,
) -> dict:
    """A webhook body shaped like Label Studio 1.23's."""
    return {
        "action": action,
        "annotation": {
            "id": annotation_id,
            "result": result,
            "was_cancelled": False,
            "ground_truth": False,
            "lead_time": 3.2,
            "parent_prediction": None,
            "completed_by": 1,
            "task": task_id,
            "project": 1,
            "updated_at": updated_at,
            **annotation,
        },
        "project": {"id": 1, "title": "pets", "label_config": CONFIG},
        "task": {
            "id": task_id,
            "data": {"caption": "two pets", "image": f"/data/upload/1/img{task_id}.png"},
            "project": 1,
            "predictions": [],
        },
    }


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path)


def only_sample(store: Store):
    (sample,) = list(store.accepted_samples())
    return sample


def test_brush_and_polygon_regions_merge_per_label(store: Store) -> None:
    square = np.array([[5, 5], [25, 5], [25, 20], [5, 20]], float)
    result = [
        brush("a", "cat", disc(10, 10, 6)),
        brush("b", "cat", disc(30, 40, 5)),
        polygon("c", "dog", square),
        polygon("d", "cat", square + [30, 0]),
        {"id": "x", "type": "choices", "value": {"choices": ["indoor"]}, "from_name": "c", "to_name": "image"},
    ]
    outcome = handle_event(event(1, 7, result), store)
    assert (outcome.status, outcome.labels, outcome.rejected) == ("stored", ["cat", "dog"], [])
    sample = only_sample(store)
    assert (sample.task_id, sample.image, sample.height, sample.width, sample.author) == (
        7,
        "/data/upload/1/img7.png",
        H,
        W,
        "1",
    )
    cat = disc(10, 10, 6) | disc(30, 40, 5) | polygons_to_mask([square + [30, 0]], H, W)
    np.testing.assert_array_equal(sample.masks["cat"], cat)
    np.testing.assert_array_equal(sample.masks["dog"], polygons_to_mask([square], H, W))
    assert sample.masks["dog"][5:20, 5:25].all() and sample.masks["dog"].sum() == 300
    assert store.annotation(1)["accepted_unchanged"] is None  # no prediction: unknown


def test_same_event_twice_changes_nothing(store: Store) -> None:
    body = event(1, 7, [brush("a", "cat", disc(10, 10, 6))])
    assert handle_event(body, store).status == "stored"
    seq = store.current_seq()
    assert handle_event(copy.deepcopy(body), store).status == "duplicate"
    assert store.current_seq() == seq


def test_update_replaces_and_old_events_do_not_overwrite(store: Store) -> None:
    handle_event(event(1, 7, [brush("a", "cat", disc(10, 10, 6))]), store)
    newer = event(
        1,
        7,
        [brush("b", "dog", disc(20, 20, 8))],
        action="ANNOTATION_UPDATED",
        updated_at="2026-11-02T10:05:00.000000Z",
    )
    older = event(
        1,
        7,
        [brush("c", "cat", disc(20, 20, 3))],
        action="ANNOTATION_UPDATED",
        updated_at="2026-11-02T10:02:00.000000Z",
    )
    assert handle_event(newer, store).status == "stored"
    assert handle_event(older, store).status == "stale"
    sample = only_sample(store)
    assert list(sample.masks) == ["dog"]
    np.testing.assert_array_equal(sample.masks["dog"], disc(20, 20, 8))


def test_delete_removes_even_against_late_updates(store: Store) -> None:
    handle_event(event(1, 7, [brush("a", "cat", disc(10, 10, 6))]), store)
    handle_event(event(2, 8, [brush("a", "cat", disc(10, 10, 6))]), store)
    deleted = handle_event({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}], "project": {"id": 1}}, store)
    assert (deleted.status, deleted.annotation_ids) == ("deleted", [1])
    assert [s.task_id for s in store.accepted_samples()] == [8]
    late = event(
        1, 7, [brush("a", "cat", disc(10, 10, 9))], action="ANNOTATION_UPDATED", updated_at="2027-01-01T00:00:00Z"
    )
    assert handle_event(late, store).status == "deleted"
    assert [t.id for t in store.unlabeled_tasks()] == [7]


def test_cancelled_annotations_are_not_masks(store: Store) -> None:
    handle_event(event(1, 7, [brush("a", "cat", disc(10, 10, 6))]), store)
    skipped = event(
        1,
        7,
        [brush("a", "cat", disc(10, 10, 6))],
        action="ANNOTATION_UPDATED",
        updated_at="2026-11-02T11:00:00Z",
        was_cancelled=True,
    )
    assert handle_event(skipped, store).status == "cancelled"
    assert list(store.accepted_samples()) == [] and store.annotation(1)["labels"] == []
    assert store.count_since_last_training() == 0


def test_labels_outside_the_config_drop_only_their_region(store: Store) -> None:
    body = event(1, 7, [brush("a", "cat", disc(10, 10, 6)), brush("b", "zebra", disc(30, 40, 5))])
    outcome = handle_event(body, store)
    assert outcome.status == "stored" and outcome.labels == ["cat"]
    assert len(outcome.rejected) == 1 and "zebra" in outcome.rejected[0] and "labeling config" in outcome.rejected[0]
    assert list(only_sample(store).masks) == ["cat"]
    # A label of another control does not count: "bird" is a RectangleLabels label, not a brush one.
    config = CONFIG.replace(
        "</View>", '<RectangleLabels name="box" toName="image"><Label value="bird"/></RectangleLabels></View>'
    )
    body = event(2, 8, [brush("a", "bird", disc(10, 10, 6)), brush("b", "dog", disc(30, 40, 5))])
    body["project"]["label_config"] = config
    outcome = handle_event(body, store)
    assert outcome.labels == ["dog"] and "bird" in outcome.rejected[0]


def test_undecodable_region_rejects_the_annotation_and_keeps_the_stored_one(store: Store) -> None:
    handle_event(event(1, 7, [brush("a", "cat", disc(10, 10, 6))]), store)
    handle_event(event(2, 8, [brush("a", "dog", disc(10, 10, 6))]), store)
    wrong_size = brush("a", "cat", disc(10, 10, 6))
    wrong_size["original_height"] = H + 1  # the RLE holds H x W pixels
    bad_bodies = [
        event(1, 7, [wrong_size], action="ANNOTATION_UPDATED", updated_at="2027-01-01T00:00:00Z"),
        event(
            1,
            7,
            [
                {
                    **brush("a", "cat", disc(1, 1, 1)),
                    "value": {"format": "rle", "rle": [1, 2, 3], "brushlabels": ["cat"]},
                }
            ],
        ),
        event(
            1,
            7,
            [{**brush("a", "cat", disc(1, 1, 1)), "value": {"format": "rle", "rle": "abc", "brushlabels": ["cat"]}}],
        ),
        event(1, 7, [{**brush("a", "cat", disc(1, 1, 1)), "value": None}]),
        event(1, 7, [{**brush("a", "cat", disc(1, 1, 1)), "original_width": None}]),
        event(1, 7, [{**brush("a", "cat", disc(1, 1, 1)), "original_width": 10**6, "original_height": 10**6}]),
        event(1, 7, [{**brush("a", "cat", disc(1, 1, 1)), "value": {"rle": [0], "brushlabels": []}}]),
        event(
            1,
            7,
            [
                {
                    **polygon("p", "cat", np.array([[1, 1], [5, 1], [5, 5]])),
                    "value": {"points": [[1, "x"], [2, 2], [3, 3]], "polygonlabels": ["cat"]},
                }
            ],
        ),
        event(
            1,
            7,
            [
                {
                    **polygon("p", "cat", np.array([[1, 1], [5, 1], [5, 5]])),
                    "value": {"points": [[1, 1]], "polygonlabels": ["cat"]},
                }
            ],
        ),
        event(1, 7, [brush("a", "cat", disc(10, 10, 6)), {**brush("b", "dog", np.ones((5, 5), bool))}]),
        event(1, 7, "not a list"),
        event("x", 7, []),
        {**event(1, 7, []), "task": {"id": None, "data": {}}},
        {"action": "ANNOTATION_CREATED"},
        {**event(1, 7, []), "project": {"id": 1, "label_config": "<View><broken"}},
        {"action": "ANNOTATIONS_DELETED", "annotations": "all"},
        {"action": "TASKS_CREATED", "tasks": [None, {"id": "x"}]},
    ]
    for body in bad_bodies:
        outcome = handle_event(body, store)
        assert outcome.status == "rejected" and outcome.rejected, body
        assert all(isinstance(reason, str) and reason for reason in outcome.rejected)
    samples = {s.annotation_id: s for s in store.accepted_samples()}
    assert sorted(samples) == [1, 2]
    np.testing.assert_array_equal(samples[1].masks["cat"], disc(10, 10, 6))
    assert store.check() == []


def test_unusable_bodies_raise_collect_error_and_other_actions_are_ignored(store: Store) -> None:
    for body in (None, [1, 2], "ANNOTATION_CREATED", {"annotation": {}}, {"action": ""}):
        with pytest.raises(CollectError):
            handle_event(body, store)
    assert handle_event({"action": "PROJECT_UPDATED", "project": {"id": 1}}, store).status == "ignored"
    training = handle_event({"action": "START_TRAINING", "project": {"id": 1}}, store)
    assert training.train_requested and training.status == "train"


def test_random_garbage_never_raises(store: Store) -> None:
    rng = random.Random(3)
    good = event(1, 7, [brush("a", "cat", disc(10, 10, 6)), polygon("p", "dog", np.array([[1, 1], [9, 1], [9, 9]]))])
    junk = [None, 0, -1, 1.5, "", "x", [], {}, [None], {"a": 1}, True, 10**12]

    def mutate(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (rng.choice(junk) if rng.random() < 0.1 else mutate(v))
                for k, v in node.items()
                if rng.random() > 0.05
            }
        if isinstance(node, list) and len(node) < 50:
            return [rng.choice(junk) if rng.random() < 0.1 else mutate(v) for v in node]
        return node

    for _ in range(300):
        body = mutate(copy.deepcopy(good))
        body["action"] = rng.choice(
            ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "TASKS_CREATED", "ANNOTATIONS_DELETED"]
        )
        outcome = handle_event(body, store)  # must not raise
        assert not any("unexpected payload shape" in reason for reason in outcome.rejected), outcome.rejected
    assert store.check() == []


def test_tasks_created_feed_the_unlabeled_pool(store: Store) -> None:
    tasks = [
        {"id": 3, "data": {"caption": "a", "photo": "s3://b/3.jpg"}, "project": 1},
        {"id": 4, "data": {"image": "/data/local-files/?d=x/4.png"}},
    ]
    outcome = handle_event({"action": "TASKS_CREATED", "tasks": tasks, "project": {"id": 1}}, store)
    assert (outcome.status, outcome.task_ids) == ("tasks", [3, 4])
    assert [(t.id, t.project, t.image) for t in store.unlabeled_tasks()] == [
        (3, 1, "s3://b/3.jpg"),
        (4, 1, "/data/local-files/?d=x/4.png"),
    ]
    handle_event(event(1, 3, [brush("a", "cat", disc(10, 10, 6))]), store)
    assert [t.id for t in store.unlabeled_tasks()] == [4]


def test_image_reference() -> None:
    data = {"text": "hello", "thumb": "https://x/t.jpg", "image": "/data/upload/1/a.png"}
    assert image_reference(data) == "https://x/t.jpg"
    assert image_reference(data, "image") == "/data/upload/1/a.png"
    assert image_reference({"text": "hello"}) is None
    assert image_reference({"pic": "photos/cat.JPG"}) == "photos/cat.JPG"


def test_config_image_key_wins_over_guessing(store: Store) -> None:
    body = event(1, 7, [brush("a", "cat", disc(10, 10, 6))])
    body["task"]["data"] = {"thumb": "https://x/t.jpg", "image": "/data/upload/1/big.png"}
    handle_event(body, store)
    assert only_sample(store).image == "/data/upload/1/big.png"


def test_acceptance_against_the_parent_prediction(store: Store) -> None:
    predicted = [
        brush("p1", "cat", disc(10, 10, 6)),
        brush("p2", "dog", disc(30, 40, 5)),
        brush("p3", "cat", disc(30, 10, 4)),
    ]
    # Accepted as is: same regions (the brush RLE re-encoded by the editor still counts as unchanged).
    same = [dict(r) for r in predicted]
    same[0] = {**same[0], "value": {**same[0]["value"], "rle": mask_to_brush_rle(disc(10, 10, 6))}}
    body = event(1, 7, same, parent_prediction=55)
    body["task"]["predictions"] = [{"id": 55, "model_version": "maskclip-0", "result": predicted}]
    handle_event(body, store)
    # Edited p1, deleted p2, kept p3, added a new region.
    edited = [brush("p1", "cat", disc(10, 10, 8)), predicted[2], brush("n1", "dog", disc(5, 50, 3))]
    body = event(2, 8, edited, parent_prediction=56)
    body["annotation"]["prediction"] = {"id": 56, "result": predicted}  # the export's shape
    handle_event(body, store)
    assert store.annotation(1)["accepted_unchanged"] == 1
    assert store.annotation(2)["accepted_unchanged"] == 0
    stats = store.acceptance_stats()
    assert stats["cat"] == {"unchanged": 3, "edited": 1, "deleted": 0, "added": 0}
    assert stats["dog"] == {"unchanged": 1, "edited": 0, "deleted": 1, "added": 1}
    assert stats["(annotations)"] == {"unchanged": 1, "edited": 1, "unknown": 0}


# --- backfill ----------------------------------------------------------------------------------------------


def export_tasks() -> list[dict]:
    """A Label Studio JSON export: tasks with their annotations (and one task without)."""
    first = event(11, 1, [brush("a", "cat", disc(10, 10, 6))])
    second = event(12, 2, [brush("a", "dog", disc(20, 20, 6))], ground_truth=True)
    tasks = []
    for body in (first, second):
        annotation = {**body["annotation"], "completed_by": {"id": 1, "email": "ann@example.com"}}
        tasks.append({**body["task"], "annotations": [annotation], "predictions": []})
    tasks.append(
        {"id": 3, "data": {"image": "/data/upload/1/img3.png"}, "annotations": [], "predictions": [], "project": 1}
    )
    tasks[1]["annotations"].append({**tasks[1]["annotations"][0], "id": 13, "was_cancelled": True})
    return tasks


def check_backfilled(store: Store) -> None:
    assert [(s.task_id, s.annotation_id, list(s.masks), s.author) for s in store.accepted_samples()] == [
        (1, 11, ["cat"], "ann@example.com"),
        (2, 12, ["dog"], "ann@example.com"),
    ]
    assert [t.id for t in store.unlabeled_tasks()] == [3]


def test_backfill_from_export_file_is_idempotent(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export_tasks()))
    first = backfill_from_export(path, store, label_config=CONFIG)
    assert first.counts == {"tasks": 3, "stored": 2, "cancelled": 1} and first.rejected == []
    check_backfilled(store)
    seq = store.current_seq()
    again = backfill_from_export(path, store, label_config=CONFIG)
    assert again.counts == {"tasks": 3, "duplicate": 3}
    assert store.current_seq() == seq
    with pytest.raises(CollectError, match="list of tasks"):
        backfill_from_export({"tasks": []}, store)  # type: ignore[arg-type]
    with pytest.raises(CollectError, match="cannot read"):
        backfill_from_export(tmp_path / "missing.json", store)


@pytest.fixture
def label_studio_like() -> Iterator[str]:
    """A loopback HTTP server answering the two Label Studio API calls the backfill makes."""
    tasks = export_tasks()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.headers.get("Authorization") != "Token secret":
                body, status = b'{"detail": "no"}', 401
            elif self.path == "/api/projects/1":
                body, status = json.dumps({"id": 1, "label_config": CONFIG}).encode(), 200
            elif self.path == "/api/projects/1/export?exportType=JSON&download_all_tasks=true":
                body, status = json.dumps(tasks).encode(), 200
            elif self.path.startswith("/api/tasks?"):  # paged like Label Studio
                query = {k: v[0] for k, v in parse_qs(urlparse(self.path).query).items()}
                page, size = int(query["page"]), int(query["page_size"])
                assert query["project"] == "1"
                body = json.dumps({"tasks": tasks[(page - 1) * size : page * size], "total": len(tasks)}).encode()
                status = 200
            else:
                body, status = b"{}", 404
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_backfill_from_api_with_the_package_client(store: Store, label_studio_like: str) -> None:
    from labelstudio_maskclip.fetching.images import ImageFetcher
    from labelstudio_maskclip.labelstudio.api import LabelStudioAPI

    client = LabelStudioAPI(ImageFetcher(label_studio_like, "secret", allow_private=True))
    outcome = backfill_from_api(client, 1, store)
    assert outcome.counts == {"tasks": 3, "stored": 2, "cancelled": 1}
    check_backfilled(store)
    client.tasks = lambda project_id: client.__class__.tasks(client, project_id, page_size=2)  # several pages
    assert backfill_from_api(client, 1, store).counts == {"tasks": 3, "duplicate": 3}
    from labelstudio_maskclip.labelstudio.api import LabelStudioAPIError

    with pytest.raises(LabelStudioAPIError, match="404"):
        backfill_from_api(client, 2, store)
    anonymous = LabelStudioAPI(ImageFetcher(label_studio_like, "", allow_private=True))
    with pytest.raises(LabelStudioAPIError, match="401.*LABEL_STUDIO_API_KEY"):
        backfill_from_api(anonymous, 1, store)


def test_public_surface() -> None:
    assert all(hasattr(collect, name) for name in collect.__all__)


def test_an_annotation_started_from_a_prediction_queues_a_small_follow_up(tmp_path):
    """Label Studio's webhook names the parent prediction without its result: the backend queues a follow-up
    that fetches it, carrying the annotation's small fields and the config, not its masks."""
    from labelstudio_maskclip.serving.backend import MaskCLIPBackend
    from labelstudio_maskclip.serving.followups import ParentPredictionCheck
    from labelstudio_maskclip.settings import Settings

    backend = MaskCLIPBackend(Settings(model_dir=str(tmp_path), label_studio_url="http://127.0.0.1:9"))
    body = event(5, 3, [brush("r1", "cat", disc(20, 30, 10))], parent_prediction=9, lead_time=4.0,
                 completed_by={"id": 1, "email": "a@example.org"}, draft_id=0)  # fmt: skip
    check = backend._parent_prediction_check(body)
    assert check == ParentPredictionCheck(
        annotation_id=5, prediction_id=9, task=3, project=1, label_config=CONFIG,
        fields={"id": 5, "task": 3, "project": 1, "completed_by": {"id": 1, "email": "a@example.org"},
                "ground_truth": False, "was_cancelled": False, "parent_prediction": 9,
                "updated_at": "2026-11-02T10:00:00.000000Z"},
    )  # fmt: skip
    at_limit = copy.deepcopy(body)
    at_limit["project"]["label_config"] = CONFIG.ljust(65_536)  # the longest config a follow-up carries
    assert backend._parent_prediction_check(at_limit).label_config == at_limit["project"]["label_config"]
    big = copy.deepcopy(body)
    big["project"]["label_config"] = CONFIG.ljust(65_537)
    big["annotation"]["completed_by"] = {"id": 1, "bio": "x" * 100_000}
    check = backend._parent_prediction_check(big)
    assert check is not None and check.label_config is None and "completed_by" not in check.fields
    only_annotation_names_it = {k: v for k, v in body.items() if k != "task"}
    assert backend._parent_prediction_check(only_annotation_names_it).task == 3
    only_body_names_it = {**body, "annotation": {k: v for k, v in body["annotation"].items() if k != "task"}}
    assert backend._parent_prediction_check(only_body_names_it).task == 3
    for change in ({"id": None}, {"parent_prediction": None}, {"prediction": {"id": 9, "result": []}}):
        assert backend._parent_prediction_check({**body, "annotation": {**body["annotation"], **change}}) is None
    no_label_studio = MaskCLIPBackend(Settings(model_dir=str(tmp_path)))
    assert no_label_studio._parent_prediction_check(body) is None
