"""``labelstudio-maskclip doctor``: what stands between this backend and pre-annotations, in plain words.

Run from the backend's environment (same variables as ``serve``). Each check gives a :class:`Finding`:
``ok``, ``note`` (worth knowing), ``warn`` (something does not work, pre-annotation still does: learning
from annotations, for instance) or ``fail`` (pre-annotation is blocked), with the fix when it is not ok.

Checks, in order: the CLIP weights load (device, precision); ``MODEL_DIR`` is writable and the store is
healthy; Label Studio answers at ``LABEL_STUDIO_URL``, its version, the token (legacy or personal access
token, and that the latter refreshes). With a project: its labeling config (controls, labels, the names the
model is prompted with), the connected ML backend and its URL, whether Label Studio refuses that URL's
address (it blocks loopback and private networks by default: see :mod:`.network`), the webhook Label Studio
created for the backend (and its credentials when basic auth is on), interactive mode against the config's
smart tools, the project's live model version (another model's is reported), and how many tasks carry a
prediction of the model version served now. With no backend connected, the address checked is
``--backend-url`` or this backend's default (``DEFAULT_BACKEND_URL``), and a refusal names the Label Studio
setting that holds the blocked range (``USE_DEFAULT_BANNED_SUBNETS`` / ``USER_ADDITIONAL_BANNED_SUBNETS``).

Label Studio's own verdict on an address is asked without changing anything: a ``POST /api/ml`` and a
``POST /api/webhooks/`` naming no project are refused either for the address (403, the block) or for the
missing project (400, the address passed), and nothing is created either way.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import requests

from ..fetching.images import ImageError
from ..labelstudio.api import LabelStudioAPI, LabelStudioAPIError
from ..labelstudio.labeling import LabelConfigError, label_interface, parse_label_config
from ..learning.store import Store, StoreError
from ..models import shared_maskclip
from ..serving.backend import MaskCLIPBackend
from ..serving.server import basic_auth_header
from ..settings import Settings
from ..training.checkpoints import current_version
from . import network

__all__ = ["Finding", "diagnose", "render", "to_json", "blocks_preannotation", "DEFAULT_BACKEND_URL"]

Status = Literal["ok", "note", "warn", "fail"]

#: The URL checked when the project has no ML backend yet and none is given (``--backend-url``).
DEFAULT_BACKEND_URL = "http://127.0.0.1:9090"


@dataclass(frozen=True)
class Finding:
    """One check's outcome. ``fix`` says what to do (empty when there is nothing to do)."""

    topic: str
    status: Status
    message: str
    fix: str = ""


def blocks_preannotation(findings: Iterable[Finding]) -> bool:
    return any(f.status == "fail" for f in findings)


def render(findings: Sequence[Finding]) -> str:
    """Human-readable report: one block per finding, then a one-line verdict."""
    tags = {"ok": "ok  ", "note": "note", "warn": "WARN", "fail": "FAIL"}
    lines: list[str] = []
    for f in findings:
        lines.append(f"[{tags[f.status]}] {f.topic}: {f.message}")
        for i, fix_line in enumerate(f.fix.splitlines()):
            lines.append(("       fix: " if i == 0 else "            ") + fix_line)
    failed = [f.topic for f in findings if f.status == "fail"]
    warned = [f.topic for f in findings if f.status == "warn"]
    if failed:
        lines.append(f"\nPre-annotation is blocked: fix {', '.join(dict.fromkeys(failed))} (see FAIL above).")
    elif warned:
        lines.append(f"\nPre-annotation should work; see the warnings ({', '.join(dict.fromkeys(warned))}).")
    else:
        lines.append("\nEverything checked is in order.")
    return "\n".join(lines)


def to_json(findings: Sequence[Finding]) -> str:
    return json.dumps({"blocked": blocks_preannotation(findings), "findings": [asdict(f) for f in findings]})


def diagnose(
    settings: Settings,
    project: int | None = None,
    *,
    backend_url: str | None = None,
    load_weights: bool = True,
) -> list[Finding]:
    """Every check that applies (see the module docstring); never raises for what it checks."""
    findings: list[Finding] = []
    if load_weights:
        findings += _guard("weights", lambda: check_weights(settings))
    findings += _guard("model dir", lambda: check_model_dir(settings))
    ls_findings, api = _guard_api(settings)
    findings += ls_findings
    if project is not None:
        if api is None:
            findings.append(
                Finding(
                    "project",
                    "fail",
                    f"project {project} not checked: Label Studio is not reachable or refused the token (see above)",
                )
            )
        else:
            findings += _guard("project", lambda: check_project(settings, api, project, backend_url))
    return findings


