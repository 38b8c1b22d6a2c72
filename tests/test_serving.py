"""Serving under a deadline: text embeddings prepared in the background and kept on disk, one time budget per
/predict, warm-up, the compiled image tower, and the exact shortcut that finishes segmentations."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from labelstudio_maskclip.deadline import NO_DEADLINE, Deadline
from labelstudio_maskclip.embeddings import TURN_LABELS, EmbeddingStore
from labelstudio_maskclip.engine import segmenter
from labelstudio_maskclip.engine.refine import prompt_denoising
from labelstudio_maskclip.engine.segmenter import MaskCLIP, SegmentOptions
from labelstudio_maskclip.serving import backend as backend_module
from labelstudio_maskclip.serving.backend import MaskCLIPBackend, runtime
from labelstudio_maskclip.serving.server import create_app
from labelstudio_maskclip.settings import Settings
from tests.photos import COCO128_PHOTOS
from tests.tiny import TINY_VIT

BRUSH = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Animal" predicted_values="cat,dog"/><Label value="Food"/>
<Label value="Sky"/></BrushLabels></View>"""
LABELS = (("cat", "dog"), ("Food",), ("Sky",))


def _settings(weights, tmp_path, **changes) -> Settings:
    return Settings(
        model=TINY_VIT, pretrained=str(weights), device="cpu", short_side=64, templates="simple",
        model_dir=str(tmp_path / "model_dir"), min_area=0.0, **changes,
    )  # fmt: skip


def _uri(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# --- the shortcut in _finalize ------------------------------------------------------------------------------


def _reference_finalize(probs: torch.Tensor, size: tuple[int, int], n_labels: int, min_conf: float):
    """The plain definition: upsample every class, argmax, drop background and low-confidence pixels."""
    best, label = F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0].max(0)
    label = label.masked_fill((label >= n_labels) | (best < min_conf), -1)
    valid = label >= 0
    areas = torch.bincount(label[valid], minlength=n_labels)[:n_labels]
    sums = torch.bincount(label[valid], weights=best[valid].double(), minlength=n_labels)[:n_labels]
    scores = torch.where(areas > 0, sums / areas.clamp_min(1), torch.zeros_like(sums))
    score = float(best[valid].mean()) if bool(valid.any()) else 0.0
    return label.numpy(), best.numpy(), areas.numpy(), scores.float().numpy(), score


@pytest.mark.parametrize("seed", range(8))
def test_finalize_upsamples_only_classes_that_can_win_and_matches_the_plain_definition(seed):
    gen = torch.Generator().manual_seed(seed)
    k, h, w = 3 + seed * 4, 1 + seed, 9 - seed
    smooth = F.interpolate(torch.randn(1, k, 3, 3, generator=gen) * 4, size=(h, w), mode="bilinear")
    sharp = 3.0 if seed < 4 else 0.1  # nearly flat probabilities: many close contenders per block
    probs = prompt_denoising((smooth * sharp).softmax(1), 0.3)[0] if seed % 2 else (smooth * sharp).softmax(1)[0]
    size = (17 + 9 * seed, 40 - 3 * seed)
    n_labels = k - seed % 3  # the last classes are background in some cases
    min_conf = 0.4 if seed % 4 == 3 else 0.0
    seg = segmenter._finalize(probs, size, n_labels, min_conf)
    label, best, areas, scores, score = _reference_finalize(probs, size, n_labels, min_conf)
    assert np.allclose(seg.confidence, best, atol=1e-6)
    assert (seg.labels == label).mean() > 0.999  # exact up to ties between equal probabilities
    assert np.abs(seg.class_areas - areas).sum() <= 0.001 * label.size
    assert np.allclose(seg.class_scores, scores, atol=1e-4) and seg.score == pytest.approx(score, abs=1e-4)
    assert seg.labels.dtype == np.int16 and seg.class_areas.dtype == np.int64
    assert len(segmenter._candidates(probs[None])) <= k


def test_candidates_drop_a_class_that_loses_everywhere_and_keep_every_winner():
    probs = torch.tensor([[[0.6, 0.1], [0.6, 0.6]], [[0.3, 0.8], [0.3, 0.3]], [[0.1, 0.1], [0.1, 0.1]]])
    assert segmenter._candidates(probs[None]).tolist() == [0, 1]
    one_row = probs[:, :1, :]  # a 1-cell-high grid still works
    assert segmenter._candidates(one_row[None]).tolist() == [0, 1]
    # Of a batch: the classes that can win in some image. Class 2 wins the second image's every cell.
    other = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.7, 0.7]])[:, :, None].expand(3, 2, 2)
    assert segmenter._candidates(torch.stack([other, other])).tolist() == [2]
    assert segmenter._candidates(torch.stack([probs, other])).tolist() == [0, 1, 2]


