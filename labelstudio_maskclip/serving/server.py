"""The HTTP adapter: Label Studio's ML backend protocol as a Flask WSGI app (run under gunicorn).

Routes: ``GET /`` and ``/health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``, ``GET /metrics``.
Every error is a JSON body ``{"error": "..."}``: 400 for bad input (:class:`~labelstudio_maskclip.errors.BadInput`),
503 when something is unavailable (:class:`~labelstudio_maskclip.errors.Unavailable`), 500 for a bug, each
with a log line saying why; the server keeps serving. ``serve`` runs it through
``labelstudio_maskclip.serving.asgi:asgi()`` (gunicorn's asyncio worker); ``wsgi()`` is the bare WSGI app.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import threading
import time
from typing import Any

from flask import Flask, Response, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from ..errors import BadInput, MaskCLIPError, Unavailable
from ..labelstudio.labeling import parse_label_config
from ..labelstudio.wire import json_bytes
from ..logs import configure as configure_logging
from ..settings import Settings
from ..training.checkpoints import history
from ..training.rescoring import read_status as read_rescore_status
from ..training.trigger import maybe_interval
from .backend import MaskCLIPBackend, runtime

__all__ = ["create_app", "wsgi", "credentials_match", "basic_auth_header"]

log = logging.getLogger(__name__)


_WARMUP_CONFIG = (
    '<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i"><Label value="x"/></BrushLabels></View>'
)


class _BadRequest(BadInput):
    pass


class _WireJSON(DefaultJSONProvider):
    """Responses written by :func:`.wire.json_bytes` (a ``/predict`` answer is mostly RLE integers);
    request bodies are read by Flask's default."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return json_bytes(obj).decode()

    def response(self, *args: Any, **kwargs: Any) -> Response:
        return Response(json_bytes(self._prepare_response_obj(args, kwargs)), mimetype=self.mimetype)


#: Bytes a worker process may hold for request bodies, raw and parsed, all requests in flight together.
JSON_MEMORY_BUDGET = 2 << 30
#: Upper bounds of what parsing costs in CPython (64-bit; measured in tests/test_security.py): per body byte
#: (string contents, up to four bytes a character), per object, per array, per element or key separator
#: (the element's pointer and a number's object) and per quote (a string object).
_COST_PER_BYTE, _COST_PER_OBJECT, _COST_PER_ARRAY, _COST_PER_ITEM, _COST_PER_QUOTE = 4, 200, 72, 48, 48


#: bodies up to this many bytes (with a Content-Length) are admitted whatever the memory budget holds
SMALL_BODY = 1 << 20


class _TooLarge(BadInput):
    http_status = 413


class _Busy(Unavailable):
    retry_after = 5


def parsed_size_bound(body: bytes) -> int:
    """An upper bound of the memory ``json.loads(body)`` takes (bytes), from counts of its structural
    characters: ``[{}, {}, ...]`` costs about 25 times its length parsed, a list of small numbers 3 times."""
    return (
        _COST_PER_BYTE * len(body) + _COST_PER_OBJECT * body.count(b"{") + _COST_PER_ARRAY * body.count(b"[")
        + _COST_PER_ITEM * (body.count(b",") + body.count(b":")) + _COST_PER_QUOTE * body.count(b'"')
    )  # fmt: skip


class _MemoryBudget:
    """Bytes reserved by the requests in flight in this process; a reservation past the budget is refused
    at once (a retry later finds it free), so bodies cannot add up past it whatever their number."""

    def __init__(self, budget: int):
        self.budget, self.used, self.lock = budget, 0, threading.Lock()

    def reserve(self, n: int) -> None:
        if n > self.budget:
            raise _TooLarge(
                f"request body would take about {n >> 20} MiB of memory parsed, more than the "
                f"{self.budget >> 20} MiB a request may use; send fewer tasks per request"
            )
        with self.lock:
            if self.used + n > self.budget:
                raise _Busy("other large requests are being processed; retry shortly")
            self.used += n
        reserved = getattr(request, "_reserved", 0)
        request._reserved = reserved + n  # type: ignore[attr-defined]  # released at the request's end

    def release(self) -> None:
        n = getattr(request, "_reserved", 0)
        if n:
            with self.lock:
                self.used -= n
            request._reserved = 0  # type: ignore[attr-defined]