def _guard(topic: str, check: Callable[[], list[Finding]]) -> list[Finding]:
    """A check that crashes becomes a finding instead of a traceback."""
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return [Finding(topic, "fail", f"the check itself failed: {type(e).__name__}: {e}")]


# --- the backend's own machine -------------------------------------------------------------------------


def check_weights(settings: Settings) -> list[Finding]:
    """Load the CLIP teacher as the server would; name the device and precision it runs in."""
    from ..engine.loading import WeightsError

    try:
        seg = shared_maskclip(settings)
    except WeightsError as e:
        return [Finding("weights", "fail", str(e), "set MASKCLIP_PRETRAINED to a local checkpoint file (README "
                        "'Weights without internet'), or let this machine download the tag once")]  # fmt: skip
    except Exception as e:  # noqa: BLE001 - CUDA errors, out of memory, a broken file
        return [Finding("weights", "fail", f"{settings.model} / {settings.pretrained} did not load: "
                        f"{type(e).__name__}: {e}", "check MASKCLIP_MODEL, MASKCLIP_PRETRAINED, MASKCLIP_DEVICE "
                        "(cpu works everywhere) and MASKCLIP_PRECISION")]  # fmt: skip
    clip = seg.clip
    dtype = str(clip.dtype).replace("torch.", "")
    found = [Finding("weights", "ok", f"{clip.name} with weights {clip.pretrained} loaded on {clip.device} in {dtype}")]
    if clip.pretrained == "random":
        found.append(Finding("weights", "warn", "RANDOM weights (MASKCLIP_ALLOW_RANDOM): masks are meaningless",
                             "set MASKCLIP_PRETRAINED to real weights"))  # fmt: skip
    if clip.device.type == "cpu" and settings.device == "auto":
        found.append(Finding("weights", "note", "no CUDA device is visible, so MaskCLIP runs on the CPU: "
                             "a few seconds per image with ViT-B/16", "for speed, run on a machine with an "
                             "NVIDIA GPU (docker: the GPU reservation in docker-compose.yml)"))  # fmt: skip
    return found


def check_model_dir(settings: Settings) -> list[Finding]:
    """MODEL_DIR exists and is writable; the store there passes its consistency check."""
    path = Path(settings.model_dir).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-") as probe:
            probe.write(b"ok")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as e:
        return [Finding("model dir", "warn", f"MODEL_DIR={path} is not writable ({e.strerror or e}): annotations "
                        "sent by webhook cannot be stored and no student can be trained",
                        "make MODEL_DIR writable by this user (docker: the model-dir volume) or point MODEL_DIR "
                        "at a writable folder")]  # fmt: skip
    where = "the store at MASKCLIP_STORE_URL" if settings.store_url else f"the store in {path}"
    try:
        store = Store(settings.store_url or path)
        problems = store.check()
        labels = store.labels()
        store.close()
    except StoreError as e:
        fix = ("check MASKCLIP_STORE_URL (host, port, database, user, password) and that the server accepts "
               "connections from here" if settings.store_url else
               "MODEL_DIR must be on a local disk (SQLite in WAL mode); move it off network storage")  # fmt: skip
        return [Finding("model dir", "warn", f"{where} cannot be opened: {e}", fix)]
    if problems:
        aside = ("restore the PostgreSQL database from its backup, or drop and recreate it (an empty store is made "
                 "at the next start)" if store.path is None else
                 f"stop the backend, move {store.path.name} and its -wal/-shm files aside")  # fmt: skip
        return [Finding("model dir", "warn", f"{where} is damaged: {'; '.join(problems[:5])}",
                        f"{aside} and run `labelstudio-maskclip backfill --project ID` to rebuild it from Label "
                        "Studio")]  # fmt: skip
    served = current_version(settings) or "MaskCLIP (no student promoted)"
    stored = f"masks stored for labels {', '.join(labels)}" if labels else "no annotations stored yet"
    return [
        Finding("model dir", "ok", f"MODEL_DIR={path} is writable, the store is healthy ({stored}); serving {served}")
    ]


# --- Label Studio --------------------------------------------------------------------------------------