# --- the compiled image tower -------------------------------------------------------------------------------


def test_the_compiled_image_tower_gives_the_eager_results(weights):
    eager = MaskCLIP.load(TINY_VIT, str(weights), "cpu", templates="simple")
    compiled = MaskCLIP.load(TINY_VIT, str(weights), "cpu", templates="simple", compile=True)
    assert compiled.compiled and not eager.compiled
    image = np.asarray(Image.open(COCO128_PHOTOS / "000000000009.jpg").convert("RGB"))
    opts = SegmentOptions(short_side=64)
    a = eager.segment([image], ["zebra", "grass", "sky"], opts=opts)[0]
    b = compiled.segment([image], ["zebra", "grass", "sky"], opts=opts)[0]
    assert np.allclose(a.grid_probs, b.grid_probs, atol=1e-4)
    assert (a.labels == b.labels).mean() > 0.99


# --- the embedding store ------------------------------------------------------------------------------------


class _Counting:
    """A stand-in text tower: counts calls, optionally blocks until released."""

    def __init__(self, block: bool = False, dim: int = 4):
        self.calls, self.dim = 0, dim
        self.release = threading.Event()
        if not block:
            self.release.set()

    def __call__(self, labels):  # one row per name, as the model's name_embeddings
        self.calls += 1
        self.release.wait(60)
        n = sum(len(names) for names in labels)
        return F.normalize(torch.arange(n * self.dim, dtype=torch.float32).view(n, -1) + 1, dim=-1)


IDENTITY = {"architecture": "tiny", "weights": "file:1:abc", "templates": "t1"}


def test_store_computes_in_the_background_once_and_a_restart_reads_the_file(tmp_path):
    compute = _Counting(block=True)
    store = EmbeddingStore(tmp_path, IDENTITY, compute)
    future = store.prepare(LABELS)
    assert store.wait(LABELS, 0.05) is None and store.get(LABELS) is None  # still computing: no blocking
    assert store.prepare(LABELS) is future  # one job per label set
    compute.release.set()
    emb = future.result(30)
    assert emb.shape == (4, 4) and compute.calls == 1
    assert torch.equal(store.wait(LABELS, 0), emb)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1

    again = _Counting()
    restarted = EmbeddingStore(tmp_path, IDENTITY, again)  # a new process, or another worker
    assert torch.equal(restarted.prepare(LABELS).result(0), emb) and again.calls == 0


@pytest.mark.parametrize(
    "change",
    [{"identity": {**IDENTITY, "templates": "t2"}}, {"identity": {**IDENTITY, "weights": "file:2:def"}},
     {"labels": (("cat",), ("Food",), ("Sky",))}, {"labels": (("Food",), ("cat", "dog"), ("Sky",))}],
)  # fmt: skip
def test_anything_the_embeddings_depend_on_gives_another_file(tmp_path, change):
    EmbeddingStore(tmp_path, IDENTITY, _Counting()).prepare(LABELS).result(30)
    compute = _Counting()
    other = EmbeddingStore(tmp_path, change.get("identity", IDENTITY), compute)
    other.prepare(change.get("labels", LABELS)).result(30)
    assert compute.calls == 1 and len(list(tmp_path.glob("*.pt"))) == 2


def test_a_damaged_file_is_computed_again_and_replaced(tmp_path):
    first = EmbeddingStore(tmp_path, IDENTITY, _Counting())
    first.prepare(LABELS).result(30)
    path = first.path(LABELS)
    path.write_bytes(path.read_bytes()[:100])  # cut short
    compute = _Counting()
    emb = EmbeddingStore(tmp_path, IDENTITY, compute).prepare(LABELS).result(30)
    assert compute.calls == 1 and emb.shape == (4, 4)
    assert torch.equal(EmbeddingStore(tmp_path, IDENTITY, _Counting()).prepare(LABELS).result(0), emb)


def test_concurrent_workers_compute_once_and_the_others_read_the_file(tmp_path):
    computes = [_Counting(block=True) for _ in range(3)]
    stores = [EmbeddingStore(tmp_path, IDENTITY, c) for c in computes]  # three worker processes
    futures = [s.prepare(LABELS) for s in stores]
    deadline = time.monotonic() + 30
    while sum(c.calls for c in computes) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    for c in computes:
        c.release.set()
    results = [f.result(30) for f in futures]
    assert sum(c.calls for c in computes) == 1  # the lock file lets one compute; the others read its file
    assert all(torch.equal(r, results[0]) for r in results)


