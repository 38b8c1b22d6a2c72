"""Deployment files: the compose file parses and names only settings the code reads."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from labelstudio_maskclip.settings import ENV

ROOT = Path(__file__).resolve().parents[1]


def test_compose_parses_and_backend_environment_matches_settings():
    compose = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    backend = compose["services"]["maskclip"]
    names = {entry.split("=", 1)[0] for entry in backend["environment"]}
    assert names <= set(ENV.values()), names - set(ENV.values())
    assert {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR", "MASKCLIP_PRETRAINED"} <= names
    assert backend["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    mounted = {v.split(":")[1] for v in backend["volumes"]}
    assert {"/data/model_dir", "/data/weights"} <= mounted
    assert compose["services"]["label-studio"]["image"].endswith(":1.23.2")


def test_dockerfile_env_names_are_settings_and_it_runs_as_non_root():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^USER maskclip$", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    for name in ("MODEL_DIR", "MASKCLIP_CACHE_DIR"):
        assert re.search(rf"\b{name}=", text) and name in ENV.values()
    assert 'CMD ["labelstudio-maskclip", "serve"' in text


def test_compose_gives_label_studio_the_documented_settings_that_the_end_to_end_tests_use(tmp_path):
    """Label Studio in compose may call maskclip's fixed address and nothing else it blocks by default; the
    settings come from the one list (network.LABEL_STUDIO_SETTINGS) that the e2e harness starts Label Studio
    with, so what the tests prove is what compose runs."""
    from labelstudio_maskclip.commands.network import (
        COMPOSE_BACKEND_ADDRESS,
        COMPOSE_SUBNET,
        LABEL_STUDIO_SETTINGS,
        SWITCHES,
    )
    from tests.labelstudio import LabelStudioServer

    compose = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    services = compose["services"]
    ls_env = dict(entry.split("=", 1) for entry in services["label-studio"]["environment"])
    documented = LABEL_STUDIO_SETTINGS["docker compose"]
    address_names = {*SWITCHES, "USER_ADDITIONAL_BANNED_SUBNETS"}
    assert {k: v for k, v in ls_env.items() if k in address_names} == documented
    assert services["maskclip"]["networks"]["maskclip-net"]["ipv4_address"] == COMPOSE_BACKEND_ADDRESS
    assert services["label-studio"]["networks"] == ["maskclip-net"]
    assert compose["networks"]["maskclip-net"]["ipam"]["config"][0]["subnet"] == COMPOSE_SUBNET
    # the e2e harness: the same settings, for its backend on loopback
    harness = LabelStudioServer(tmp_path).environment()
    tested = {k: v for k, v in harness.items() if k in address_names}
    assert tested == LABEL_STUDIO_SETTINGS["same machine"] and tested.keys() == documented.keys()
    assert "Connect Model -> http://maskclip:9090" in (ROOT / "docker" / "docker-compose.yml").read_text()


def test_documented_same_machine_settings_are_the_tested_ones():
    """docs/connecting.md's lines and ``make label-studio`` (scripts/label-studio.sh) give Label Studio the
    settings the e2e harness runs with; the README names the refusal they cure and the target."""
    from labelstudio_maskclip.commands.network import LABEL_STUDIO_SETTINGS

    same_machine = LABEL_STUDIO_SETTINGS["same machine"]
    connecting = (ROOT / "docs" / "connecting.md").read_text()
    for name, value in same_machine.items():
        assert f"export {name}={value}\n" in connecting, name
    readme = (ROOT / "README.md").read_text()
    assert "403 URL resolves to a reserved network address (block: 127.0.0.0/8)" in readme
    assert "make label-studio" in readme and "http://127.0.0.1:9090" in readme
    printed = subprocess.run(
        ["bash", str(ROOT / "scripts" / "label-studio.sh"), "--print-env"],
        env={**os.environ, "VENV": str(Path(sys.executable).parents[1])},
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    exported = dict(shlex.split(line)[1].split("=", 1) for line in printed.splitlines())
    assert exported == dict(same_machine)


def test_replicas_compose_runs_two_instances_over_one_store_and_one_model_volume_behind_one_address():
    """docker/docker-compose.replicas.yml (docs/replicas.md): two identical instances with the single-instance
    settings plus a PostgreSQL store, one model volume, no port of their own; nginx in front at the one address
    Label Studio may call, passing to both; Label Studio and the network as in docker-compose.yml."""
    from labelstudio_maskclip.commands.network import COMPOSE_BACKEND_ADDRESS

    replicas = yaml.safe_load((ROOT / "docker" / "docker-compose.replicas.yml").read_text())
    single = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    services = replicas["services"]
    first, second = services["maskclip-1"], services["maskclip-2"]
    assert first == second and "ports" not in first
    env = dict(entry.split("=", 1) for entry in first["environment"])
    assert set(env) <= set(ENV.values()), set(env) - set(ENV.values())
    single_env = dict(entry.split("=", 1) for entry in single["services"]["maskclip"]["environment"])
    assert {k: v for k, v in env.items() if k != "MASKCLIP_STORE_URL"} == single_env
    postgres = dict(entry.split("=", 1) for entry in services["postgres"]["environment"])
    user, db = postgres["POSTGRES_USER"], postgres["POSTGRES_DB"]
    assert env["MASKCLIP_STORE_URL"] == f"postgresql://{user}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/{db}"
    assert first["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert {"model-dir:/data/model_dir", "weights:/data/weights"} <= set(first["volumes"])
    assert services["label-studio"] == single["services"]["label-studio"]
    assert replicas["networks"] == single["networks"]

    balancer = services["maskclip"]
    assert balancer["image"].startswith("nginx:") and balancer["ports"] == ["9090:9090"]
    assert balancer["networks"]["maskclip-net"]["ipv4_address"] == COMPOSE_BACKEND_ADDRESS
    mount, target = balancer["volumes"][0].split(":")[:2]
    assert target == "/etc/nginx/conf.d/default.conf"
    conf = (ROOT / "docker" / mount).read_text()
    assert re.findall(r"^\s*server (\S+):9090\b", conf, re.M) == ["maskclip-1", "maskclip-2"]
    assert re.search(r"^\s*listen 9090;", conf, re.M) and "proxy_pass http://maskclip_instances;" in conf
    assert int(re.search(r"proxy_read_timeout (\d+)s;", conf).group(1)) > 100  # Label Studio waits 100 s
    assert "non_idempotent" not in conf  # a request an instance got is never sent to the other
    assert "Connect Model -> http://maskclip:9090" in (ROOT / "docker" / "docker-compose.replicas.yml").read_text()
