"""The first connection, against a real Label Studio 1.23.2: with its default settings, and with the ones the
README documents (network.LABEL_STUDIO_SETTINGS, which the session's Label Studio runs with).

- stock Label Studio refuses a backend on loopback with the README's exact message, creates nothing, and
  `doctor` names the block and prints the fix (the settings the session's Label Studio runs with);
- with those settings: Connect Model works, the webhook is created, Retrieve predictions fills tasks, and
  `doctor` reports the backend, the webhook (and its missing credentials under basic auth), interactive mode
  and the predictions of the current model version.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from labelstudio_maskclip.commands.network import BLOCK_MESSAGE, LABEL_STUDIO_SETTINGS
from labelstudio_maskclip.serving.server import basic_auth_header
from tests.labelstudio import started
from tests.photos import COCO128_PHOTOS
from tests.served import start_backend, wait_for
from tests.tiny import TINY_VIT, save_random_state

pytestmark = pytest.mark.e2e

NAMES = ["000000000009.jpg", "000000000025.jpg"]
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Animal" predicted_values="zebra,giraffe,animal"/>
    <Label value="Food"/>
  </BrushLabels>
</View>"""
SMART_CONFIG = CONFIG.replace(
    "  <BrushLabels",
    '  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Animal"/></KeyPointLabels>\n'
    "  <BrushLabels",
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_state(TINY_VIT, tmp_path_factory.mktemp("weights") / "tiny_vit.pt")


@pytest.fixture(scope="module")
def stock_label_studio(tmp_path_factory):
    """Label Studio with its default settings: ML_BLOCK_LOCAL_IP, SSRF_PROTECTION_ENABLED and
    USE_DEFAULT_BANNED_SUBNETS on, nothing added."""
    with started(tmp_path_factory.mktemp("stock-label-studio"), address_settings={}) as server:
        yield server


def _doctor(env, *args: str) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "labelstudio_maskclip.cli", "doctor", *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout + run.stderr


def test_stock_label_studio_refuses_a_loopback_backend_and_doctor_names_the_block_and_the_fix(
    stock_label_studio, weights, tmp_path
):
    ls = stock_label_studio
    backend = start_backend(tmp_path / "backend", TINY_VIT, str(weights), ls.url, workers=1,
                            extra_env={"LABEL_STUDIO_API_KEY": ls.token})  # fmt: skip
    try:
        api = ls.api()
        project = api.create_project("stock", CONFIG)
        with pytest.raises(requests.HTTPError) as refused:
            api.connect_ml_backend(project["id"], backend.url, title="maskclip")
        assert "-> 403" in str(refused.value)
        assert BLOCK_MESSAGE.format(subnet="127.0.0.0/8") in str(refused.value)  # the README's exact words
        assert api.list_ml_backends(project["id"]) == []

        code, out = _doctor(backend.env, "--project", str(project["id"]), "--backend-url", backend.url)
        assert code == 1, out
        assert f"[FAIL] address block: Label Studio refuses {backend.url}" in out
        assert "Connect Model: 403 URL resolves to a reserved network address (block: 127.0.0.0/8)" in out
        assert "the backend's webhook: 403 URL resolves to a reserved network address (block: 127.0.0.0/8)" in out
        for name, value in LABEL_STUDIO_SETTINGS["same machine"].items():  # the fix = what the tests run with
            assert f"{name}={value}" in out
        assert "[FAIL] ML backend: no ML backend is connected" in out
        assert "[ok  ] token: legacy token accepted" in out and "Label Studio 1.23.2 reachable" in out
        assert "[ok  ] labeling config:" in out and "Animal (prompted as zebra, giraffe, animal)" in out

        # no backend connected and no --backend-url: the block for this backend's default address, the
        # Label Studio settings that hold the range by name, and the lines that lift it for loopback only
        code, out = _doctor(backend.env, "--project", str(project["id"]), "--no-weights")
        assert code == 1, out
        assert "[FAIL] address block: Label Studio refuses http://127.0.0.1:9090: Connect Model: 403" in out
        assert "Label Studio blocks 127.0.0.0/8: the range is in its built-in list, on while " \
               "USE_DEFAULT_BANNED_SUBNETS is true (the default), or USER_ADDITIONAL_BANNED_SUBNETS" in out  # fmt: skip
        for name, value in LABEL_STUDIO_SETTINGS["same machine"].items():
            assert f"{name}={value}" in out
    finally:
        backend.stop()
    assert not [line for line in backend.log_text().splitlines() if "POST /webhook" in line]


def test_with_the_documented_settings_connect_webhook_predictions_and_doctor(label_studio, weights, tmp_path):
    """The session's Label Studio runs with LABEL_STUDIO_SETTINGS["same machine"]; the backend here requires
    basic auth, so doctor must also see the webhook without credentials, then with them."""
    backend = start_backend(tmp_path / "backend", TINY_VIT, str(weights), label_studio.url, workers=1,
                            extra_env={"LABEL_STUDIO_API_KEY": label_studio.token, "BASIC_AUTH_USER": "ls",
                                       "BASIC_AUTH_PASS": "pw"})  # fmt: skip
    try:
        api = label_studio.api()
        project = api.create_project("documented settings", CONFIG)
        pid = project["id"]
        api.import_files(pid, [COCO128_PHOTOS / n for n in NAMES])
        ml = api.connect_ml_backend(pid, backend.url, title="maskclip", auth_method="BASIC_AUTH",
                                    basic_auth_user="ls", basic_auth_pass="pw")  # fmt: skip
        assert api.get_ml_backend(ml["id"])["state"] in ("CO", "CONNECTED")
        hooks = [h for h in api.request("GET", "/api/webhooks/", params={"project": pid})
                 if h["url"] == backend.url + "/webhook"]  # fmt: skip
        assert len(hooks) == 1  # Label Studio may call it: the webhook was created on connect

        code, out = _doctor(backend.env, "--project", str(pid))
        assert code == 0, out  # nothing blocks pre-annotation
        assert f"[ok  ] ML backend: maskclip (id {ml['id']}) at {backend.url}, connected, basic auth" in out
        assert "is in 127.0.0.0/8, which Label Studio blocks by default; this Label Studio accepts it" in out
        assert "[ok  ] interactive: interactive pre-annotation is off" in out
        assert "[WARN] webhook: basic auth is on and the webhook to" in out and "carries no credentials" in out
        assert "[note] predictions: 0 of 2 tasks have a prediction of the current model version maskclip-" in out

        api.request("PATCH", f"/api/webhooks/{hooks[0]['id']}/",
                    json={"headers": {"Authorization": basic_auth_header("ls", "pw")}})  # fmt: skip
        api.retrieve_predictions(pid)
        for task in api.list_tasks(pid, fields_all=False):
            wait_for(lambda task=task: api.list_predictions(task["id"]), 120, f"a prediction of task {task['id']}")
        code, out = _doctor(backend.env, "--project", str(pid), "--no-weights")
        assert code == 0, out
        assert f"[ok  ] webhook: webhook {hooks[0]['id']} to {backend.url}/webhook is active, with basic-auth" in out
        assert "[ok  ] predictions: 2 of 2 tasks have a prediction of the current model version maskclip-" in out
        assert "WARN" not in out and "FAIL" not in out

        # interactive mode, judged against the config's smart tools (this backend answers them)
        # (1.23.2 answers 500 to a PATCH without project or url, 400 without the auth: send what the UI sends)
        edit = {"project": pid, "url": backend.url, "auth_method": "BASIC_AUTH", "basic_auth_user": "ls",
                "basic_auth_pass": "pw", "is_interactive": True}  # fmt: skip
        api.request("PATCH", f"/api/ml/{ml['id']}", json=edit)
        code, out = _doctor(backend.env, "--project", str(pid), "--no-weights")
        assert "[note] interactive: interactive pre-annotation is on, but the labeling config has no smart" in out
        api.request("PATCH", f"/api/projects/{pid}/", json={"label_config": SMART_CONFIG})
        code, out = _doctor(backend.env, "--project", str(pid), "--no-weights")
        assert "[ok  ] interactive: interactive pre-annotation is on: <KeyPointLabels name='click'> send" in out
        assert "ignores" not in out

        # a live model version that is another model's (Label Studio accepts a version some prediction has)
        task_id = api.list_tasks(pid, fields_all=False)[0]["id"]
        api.request("POST", "/api/predictions/", json={"task": task_id, "model_version": "other-model",
                                                        "score": 0.5, "result": []})  # fmt: skip
        api.request("PATCH", f"/api/projects/{pid}/", json={"model_version": "other-model"})
        code, out = _doctor(backend.env, "--project", str(pid), "--no-weights")
        assert code == 0, out  # a warning, not a block
        assert "[WARN] predictions: the project's live model version is 'other-model', which is not this " \
               "backend's" in out and "Settings -> Annotation -> Prelabeling: pick 'Models: maskclip'" in out  # fmt: skip
    finally:
        backend.stop()


def test_doctor_accepts_a_personal_access_token_and_refreshes_it(label_studio, tmp_path):
    api = label_studio.api()
    token = api.request("POST", "/api/token/")["token"]
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": token,
           "MODEL_DIR": str(tmp_path / "md")}  # fmt: skip
    code, out = _doctor(env, "--no-weights")
    assert code == 0, out
    assert "[ok  ] token: personal access token accepted" in out and "refresh works" in out
    code, out = _doctor({**env, "LABEL_STUDIO_API_KEY": token[:-4] + "AAAA"}, "--no-weights")
    assert code == 1 and "[FAIL] token: Label Studio refused LABEL_STUDIO_API_KEY (personal access token)" in out