def test_a_failed_computation_is_reported_and_tried_again(tmp_path):
    calls = []

    def flaky(labels):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return torch.ones(sum(len(n) for n in labels), 4)

    store = EmbeddingStore(tmp_path, IDENTITY, flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        store.wait(LABELS, 30)
    time.sleep(0.05)  # the failed job is forgotten in its done-callback
    assert store.wait(LABELS, 30).shape == (4, 4) and len(calls) == 2


# --- /setup, /predict and the deadline ----------------------------------------------------------------------


def test_setup_prepares_the_labels_in_the_background_and_predict_finds_them(weights, tmp_path):
    settings = _settings(weights, tmp_path)
    client = create_app(settings, warm=False).test_client()
    assert client.post("/setup", json={}).get_json() == {"model_version": runtime(settings).teacher_version()}
    reply = client.post("/setup", json={"schema": BRUSH})
    assert reply.status_code == 200 and reply.get_json()["model_version"] == runtime(settings).teacher_version()
    store = runtime(settings).embeddings
    deadline = time.monotonic() + 120
    while store.get(LABELS) is None and time.monotonic() < deadline:  # computed in the background
        time.sleep(0.05)
    emb = store.get(LABELS)
    assert store.path(LABELS).is_file() and emb.shape[0] == 4  # one row per name: cat, dog, Food, Sky
    image = np.asarray(Image.open(COCO128_PHOTOS / "000000000009.jpg").convert("RGB"))
    body = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": _uri(image)}}],
                                         "label_config": BRUSH}).get_json()  # fmt: skip
    assert body["results"][0]["result"] and body["errors"] == []


def test_predict_before_the_labels_are_ready_answers_within_its_budget_with_a_clear_error(weights, tmp_path):
    settings = _settings(weights, tmp_path, predict_time_budget=0.5)
    rt = runtime(settings)
    teacher = rt.teacher_within()
    blocked = _Counting(block=True, dim=teacher.clip.model.visual.output_dim)
    rt._encode_labels = blocked  # the text tower takes "minutes"
    tasks = [{"id": i, "data": {"image": _uri(np.full((24, 32, 3), 90, np.uint8))}} for i in range(3)]
    started = time.monotonic()
    body = MaskCLIPBackend(settings, "1", BRUSH).predict(tasks)
    assert time.monotonic() - started < 30  # generous: the budget is 0.5 s, the text tower is blocked
    assert body["results"] == [[], [], []]
    assert [e["task"] for e in body["errors"]] == [0, 1, 2]
    assert [e["error"] for e in body["errors"]] == [
        "still preparing the labels: the text embeddings of these 3 labels are being computed in the background "
        "(once per label set, kept under MODEL_DIR); Label Studio will ask again"
    ] * 3
    blocked.release.set()
    rt.embeddings.prepare(LABELS).result(30)
    body = MaskCLIPBackend(settings, "1", BRUSH).predict(tasks)
    assert all(r and r["result"] for r in body["results"]) and body["errors"] == []
    assert blocked.calls == 1


class _FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


class _SlowModel:
    """A stand-in model: every image "takes" one second of the fake clock."""

    stride = 8

    def __init__(self, teacher, clock):
        self.teacher, self.clock, self.batches = teacher, clock, []

    def segment(self, images, classes, opts, text=None):
        self.batches.append(len(images))
        self.clock.advance(1.0 * len(images))
        return self.teacher.segment(images, classes, opts=opts, text=text)


def _slow_model_on_a_fake_clock(settings: Settings, monkeypatch) -> tuple:
    """The runtime of ``settings`` with its labels ready, serving a :class:`_SlowModel` on a fake clock that
    the backend reads: (runtime, model)."""
    rt = runtime(settings)
    rt.embeddings.prepare(LABELS).result(60)
    clock = _FakeClock()
    model = _SlowModel(rt.teacher_within(), clock)
    monkeypatch.setattr(backend_module.time, "monotonic", clock)
    monkeypatch.setattr(rt, "teacher_within", lambda deadline: model)
    return rt, model


def test_predict_stops_starting_batches_that_the_time_left_cannot_hold(weights, tmp_path, monkeypatch):
    """Budget 5 s, 1 s per image, batches of 2: batches at t=0 (2 s, the first measurement) and t=2 (ends at
    4 s) fit; the 1 s left holds one image of the third batch, then nothing more starts. The rest get the
    budget's reason."""
    settings = _settings(weights, tmp_path, predict_time_budget=5.0, batch_size=2)
    rt, model = _slow_model_on_a_fake_clock(settings, monkeypatch)
    uri = _uri(np.full((24, 32, 3), 90, np.uint8))
    tasks = [{"id": 10 + i, "data": {"image": uri}} for i in range(7)]
    tasks.insert(3, {"id": 99, "data": {}})  # a bad task keeps its own reason
    tasks[0]["predictions"] = [{"model_version": rt.teacher_version(), "result": []}]  # has one: comes last
    tasks[1]["predictions"] = [{"model_version": "another", "result": []}]  # these have none of this version
    tasks[2]["predictions"] = []
    body = MaskCLIPBackend(settings, "1", BRUSH).predict(tasks)
    assert model.batches == [2, 2, 1]
    done = [t["id"] for t, r in zip(tasks, body["results"]) if r]
    assert done == [11, 12, 13, 14, 15]
    errors = {e["task"]: e["error"] for e in body["errors"]}
    assert set(errors) == {99, 16, 10}
    assert "no image" in errors[99]
    assert all("time budget of 5 s" in errors[t] for t in (16, 10))
    assert rt.seconds_per_image(rt.teacher_version()) == pytest.approx(1.0)