def _guard_api(settings: Settings):
    try:
        return check_label_studio(settings)
    except Exception as e:  # noqa: BLE001
        return [Finding("Label Studio", "fail", f"the check itself failed: {type(e).__name__}: {e}")], None


def check_label_studio(settings: Settings):
    """(findings, an API client when Label Studio answered and accepted the token, else None)."""
    url = settings.label_studio_url.strip().rstrip("/")
    if not url:
        return [Finding("Label Studio", "fail", "LABEL_STUDIO_URL is not set: images uploaded to Label Studio "
                        "cannot be downloaded, and the project cannot be checked",
                        "set LABEL_STUDIO_URL to Label Studio's address as seen from here, e.g. "
                        "http://localhost:8080 (docker compose: http://label-studio:8080)")], None  # fmt: skip
    try:
        health = requests.get(url + "/health", timeout=10)
    except requests.RequestException as e:
        return [Finding("Label Studio", "fail", f"no answer at LABEL_STUDIO_URL={url} ({type(e).__name__})",
                        "check the address from this machine (curl " + url + "/health); in docker, use the "
                        "service name, not localhost")], None  # fmt: skip
    if health.status_code != 200:
        return [Finding("Label Studio", "fail", f"{url}/health answered {health.status_code}: is this Label Studio?",
                        "set LABEL_STUDIO_URL to Label Studio's base URL")], None  # fmt: skip
    found: list[Finding] = []
    if not settings.label_studio_api_key:
        found.append(Finding("Label Studio", "ok", f"reachable at {url}"))
        found.append(Finding("token", "fail", "LABEL_STUDIO_API_KEY is not set: Label Studio refuses to serve "
                             "uploaded images without it", "copy a token from Label Studio, Account & Settings "
                             "(a personal access token, or a legacy token) into LABEL_STUDIO_API_KEY"))  # fmt: skip
        return found, None
    api = LabelStudioAPI.from_settings(settings)
    kind = "personal access token" if api.fetcher.uses_personal_access_token else "legacy token"
    try:
        version = api.request("GET", "/api/version")
        release = version.get("release") or version.get("label-studio-os-package", {}).get("version", "?")
    except (LabelStudioAPIError, ImageError):
        release = "unknown"
    found.append(Finding("Label Studio", "ok", f"Label Studio {release} reachable at {url}"))
    if release not in ("unknown", "?") and not str(release).startswith("1.23"):
        found.append(
            Finding("Label Studio", "note", f"this backend was tested with Label Studio 1.23.2, not {release}")
        )
    try:
        if api.fetcher.uses_personal_access_token:
            api.fetcher.refresh_auth()  # raises when Label Studio refuses the refresh
        me = api.request("GET", "/api/current-user/whoami")
    except (LabelStudioAPIError, ImageError) as e:
        fix = ("create a new personal access token in Account & Settings (they can expire or be revoked)"
               if kind == "personal access token" else
               "copy the token from Account & Settings; legacy tokens must be enabled in Organization settings "
               "(or use a personal access token)")  # fmt: skip
        found.append(Finding("token", "fail", f"Label Studio refused LABEL_STUDIO_API_KEY ({kind}): {e}", fix))
        return found, None
    who = me.get("email") or me.get("username") or f"user {me.get('id')}"
    refresh = ", exchanged for an access token just now (refresh works)" if kind == "personal access token" else ""
    found.append(Finding("token", "ok", f"{kind} accepted, acting as {who}{refresh}"))
    return found, api


# --- one project ---------------------------------------------------------------------------------------


def check_project(settings: Settings, api, project_id: int, backend_url: str | None = None) -> list[Finding]:
    try:
        project = api.project(project_id)
    except LabelStudioAPIError as e:
        return [Finding("project", "fail", f"project {project_id}: {e}",
                        "check the project id (it is in the project's URL: /projects/ID/)")]  # fmt: skip
    found: list[Finding] = []
    title = project.get("title") or project_id
    try:
        spec = parse_label_config(project.get("label_config") or "")
    except LabelConfigError as e:
        found.append(Finding("labeling config", "fail", f"project {project_id} ({title}): {e}",
                             "Project -> Settings -> Labeling Interface (the README's user path, step 4, has an "
                             "example)"))  # fmt: skip
        spec = None
    if spec is not None:
        controls = "; ".join(
            f"<{t.kind.capitalize()}Labels name={t.from_name!r}> on image {t.to_name!r} (task field ${t.image_key}): "
            + ", ".join(
                label.value if label.names == (label.value,) else f"{label.value} (prompted as {', '.join(label.names)})"
                for label in t.labels
            )
            for t in spec.targets
        )  # fmt: skip
        found.append(Finding("labeling config", "ok", f"project {project_id} ({title}): {controls}"))
    found += check_ml_backend(settings, api, project_id, backend_url, label_config=project.get("label_config") or "")
    if spec is not None:
        found += check_predictions(settings, api, project, spec)
    return found


