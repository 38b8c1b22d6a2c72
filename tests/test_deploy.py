"""Deployment files: the compose file parses and names only settings the code reads."""

from __future__ import annotations

import re
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