def test_downloads_are_not_started_once_the_deadline_has_passed(weights, tmp_path, monkeypatch):
    settings = _settings(weights, tmp_path, predict_time_budget=2.0, batch_size=1, fetch_threads=1)
    rt = runtime(settings)
    teacher = rt.teacher_within()
    rt.embeddings.prepare(LABELS).result(60)
    clock = _FakeClock()
    fetched = []
    real_load = rt.fetcher.load

    def slow_load(url, task_id, **kwargs):  # each download "takes" 1.5 s
        fetched.append(task_id)
        clock.advance(1.5)
        return real_load(url, task_id, **kwargs)

    monkeypatch.setattr(backend_module.time, "monotonic", clock)
    monkeypatch.setattr(rt.fetcher, "load", slow_load)
    monkeypatch.setattr(rt, "teacher_within", lambda deadline: teacher)
    uri = _uri(np.full((24, 32, 3), 90, np.uint8))
    body = MaskCLIPBackend(settings, "1", BRUSH).predict([{"id": i, "data": {"image": uri}} for i in range(5)])
    assert fetched == [0, 1]  # the third download would start after the deadline
    assert sum(1 for r in body["results"] if r) <= 2
    assert {e["task"] for e in body["errors"]} >= {2, 3, 4}


def test_the_deadline_reaches_a_fetcher_that_takes_one(weights, tmp_path, monkeypatch):
    settings = _settings(weights, tmp_path)
    rt = runtime(settings)
    seen = []

    class Fetcher:
        def load(self, url, task_id=None, *, max_pixels, deadline=None):
            seen.append(deadline)
            return np.full((24, 32, 3), 90, np.uint8)

    monkeypatch.setattr(rt, "_fetcher", Fetcher())
    start = time.monotonic()
    body = MaskCLIPBackend(settings, "1", BRUSH).predict([{"id": 1, "data": {"image": "/x.png"}}])
    assert body["results"][0] and len(seen) == 1
    assert start + settings.predict_time_budget - 1 < seen[0].at <= time.monotonic() + settings.predict_time_budget


def test_warm_up_runs_a_batch_and_measures_the_time_per_image(weights, tmp_path):
    settings = _settings(weights, tmp_path)
    rt = runtime(settings)
    assert rt.seconds_per_image(rt.teacher_version()) == 0.0
    rt.warm_up()
    assert rt.seconds_per_image(rt.teacher_version()) > 0.0


# --- JPEG decoding on the model's device (run here on the CPU: the same torchvision call) ---------------------