def _ml_backends(api, project_id: int) -> list[dict[str, Any]]:
    body = api.request("GET", "/api/ml", params={"project": project_id})
    return body if isinstance(body, list) else body.get("results", [])


_STATES = {"CO": "connected", "DI": "disconnected", "ER": "error", "TR": "training", "PR": "predicting"}


def check_ml_backend(
    settings: Settings, api, project_id: int, backend_url: str | None = None, *, label_config: str = ""
) -> list[Finding]:
    """The project's ML backend(s), the address block for their URL (or, with none connected, for
    ``backend_url`` or this backend's default address), interactive mode against ``label_config``'s smart
    tools, the webhook."""
    backends = _ml_backends(api, project_id)
    found: list[Finding] = []
    if not backends:
        url = backend_url or DEFAULT_BACKEND_URL
        found.append(Finding("ML backend", "fail", f"no ML backend is connected to project {project_id}",
                             f"Project -> Settings -> Model -> Connect Model, URL {url} (the address at which "
                             "Label Studio reaches this backend)"))  # fmt: skip
        found += check_address(settings, api, url, given=backend_url is not None)
        return found
    for ml in backends:
        url = str(ml.get("url", "")).rstrip("/")
        state = _STATES.get(ml.get("state", ""), ml.get("readable_state") or ml.get("state"))
        auth = "basic auth" if ml.get("auth_method") == "BASIC_AUTH" else "no auth"
        line = f"{ml.get('title') or 'backend'} (id {ml.get('id')}) at {url}, {state}, {auth}, " \
               f"model version {ml.get('model_version') or '(none reported)'}"  # fmt: skip
        if state == "connected" or state in ("training", "predicting"):
            found.append(Finding("ML backend", "ok", line))
        else:
            error = str(ml.get("error_message") or "").strip()
            found.append(Finding("ML backend", "fail", line + (f": {error[:300]}" if error else ""),
                                 "start the backend (labelstudio-maskclip serve), then in Project -> Settings -> "
                                 "Model open the backend and save it again, so Label Studio checks it anew"))  # fmt: skip
        if settings.basic_auth_user and ml.get("auth_method") != "BASIC_AUTH":
            found.append(Finding("ML backend", "fail", "this backend requires basic auth (BASIC_AUTH_USER is set) "
                                 "but Label Studio connects without it: every call gets 401",
                                 "edit the model connection: Authentication method Basic Authentication, with "
                                 "BASIC_AUTH_USER / BASIC_AUTH_PASS"))  # fmt: skip
        found += check_address(settings, api, url, given=True)
        found += check_backend_answers(settings, url)
        found.append(check_interactive(bool(ml.get("is_interactive")), prompt_tools(label_config)))
        found += check_webhook(settings, api, project_id, url)
    return found


def prompt_tools(label_config: str) -> list[str]:
    """The config's controls that send interactive prompts: ``<KeyPointLabels smart="true">``,
    ``<RectangleLabels smart="true">`` (clicks, boxes) and ``<TextArea>`` (phrases), as ``<Tag name='x'>``."""
    try:
        controls = label_interface(label_config).controls or ()
    except LabelConfigError:
        return []
    tools = []
    for c in controls:
        smart = str((c.attr or {}).get("smart", "")).lower() == "true"
        if c.tag.lower() == "textarea" or (smart and c.tag.lower() in ("keypointlabels", "rectanglelabels")):
            tools.append(f"<{c.tag} name={c.name!r}>")
    return tools