def _json_body(budget: _MemoryBudget) -> dict[str, Any]:
    """The request's JSON object, its raw bytes and its parsed size counted against ``budget`` first.

    A body of at most :data:`SMALL_BODY` bytes with a declared length is never refused for the budget: Label
    Studio does not retry a webhook, so a refused annotation would be lost, and such bodies take at most
    threads x 25 MiB parsed."""
    if request.content_length is not None and request.content_length <= SMALL_BODY:
        data = request.get_data(cache=False)
    else:
        budget.reserve(request.content_length or 0)  # the raw body, before reading it (chunked: counted below)
        data = request.get_data(cache=False)
        budget.reserve(parsed_size_bound(data) + (0 if request.content_length else len(data)))
    try:
        body = json.loads(data)
    except RecursionError:  # nesting deeper than the parser's recursion limit
        raise _BadRequest("request body must be a JSON object (nested too deeply to parse)") from None
    except ValueError:  # not JSON, or not UTF-8
        body = None
    del data
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    return body


def _error(status: int, message: str) -> tuple[Response, int]:
    log.warning("%s %s -> %d: %s", request.method, request.path, status, message)
    return jsonify({"error": message, "status": status}), status


def create_app(settings: Settings, *, warm: bool = True) -> Flask:
    """The WSGI app. ``warm`` starts loading the model in a background thread so the first /predict
    does not pay for it; a model that cannot load makes /health answer 503 with the reason."""
    app = Flask("labelstudio_maskclip")
    app.json = _WireJSON(app)
    app.config["MAX_CONTENT_LENGTH"] = 256 * 1024 * 1024
    state: dict[str, Any] = {"model_error": None, "model": "not loaded"}
    budget = _MemoryBudget(JSON_MEMORY_BUDGET)
    app.teardown_request(lambda _exc: budget.release())
    if warm:
        _warm_up(settings, state)
    _guard(app, settings)
    _routes(app, settings, state, budget)
    return app


def _warm_up(settings: Settings, state: dict[str, Any]) -> None:
    """Before serving: the labeling-config parser; in the background: the model (its state in ``state``),
    the store's check and the interval trigger."""

    def load_model() -> None:
        state["model"] = "loading"
        try:
            runtime(settings).warm_up()  # loads the model and runs a batch through it
            state["model"] = "ready"
            log.info("model ready: %s", runtime(settings).teacher_version())
        except Exception as e:  # reported by /health and /predict
            state["model_error"] = str(e)
            log.error("model failed to load: %s", e)

    def open_store() -> None:
        try:
            _ = runtime(settings).store  # opening checks the file's integrity (reported by /health)
        except Exception as e:  # an unusable MODEL_DIR: webhooks report it
            log.error("the annotation store cannot be opened: %s", e)

    # The labeling-config parser imports label-studio-sdk lazily (~1 s): pay that before serving, since
    # Label Studio gives /setup only 3 s. The model loads and warms up in the background; the store is
    # opened (and checked) in the background too, so the first webhook does not wait for it.

    parse_label_config(_WARMUP_CONFIG)
    threading.Thread(target=load_model, name="model-warmup", daemon=True).start()
    threading.Thread(target=open_store, name="store-check", daemon=True).start()
    if settings.train_interval_minutes > 0:
        threading.Thread(target=_interval_trigger, args=(settings,), name="train-interval", daemon=True).start()


def _guard(app: Flask, settings: Settings) -> None:
    """Basic auth before every request (when set), and the one error handler after."""

    @app.before_request
    def _auth():
        if not settings.basic_auth_user:
            return None
        if not credentials_match(request.headers.get("Authorization"), settings.basic_auth_user,
                                 settings.basic_auth_pass):  # fmt: skip
            return Response(
                '{"error": "authentication required"}', 401, {"WWW-Authenticate": 'Basic realm="ml-backend"'},
                mimetype="application/json",
            )  # fmt: skip
        return None

    @app.errorhandler(Exception)
    def _answer_error(e):
        """The one handler: bad input 400 (413 for too much), unavailable 503, anything else 500 and logged."""
        if isinstance(e, MaskCLIPError):
            reply, status = _error(e.http_status, e.describe())
            if e.retry_after is not None:
                reply.headers["Retry-After"] = str(e.retry_after)
            return reply, status
        if isinstance(e, HTTPException):
            if e.code == 413:
                return _error(413, f"request body larger than {app.config['MAX_CONTENT_LENGTH']} bytes")
            return _error(e.code or 500, e.description or str(e))
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _error(500, f"internal error: {type(e).__name__}: {e}")