def _jpeg(array: np.ndarray, orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_device_jpeg_decoding_matches_the_cpu_decoder_and_applies_exif_orientation():
    from labelstudio_maskclip.fetching.images import decode_image
    from labelstudio_maskclip.fetching.jpeg import decode_jpegs

    photo = (COCO128_PHOTOS / "000000000009.jpg").read_bytes()
    base = np.asarray(Image.open(COCO128_PHOTOS / "000000000025.jpg").convert("RGB"))[:200, :300]
    rotated = _jpeg(base, orientation=6)  # shown rotated by 90 degrees
    png = io.BytesIO()
    Image.fromarray(base).save(png, format="PNG")
    blobs = [photo, rotated, png.getvalue(), photo[:3000], photo]
    out = decode_jpegs(blobs, "cpu", max_pixels=10**8)
    assert out[2] is None  # not a JPEG: left to the CPU decoder
    assert out[4] is not None and out[0] is not None
    for k in (0, 1):
        reference = decode_image(blobs[k], max_pixels=10**8)
        assert tuple(out[k].shape) == reference.shape and out[k].dtype == torch.uint8
        assert np.abs(out[k].numpy().astype(int) - reference).mean() < 2.0  # IDCTs differ by a level or so
    assert tuple(out[1].shape) == (300, 200, 3)
    assert decode_jpegs([photo], "cpu", max_pixels=1000) == [None]  # over the limit: the CPU decoder says why


def test_predict_with_device_decoding_gives_the_same_answers_and_reasons(weights, tmp_path):
    settings = _settings(weights, tmp_path)
    rt = runtime(settings)
    rt.embeddings.prepare(LABELS).result(60)
    photo = (COCO128_PHOTOS / "000000000009.jpg").read_bytes()
    flat = io.BytesIO()
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(flat, format="PNG")
    uris = [
        "data:image/jpeg;base64," + base64.b64encode(photo).decode(),
        "data:image/png;base64," + base64.b64encode(flat.getvalue()).decode(),
        "data:image/jpeg;base64," + base64.b64encode(photo[:3000]).decode(),
    ]
    tasks = [{"id": i, "data": {"image": u}} for i, u in enumerate(uris)]
    on_cpu = MaskCLIPBackend(settings, "1", BRUSH)
    on_device = MaskCLIPBackend(settings, "1", BRUSH)
    on_device._device_decode = True  # what a CUDA model gets
    a, b = on_cpu.predict(tasks), on_device.predict(tasks)
    for r in (a, b):
        assert r["results"][0] and r["results"][1] and r["results"][2] == []
        assert [e["task"] for e in r["errors"]] == [2]
    size = Image.open(io.BytesIO(photo)).size
    assert all((x["original_width"], x["original_height"]) == size for x in b["results"][0]["result"])
    assert {x["value"]["brushlabels"][0] for x in a["results"][0]["result"]} == {
        x["value"]["brushlabels"][0] for x in b["results"][0]["result"]
    }


def test_messages_name_a_task_by_its_image_shortened_to_80_characters():
    short = {"data": {"image": "/data/upload/1/cat.jpg", "n": 3}}
    assert backend_module._short(short) == "/data/upload/1/cat.jpg"
    exact = {"data": {"image": "x" * 80}}
    assert backend_module._short(exact) == "x" * 80
    assert backend_module._short({"data": {"image": "y" * 81}}) == "y" * 77 + "..."  # one over: shortened
    long = {"data": {"image": "https://example.com/" + "a" * 100}}
    shortened = backend_module._short(long)
    assert len(shortened) == 80 and shortened.endswith("...") and shortened.startswith("https://example.com/aaa")
    assert backend_module._short({"data": "not a mapping"}) == "" and backend_module._short(None) == ""


def test_batches_are_keyed_by_the_models_own_stride_else_32():
    opts = SegmentOptions(short_side=100)

    class Strided:
        stride = 10

    class Student:
        class net:  # noqa: N801 - a student model exposes its network as .net
            stride = 20

    assert backend_module._size_key(Strided(), opts)(100, 150) == (100, 150)
    assert backend_module._size_key(Student(), opts)(100, 150) == (100, 160)
    assert backend_module._size_key(object(), opts)(100, 150) == (96, 160)


def test_tasks_without_a_usable_image_reference_get_their_own_reason(weights, tmp_path):
    uri = _uri(np.full((40, 60, 3), 120, np.uint8))
    tasks = [
        {"id": 1, "data": {"image": uri}},
        {"id": 2},  # no data at all
        {"id": 3, "data": {"image": ""}},
        {"id": 4, "data": {"image": 5, **{f"k{i:02d}": i for i in range(12)}}},
        {"id": 5, "data": {"image": "data:image/png;base64,AAAA"}},  # not an image
    ]
    body = MaskCLIPBackend(_settings(weights, tmp_path), "1", BRUSH).predict(tasks)
    assert body["results"][0] and not any(body["results"][1:])
    reasons = {e["task"]: e["error"] for e in body["errors"]}
    assert reasons[2] == "task has no 'data' object"
    assert reasons[3].startswith("task data has no image under 'image'")
    assert reasons[5].endswith("not an image: 3 bytes in no image format this backend reads")
    listed = reasons[4].split("keys: ")[1]
    assert listed.count("'") == 2 * 10  # the first 10 keys, sorted


# --- one request: chunks of downloads, a model failure, the log ------------------------------------------------


def _sized_tasks(sizes: list[tuple[int, int]], first_id: int = 1) -> list[dict]:
    return [{"id": first_id + k, "data": {"image": _uri(np.full((h, w, 3), 40 + k, np.uint8))}}
            for k, (h, w) in enumerate(sizes)]  # fmt: skip


def _sizes(body: dict) -> list[tuple[int, int] | None]:
    """(height, width) each task's prediction was made for (None: no prediction)."""
    out = []
    for r in body["results"]:
        region = r["result"][0] if r and r["result"] else None
        out.append((region["original_height"], region["original_width"]) if region else None)
    return out


def test_a_project_sized_request_goes_in_chunks_and_logs_its_progress(weights, tmp_path, monkeypatch, caplog):
    """Five tasks in chunks of three: the next chunk downloads while one is segmented; every task gets the
    prediction of its own image, and the log says how far the request has got."""
    monkeypatch.setattr(backend_module, "PREDICT_CHUNK", 3)
    settings = _settings(weights, tmp_path, batch_size=8)
    runtime(settings).embeddings.prepare(LABELS).result(60)
    sizes = [(24, 32), (40, 24), (32, 32), (24, 48), (56, 24)]
    caplog.set_level("INFO", logger=backend_module.log.name)
    body = MaskCLIPBackend(settings, "1", BRUSH).predict(_sized_tasks(sizes))
    assert body["errors"] == [] and _sizes(body) == sizes
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("predict: ") and
                "tasks in" in r.getMessage()]  # fmt: skip
    assert [m.split(" tasks in")[0] for m in progress] == ["predict: 3/5", "predict: 5/5"]
    seconds = [float(m.split(" tasks in ")[1].rstrip(" s")) for m in progress]
    assert seconds == sorted(seconds) and 0 <= seconds[0] and seconds[-1] < 600
    (summary,) = [r.getMessage() for r in caplog.records if "tasks predicted with" in r.getMessage()]
    assert summary.startswith(f"predict: 5/5 tasks predicted with {runtime(settings).teacher_version()} in ")
    assert float(summary.rsplit(" in ", 1)[1].rstrip(" s")) < 600