def check_interactive(is_interactive: bool, tools: Sequence[str]) -> Finding:
    """Interactive mode (the model's *Interactive preannotations* switch) against the config's smart tools."""
    how = ("in the editor, switch on Auto-Annotation in the bottom bar and pick the smart tool from the "
           "Auto-Detect fly-out after choosing a label (a label chip can switch back to the plain tool, which "
           "sends nothing)")  # fmt: skip
    listed = ", ".join(tools)
    if is_interactive and tools:
        return Finding("interactive", "ok", f"interactive pre-annotation is on: {listed} send clicks, boxes and "
                       "phrases to this backend, which answers each with masks", how)  # fmt: skip
    if is_interactive:
        return Finding("interactive", "note", "interactive pre-annotation is on, but the labeling config has no "
                       "smart tool, so the editor sends no prompts", "add <KeyPointLabels smart=\"true\">, "
                       "<RectangleLabels smart=\"true\"> or a <TextArea> with the brush control's labels (README, "
                       "'Interactive')")  # fmt: skip
    if tools:
        return Finding("interactive", "warn", f"the labeling config has smart tools ({listed}) but interactive "
                       "pre-annotation is off: they send nothing to this backend",
                       "Project -> Settings -> Model: edit the model and switch on Interactive preannotations "
                       "(or PATCH /api/ml/{id} with is_interactive true, its project, url and auth fields: "
                       "Label Studio 1.23.2 answers 500 without project or url, 400 without the auth); then "
                       + how)  # fmt: skip
    return Finding("interactive", "ok", "interactive pre-annotation is off and the config has no smart tool "
                   "(pre-annotation only; the README's 'Interactive' section adds clicks, boxes and phrases)")  # fmt: skip


def _probe(api, path: str, url: str) -> tuple[int, str]:
    """Label Studio's verdict on ``url`` without creating anything: (status, its message)."""
    try:
        r = api.session.post(api.url + path, json={"url": url, "project": 0, "title": "doctor probe"},
                             headers=api.fetcher.auth_headers(api.url + path), timeout=30)  # fmt: skip
    except requests.RequestException as e:
        return 0, f"{type(e).__name__}"
    try:
        body = r.json()
    except ValueError:
        body = {}
    detail = body.get("detail") if isinstance(body, dict) else None
    return r.status_code, str(detail or r.text[:300])


def check_address(settings: Settings, api, url: str, *, given: bool) -> list[Finding]:
    """Does Label Studio refuse ``url`` (ML backend) and ``url/webhook``? Asked of Label Studio itself,
    then explained with the address as resolved here."""
    try:
        host, addresses = network.resolve(url)
    except (ValueError, OSError) as e:
        addresses, host = [], url
        local = f"(it does not resolve from here: {e})"
    else:
        local = "" if addresses == [host] else f"({host} is {', '.join(addresses)} from here)"
    where = f"{url} {local}" if local else url
    blocked_here = {ip: network.blocking_subnet(ip) for ip in addresses}
    default_ranges = sorted({s for s in blocked_here.values() if s})
    ml_status, ml_detail = _probe(api, "/api/ml", url)
    hook_status, hook_detail = _probe(api, "/api/webhooks/", url + "/webhook")
    refused = [(what, detail) for what, status, detail in (("Connect Model", ml_status, ml_detail),
               ("the backend's webhook", hook_status, hook_detail)) if status == 403]  # fmt: skip
    found: list[Finding] = []
    if refused:
        allow = _allowed_ranges(addresses)
        env = network.label_studio_environment(allow) if allow else {}
        lines = [f"{k}={v}" for k, v in env.items()]
        fix = (
            ("start Label Studio with (keeps its checks on, lets it call only " + ", ".join(allow) + "):\n"
             + "\n".join(lines) + "\n" if lines else "")
            + "or, broader (every address, ML backends and webhooks): ML_BLOCK_LOCAL_IP=false and "
            "SSRF_PROTECTION_ENABLED=false. docs/connecting.md says what each gives up"
        )  # fmt: skip
        said = "; ".join(f"{what}: 403 {detail}" for what, detail in refused) + _blocking_settings(refused)
        if ml_status == 403:
            found.append(Finding("address block", "fail", f"Label Studio refuses {where}: {said}", fix))
        else:  # ML_BLOCK_LOCAL_IP=false alone: predictions work, the webhook does not (Connect Model said 403)
            found.append(Finding("address block", "warn", f"Label Studio may call {where} as an ML backend but "
                                 f"refuses its webhook ({said}; SSRF_PROTECTION_ENABLED is on): annotations never "
                                 "reach the backend. Connect Model answered 403 although it saved the model",
                                 fix + ". Then add the webhook: disconnect and connect the model again"))  # fmt: skip
        return found
    unresolved = [detail for status, detail in ((ml_status, ml_detail), (hook_status, hook_detail)) if status >= 500]
    if unresolved:
        found.append(Finding("address block", "fail", f"Label Studio cannot use {url}: {unresolved[0]}",
                             "use an address Label Studio can resolve and reach (docker compose: "
                             "http://maskclip:9090)"))  # fmt: skip
        return found
    if default_ranges:
        found.append(Finding("address block", "ok", f"{where} is in {', '.join(default_ranges)}, which Label "
                             "Studio blocks by default; this Label Studio accepts it (its block is relaxed)"))  # fmt: skip
    else:
        found.append(Finding("address block", "ok", f"{where} is not in a range Label Studio blocks"
                             + ("" if given else "; pass --backend-url with the URL you will connect")))  # fmt: skip
    return found