def _routes(app: Flask, settings: Settings, state: dict[str, Any], budget: _MemoryBudget) -> None:
    """The ML backend protocol's routes (``/health``, ``/setup``, ``/predict``, ``/webhook``) and ``/metrics``."""

    @app.get("/")
    @app.get("/health")
    def health():
        if state["model_error"]:
            return jsonify({"status": "DOWN", "error": state["model_error"]}), 503
        damage = runtime(settings).store_damage()
        if damage:  # predictions would work, but nothing Label Studio sends can be kept: make it seen
            return jsonify({"status": "DOWN", "error": damage, "model": state["model"], "store": "damaged"}), 503
        return jsonify({"status": "UP", "model_class": "MaskCLIPBackend", "model": state["model"]})

    @app.post("/setup")
    def setup():
        body = _json_body(budget)
        backend = MaskCLIPBackend(settings, str(body.get("project", "")), body.get("schema"))
        return jsonify(backend.setup())

    @app.post("/predict")
    def predict():
        if state["model_error"]:
            return _error(503, f"model not available: {state['model_error']}")
        body = _json_body(budget)
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise _BadRequest("'tasks' must be a list of task objects")
        config = body.get("label_config") or body.get("schema")
        backend = MaskCLIPBackend(settings, str(body.get("project", "")), config)
        return jsonify(
            backend.predict(
                tasks, body.get("params", {}).get("context") if isinstance(body.get("params"), dict) else None
            )
        )

    @app.post("/webhook")
    def webhook():
        body = _json_body(budget)
        reply = MaskCLIPBackend(settings).fit(str(body.get("action")), body)  # a CollectError answers 400
        return jsonify(reply), 201

    @app.get("/metrics")
    def metrics():
        return jsonify(_metrics(settings))


def _metrics(settings: Settings) -> dict[str, Any]:
    """What ``/metrics`` answers: the served version and pipeline, acceptance, training runs, students, the
    last re-scoring and this worker's interactive notes."""
    rt = runtime(settings)
    return {
        "model_version": rt.student_version() or rt.teacher_version(),
        "pipeline": {"preset": settings.preset, "overrides": settings.overrides},
        "acceptance": rt.store.acceptance_stats(),
        "annotations_since_training": rt.store.count_since_last_training(),
        "training_runs": rt.store.training_runs()[-10:],
        "students": history(settings)[-10:],
        "rescore": read_rescore_status(settings),
        "interactive_notes": dict(rt.interactive_notes),  # this worker's answers without a mask, by why
    }


def _interval_trigger(settings: Settings) -> None:
    """MASKCLIP_TRAIN_INTERVAL_MINUTES: look once a minute whether a training is due (new annotations and
    the interval passed). Every worker looks; the training lock lets only one trainer run."""
    while True:
        time.sleep(min(60.0, settings.train_interval_minutes * 60))
        try:
            if maybe_interval(settings, runtime(settings).store):
                log.info("interval training started")
        except Exception:  # keep the timer alive; the log says why
            log.exception("interval training check failed")


def wsgi() -> Flask:
    """gunicorn factory: settings from the environment, read once per worker."""
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    _share_cpu_threads(settings)
    return create_app(settings)


def _share_cpu_threads(settings: Settings) -> None:
    """Each worker process gets its share of the cores for torch's CPU kernels, so workers do not
    oversubscribe the machine (GPU work is unaffected)."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, settings.workers)))
    log.info("torch: %d CPU threads in this worker, OpenMP wait policy %s", torch.get_num_threads(),
             settings.omp_wait_policy or "not set (spinning)")  # fmt: skip


def _basic_credentials(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) as the raw bytes a ``Basic`` ``Authorization`` header carries; None if absent or
    malformed. WSGI gives header values as latin-1 decoded text, so encoding back to latin-1 recovers the
    bytes the client sent, whatever charset it used."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip().encode("latin-1"), validate=True)
    except (ValueError, UnicodeError):  # binascii.Error is a ValueError
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


def credentials_match(header: str | None, user: str, password: str) -> bool:
    """Whether an ``Authorization`` header carries exactly ``user`` and ``password``.

    Compared as bytes, in constant time: any text, ASCII or not, on either side, gives True or False, never
    an error. The settings are accepted encoded as UTF-8 (curl, browsers) or as latin-1 (Python requests'
    ``HTTPBasicAuth``, which Label Studio 1.23 uses to reach the backend): both spell the same text.
    """
    given = _basic_credentials(header)
    if given is None:
        return False
    user_ok = _same_text(given[0], user)
    pass_ok = _same_text(given[1], password)
    return user_ok and pass_ok


def _same_text(given: bytes, expected: str) -> bool:
    ok = hmac.compare_digest(given, expected.encode("utf-8"))
    try:
        latin1 = expected.encode("latin-1")
    except UnicodeEncodeError:
        return ok
    return hmac.compare_digest(given, latin1) or ok


def basic_auth_header(user: str, password: str) -> str:
    """``Authorization`` header value for HTTP basic auth (used by tests and the CLI)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