def test_one_request_logs_twenty_failures_and_counts_the_rest(weights, tmp_path, caplog):
    settings = _settings(weights, tmp_path)
    runtime(settings).embeddings.prepare(LABELS).result(60)
    tasks = _sized_tasks([(24, 32)]) + [{"id": 100 + k, "data": {}} for k in range(23)]
    caplog.set_level("INFO", logger=backend_module.log.name)
    body = MaskCLIPBackend(settings, "1", BRUSH).predict(tasks)
    assert [e["task"] for e in body["errors"]] == list(range(100, 123))  # every reason is in the answer
    messages = [r.getMessage() for r in caplog.records]
    logged = [m for m in messages if m.startswith("predict: task ")]
    assert logged == [f"predict: task {100 + k}: task data has no image under 'image' (keys: [])" for k in range(20)]
    assert "predict: ... and 3 more tasks without a prediction" in messages
    assert any(m.startswith("predict: 1/24 tasks predicted") for m in messages)


@pytest.mark.parametrize("n", [20, 21])
def test_the_remainder_line_counts_what_the_twenty_lines_left_out(weights, tmp_path, caplog, n):
    settings = _settings(weights, tmp_path)
    caplog.set_level("INFO", logger=backend_module.log.name)
    MaskCLIPBackend(settings, "1", BRUSH).predict([{"id": k, "data": {}} for k in range(n)])
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("predict: task ") for m in messages) == 20
    assert [m for m in messages if "more tasks without a prediction" in m] == (
        [] if n == 20 else ["predict: ... and 1 more tasks without a prediction"]
    )
    assert not any(" tasks in " in m for m in messages)  # one chunk: no progress lines


class _FailingModel:
    """The real model, but a batch holding an image whose first pixel is 13 fails (as out of memory would)."""

    stride = 8

    def __init__(self, teacher):
        self.teacher, self.calls = teacher, []

    def segment(self, images, classes, opts, text=None):
        self.calls.append(len(images))
        if any(int(img[0, 0, 0]) == 13 for img in images):
            raise RuntimeError("CUDA out of memory (stand-in)")
        return self.teacher.segment(images, classes, opts=opts, text=text)


def test_a_batch_the_model_fails_on_is_retried_image_by_image(weights, tmp_path, monkeypatch):
    settings = _settings(weights, tmp_path, batch_size=8)
    rt = runtime(settings)
    model = _FailingModel(rt.teacher_within())
    rt.embeddings.prepare(LABELS).result(60)
    monkeypatch.setattr(rt, "teacher_within", lambda deadline: model)
    tasks = _sized_tasks([(24, 32), (24, 32), (24, 32), (24, 32)])
    tasks[1]["data"]["image"] = _uri(np.full((24, 32, 3), 13, np.uint8))
    body = MaskCLIPBackend(settings, "1", BRUSH).predict(tasks)
    assert model.calls == [4, 1, 1, 1, 1]  # the batch, then each image alone
    assert _sizes(body) == [(24, 32), None, (24, 32), (24, 32)]
    assert body["errors"] == [{"task": 2, "error": "the model failed on this image (RuntimeError)"}]