def _blocking_settings(refused: Sequence[tuple[str, str]]) -> str:
    """Which of Label Studio's settings hold the ranges named in its refusals ("(block: 127.0.0.0/8)")."""
    ranges = sorted({m for _, detail in refused for m in re.findall(r"\(block: ([^)]+)\)", detail)})
    if not ranges:
        return ""
    builtin = [r for r in ranges if r in network.DEFAULT_BANNED_SUBNETS]
    where = (
        "its built-in list, on while USE_DEFAULT_BANNED_SUBNETS is true (the default), or "
        "USER_ADDITIONAL_BANNED_SUBNETS"
        if builtin
        else "USER_ADDITIONAL_BANNED_SUBNETS"
    )
    return f". Label Studio blocks {', '.join(ranges)}: the range is in {where}"


def _allowed_ranges(addresses: Sequence[str]) -> list[str]:
    """What to allow for these addresses: all of loopback for a loopback address, else each address."""
    out: list[str] = []
    for ip in addresses:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
        if address.is_loopback:
            out += [r for r in network.LOOPBACK if r not in out]
        elif network.blocking_subnet(ip):
            out.append(str(ipaddress.ip_network(address)))
    return out


def check_backend_answers(settings: Settings, url: str) -> list[Finding]:
    """GET url/health from here: is the backend Label Studio was given this one, and up?"""
    auth = (settings.basic_auth_user, settings.basic_auth_pass) if settings.basic_auth_user else None
    try:
        r = requests.get(url + "/health", timeout=5, auth=auth)
    except requests.RequestException as e:
        return [Finding("ML backend", "note", f"{url}/health does not answer from here ({type(e).__name__}); fine "
                        "if Label Studio reaches it by another route (docker network)")]  # fmt: skip
    if r.status_code == 503:
        return [Finding("ML backend", "fail", f"{url} is up but its model did not load: {r.text[:300]}",
                        "see the weights finding above, then restart the backend")]  # fmt: skip
    if r.status_code != 200:
        return [Finding("ML backend", "warn", f"{url}/health answered {r.status_code} from here")]
    return []


def check_webhook(settings: Settings, api, project_id: int, backend_url: str) -> list[Finding]:
    """The webhook Label Studio creates for the backend (annotations reach the store through it)."""
    target = backend_url.rstrip("/") + "/webhook"
    body = api.request("GET", "/api/webhooks/", params={"project": project_id})
    hooks = [h for h in (body if isinstance(body, list) else body.get("results", [])) if h.get("url") == target]
    if not hooks:
        return [Finding("webhook", "warn", f"no webhook to {target}: annotations never reach the backend, so "
                        "nothing is learned (pre-annotation works without it)",
                        "Label Studio creates it on Connect Model only if it may call that address (see the "
                        "address block). Add it: Project -> Settings -> Webhooks -> Add Webhook, URL " + target
                        + ", send payload on, all actions")]  # fmt: skip
    found: list[Finding] = []
    hook = hooks[0]
    if not hook.get("is_active", True):
        found.append(Finding("webhook", "warn", f"the webhook to {target} is switched off",
                             "Project -> Settings -> Webhooks: enable it"))  # fmt: skip
    if not hook.get("send_payload", True):
        found.append(Finding("webhook", "warn", f"the webhook to {target} sends no payload: annotations cannot be "
                             "stored", "Project -> Settings -> Webhooks: turn on Send payload"))  # fmt: skip
    if settings.basic_auth_user:
        expected = basic_auth_header(settings.basic_auth_user, settings.basic_auth_pass)
        headers = {str(k).lower(): v for k, v in (hook.get("headers") or {}).items()}
        if headers.get("authorization") != expected:
            state = "has other credentials" if "authorization" in headers else "carries no credentials"
            found.append(Finding("webhook", "warn", f"basic auth is on and the webhook to {target} {state}: the "
                                 "backend refuses every annotation with 401",
                                 f"Project -> Settings -> Webhooks -> {target}: add the header Authorization: "
                                 "Basic <base64 of BASIC_AUTH_USER:BASIC_AUTH_PASS> (or PATCH /api/webhooks/"
                                 f"{hook.get('id')}/ with {{\"headers\": {{\"Authorization\": \"Basic ...\"}}}})"))  # fmt: skip
    if not found:
        creds = ", with basic-auth credentials" if settings.basic_auth_user else ""
        found.append(Finding("webhook", "ok", f"webhook {hook.get('id')} to {target} is active{creds}"))
    return found