def test_a_request_out_of_time_does_not_go_on_to_its_next_chunk(weights, tmp_path, monkeypatch, caplog):
    """Chunks of two, batches of two, 1 s per image, budget 3 s: the first chunk takes 2 s, the second has
    time for one image; the third chunk is not segmented (its downloads had started, pipelined)."""
    monkeypatch.setattr(backend_module, "PREDICT_CHUNK", 2)
    settings = _settings(weights, tmp_path, predict_time_budget=3.0, batch_size=2)
    rt, model = _slow_model_on_a_fake_clock(settings, monkeypatch)
    caplog.set_level("INFO", logger=backend_module.log.name)
    body = MaskCLIPBackend(settings, "1", BRUSH).predict(_sized_tasks([(24, 32)] * 6))
    assert model.batches == [2, 1]
    assert [r != [] for r in body["results"]] == [True, True, True, False, False, False]
    assert {e["task"] for e in body["errors"]} == {4, 5, 6}
    progress = [r.getMessage().split(" tasks in")[0] for r in caplog.records if " tasks in " in r.getMessage()]
    assert progress == ["predict: 2/6", "predict: 4/6"]


def test_images_that_fit_the_time_left():
    now = time.monotonic()
    fit = backend_module._images_that_fit
    assert fit(Deadline(now + 100), 0.0, 7) == 7  # nothing measured yet: all of them
    assert fit(NO_DEADLINE, 2.0, 7) == 7  # no deadline
    assert fit(Deadline(now + 100), 30.0, 7) == 3
    assert fit(Deadline(now + 100), 1.0, 7) == 7
    assert fit(Deadline(now - 5), 1.0, 7) == 0  # past the deadline: none


def test_batches_group_images_by_their_resized_size_in_order_of_first_appearance():
    images = [(k, np.zeros((h, 8, 3), np.uint8)) for k, h in enumerate([4, 6, 4, 4, 6])]
    by_height = lambda h, w: (h, w)  # noqa: E731
    assert [[i for i, _ in b] for b in backend_module._batches(images, by_height, 2)] == [[0, 2], [3], [1, 4]]
    assert [[i for i, _ in b] for b in backend_module._batches(images, by_height, 1)] == [[0], [2], [3], [1], [4]]


def test_nothing_starts_after_a_batch_the_time_left_had_to_cut(weights, tmp_path, monkeypatch):
    """Estimated 2 s per image, really 1 s, budget 3 s: the first batch of two is cut to one image; the
    estimate drops to 1.5 s and 2 s are left, but the cut ended the request's inference."""
    settings = _settings(weights, tmp_path, predict_time_budget=3.0, batch_size=2)
    rt, model = _slow_model_on_a_fake_clock(settings, monkeypatch)
    rt.observe(rt.teacher_version(), 1, 2.0)
    body = MaskCLIPBackend(settings, "1", BRUSH).predict(_sized_tasks([(24, 32)] * 4))
    assert model.batches == [1]
    assert [r != [] for r in body["results"]] == [True, False, False, False]
    assert rt.seconds_per_image(rt.teacher_version()) == pytest.approx(1.5)


def test_a_request_out_of_time_does_not_wait_for_downloads_still_in_flight(weights, tmp_path, monkeypatch):
    """The second chunk's downloads hang until the test lets them go (a timer does after 60 s): the request
    answers when its time is up, without them."""
    monkeypatch.setattr(backend_module, "PREDICT_CHUNK", 2)
    settings = _settings(weights, tmp_path, predict_time_budget=2.5, batch_size=2)
    rt, _ = _slow_model_on_a_fake_clock(settings, monkeypatch)
    release = threading.Event()
    timer = threading.Timer(60, release.set)
    real_load = rt.fetcher.load

    def load(url, task_id, **kwargs):
        if task_id > 2:
            release.wait()
        return real_load(url, task_id, **kwargs)

    monkeypatch.setattr(rt.fetcher, "load", load)
    timer.start()
    try:
        body = MaskCLIPBackend(settings, "1", BRUSH).predict(_sized_tasks([(24, 32)] * 4))
        assert not release.is_set()  # answered while the downloads still hung
    finally:
        release.set()
        timer.cancel()
    assert [r != [] for r in body["results"]] == [True, True, False, False]
    assert {e["task"] for e in body["errors"]} == {3, 4}


def test_a_hung_download_does_not_cost_the_images_that_arrived_their_predictions(weights, tmp_path, monkeypatch):
    """Task 1's download hangs past the deadline, task 2's arrived: task 2 is still segmented (no time per
    image measured yet, so the model is given the chance) and task 1 gets the budget's reason."""
    settings = _settings(weights, tmp_path, predict_time_budget=2.0)
    rt = runtime(settings)
    rt.teacher_within()
    rt.embeddings.prepare(LABELS).result(60)
    release = threading.Event()
    real_load = rt.fetcher.load

    def load(url, task_id, **kwargs):
        if task_id == 1:
            release.wait(60)
        return real_load(url, task_id, **kwargs)

    monkeypatch.setattr(rt.fetcher, "load", load)
    try:
        body = MaskCLIPBackend(settings, "1", BRUSH).predict(_sized_tasks([(24, 32), (40, 24)]))
    finally:
        release.set()
    assert _sizes(body) == [None, (40, 24)]
    assert [e["task"] for e in body["errors"]] == [1] and "time budget of 2 s" in body["errors"][0]["error"]


@pytest.mark.parametrize("damage", ["width", "zeros"])
def test_a_stored_file_of_another_width_or_all_zeros_is_computed_again(tmp_path, damage):
    first = EmbeddingStore(tmp_path, IDENTITY, _Counting(), width=4)
    emb = first.prepare(LABELS).result(30)
    path = first.path(LABELS)
    payload = torch.load(path, weights_only=True)
    payload["embeddings"] = torch.zeros(4, 4) if damage == "zeros" else F.normalize(torch.ones(4, 6), dim=-1)
    torch.save(payload, path)
    compute = _Counting()
    again = EmbeddingStore(tmp_path, IDENTITY, compute, width=4).prepare(LABELS).result(30)
    assert compute.calls == 1 and torch.equal(again, emb)


def test_a_big_label_set_takes_turns_with_a_small_one_that_comes_later(tmp_path):
    order: list[int] = []
    started, submitted, checked = threading.Event(), threading.Event(), threading.Event()

    def compute(labels):
        order.append(len(labels))
        started.set()
        if len(order) == 1:  # the big set's first turn lasts until the small set waits for a turn (any load)
            assert submitted.wait(30)
        if len(order) == 3:  # its second turn, until the small set's answer has been looked at
            assert checked.wait(30)
        return F.normalize(torch.ones(len(labels), 4), dim=-1)

    store = EmbeddingStore(tmp_path, IDENTITY, compute)
    big = store.prepare(tuple((f"label{i}",) for i in range(4 * TURN_LABELS)))
    assert started.wait(30)
    small = store.prepare((("cat",), ("dog",)))
    deadline = time.monotonic() + 30
    while store._turns._next < 2 and time.monotonic() < deadline:  # the small set has asked for its turn
        time.sleep(0.01)
    submitted.set()
    assert small.result(30).shape == (2, 4) and not big.done()  # one turn of the big set, not all four
    checked.set()
    assert big.result(30).shape == (4 * TURN_LABELS, 4) and order == [TURN_LABELS, 2] + [TURN_LABELS] * 3


# --- what mutation testing found unchecked (docs/mutation.md) ------------------------------------------------


def test_setup_answers_without_loading_the_model(weights, tmp_path):
    """Label Studio gives /setup 3 s: it names the version to be served without loading the model, so it
    answers even while the weights cannot load (/health and /predict say why)."""
    settings = _settings(weights, tmp_path).replace(pretrained=str(tmp_path / "absent.pt"))
    reply = create_app(settings, warm=False).test_client().post("/setup", json={"schema": BRUSH})
    assert reply.status_code == 200 and reply.get_json()["model_version"] == runtime(settings).teacher_version()


def test_predict_while_the_model_loads_says_so_even_when_the_labels_text_is_stored(weights, tmp_path, monkeypatch):
    """After a restart the labels' text embeddings are on disk before the model has loaded: each task is told
    that the model is still loading (Label Studio asks again), and no segmentation is tried without it."""
    settings = _settings(weights, tmp_path)
    rt = runtime(settings)
    rt.embeddings.prepare(LABELS).result(60)
    monkeypatch.setattr(rt, "teacher_within", lambda deadline: None)  # what it returns while still loading
    tasks = [{"id": i, "data": {"image": _uri(np.full((24, 32, 3), 90, np.uint8))}} for i in range(2)]
    body = MaskCLIPBackend(settings, "1", BRUSH).predict(tasks)
    assert body["results"] == [[], []]
    assert [e["error"] for e in body["errors"]] == ["the model is still loading; Label Studio will ask again"] * 2


def test_batch_keys_are_the_sizes_the_model_resizes_to(weights, tmp_path):
    """Images are batched by the size the model will resize them to, with the options' rounding of the long
    side and bound on pixels (a wide strip is scaled down as a whole)."""
    teacher = runtime(_settings(weights, tmp_path)).teacher_within()
    opts = SegmentOptions(short_side=64, size_multiple=48, max_input_pixels=2 * 64 * 64)
    key = backend_module._size_key(teacher, opts)
    for height, width in [(480, 640), (100, 3000), (64, 64)]:
        assert key(height, width) == teacher.input_size(height, width, 64, 48, 2 * 64 * 64), (height, width)