def check_predictions(settings: Settings, api, project: Mapping[str, Any], spec) -> list[Finding]:
    """How many tasks carry a prediction of the model version served now; the project's prelabel switch."""
    backend = MaskCLIPBackend(settings, str(project["id"]), project.get("label_config"))
    version, _ = backend.rt.model_for(backend.classes(spec)[1], load=False)
    total = with_version = 0
    for task in _task_versions(api, project["id"]):
        total += 1
        with_version += version in task
    found = [Finding("predictions", "ok" if with_version == total else "note",
                     f"{with_version} of {total} tasks have a prediction of the current model version {version}",
                     "" if with_version == total else
                     "Data Manager -> select tasks -> Retrieve predictions (up to 100 s per request), or "
                     f"`labelstudio-maskclip preannotate --project {project['id']}` for many tasks")]  # fmt: skip
    if not project.get("show_collab_predictions", True):
        found.append(Finding("predictions", "warn", "'Use predictions to prelabel tasks' is off: annotators do not "
                             "see the masks", "Project -> Settings -> Annotation (or Model): turn on 'Use "
                             "predictions to prelabel tasks'"))  # fmt: skip
    else:
        found += check_live_version(project.get("model_version"), version, _backend_titles(api, project["id"]))
    return found


def check_live_version(live: str | None, served: str, titles: Sequence[str]) -> list[Finding]:
    """The project's live model version (Settings -> Annotation -> Prelabeling) against what we serve:
    empty or a connected backend's title (the dropdown's "Models: <title>") follow the backend; one of our
    versions (``maskclip...``) is a fixed set of stored predictions; anything else is another model's."""
    pick = ("Project -> Settings -> Annotation -> Prelabeling: pick 'Models: " + (titles[0] if titles else
            "<the model's title>") + "' (asks this backend, follows a newly trained student) or 'Predictions: "
            + served + "' (the stored predictions of the version served now)")  # fmt: skip
    if live in ("", None, served, *titles):
        return []
    if str(live).startswith("maskclip"):
        return [Finding("predictions", "note", f"the project shows the stored predictions of model version "
                        f"{live!r} as prelabels, while {served} is served now", pick)]  # fmt: skip
    return [Finding("predictions", "warn", f"the project's live model version is {live!r}, which is not this "
                    "backend's (its versions are maskclip-...): annotators see that model's predictions, or none, "
                    "instead of MaskCLIP's masks", pick)]  # fmt: skip


def _backend_titles(api, project_id: int) -> list[str]:
    """Titles of the connected backends: a project's model_version naming one means "the live model"."""
    return [str(ml.get("title")) for ml in _ml_backends(api, project_id)]


def _task_versions(api, project_id: int, page_size: int = 500):
    """For each task of the project, the set of model versions of its predictions (light listing)."""
    page = 1
    while True:
        # Label Studio 1.23 fills predictions_model_versions only with fields=all; include keeps it light.
        params = {"project": project_id, "page": page, "page_size": page_size, "fields": "all",
                  "include": "id,predictions_model_versions"}  # fmt: skip
        try:
            body = api.request("GET", "/api/tasks", params=params)
        except LabelStudioAPIError as e:
            if e.status == 404 and page > 1:
                return
            raise
        tasks = body.get("tasks", []) if isinstance(body, dict) else body
        total = body.get("total") if isinstance(body, dict) else None
        for task in tasks:
            versions = task.get("predictions_model_versions") or []
            if isinstance(versions, str):  # "v1,v2" (a string in 1.23)
                versions = versions.split(",")
            yield {str(v).strip() for v in versions if str(v).strip()}
        if not tasks or (total is not None and page * page_size >= total):
            return
        page += 1
