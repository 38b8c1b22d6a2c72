"""Settings: read from the environment once, typed, and bad values named clearly."""

from __future__ import annotations

import pytest

from labelstudio_maskclip.settings import ENV, Settings, SettingsError


def test_environment_is_parsed_by_type_and_flags_override_it():
    env = {"MASKCLIP_MODEL": "RN50", "MASKCLIP_BATCH_SIZE": "32", "MASKCLIP_KEY_SMOOTHING": "off",
           "MASKCLIP_MIN_CONFIDENCE": "0.25", "LABEL_STUDIO_URL": "http://ls:8080", "MODEL_DIR": ""}  # fmt: skip
    s = Settings.from_env(env, batch_size=8)
    assert (s.model, s.batch_size, s.key_smoothing, s.min_confidence) == ("RN50", 8, False, 0.25)
    assert s.label_studio_url == "http://ls:8080" and s.model_dir == "./model_dir"  # empty = default
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(
    "env,message",
    [
        ({"MASKCLIP_BATCH_SIZE": "many"}, "MASKCLIP_BATCH_SIZE='many' is not a valid int"),
        ({"MASKCLIP_KEY_SMOOTHING": "maybe"}, "MASKCLIP_KEY_SMOOTHING='maybe' is not a valid bool"),
        ({"MASKCLIP_DENSE_MODE": "segformer"}, "MASKCLIP_DENSE_MODE='segformer': choose one of"),
        ({"MASKCLIP_PROMOTE": "sometimes"}, "MASKCLIP_PROMOTE='sometimes'"),
        ({"MASKCLIP_BATCH_SIZE": "0"}, "MASKCLIP_BATCH_SIZE=0 must be positive"),
        ({"MASKCLIP_MIN_AREA": "5"}, "MASKCLIP_MIN_AREA=5.0 must be between 0 and 1"),
        ({"MASKCLIP_WINDOW": "-448"}, "MASKCLIP_WINDOW and MASKCLIP_SIZE_MULTIPLE must be >= 0"),
        ({"MASKCLIP_PREDICT_TIME_BUDGET": "0"}, "MASKCLIP_PREDICT_TIME_BUDGET=0.0 must be positive"),
        ({"MASKCLIP_DOWNLOAD_TIMEOUT": "nan"}, "MASKCLIP_DOWNLOAD_TIMEOUT=nan must be positive"),
        ({"MASKCLIP_TEMPERATURE": "-1"}, "MASKCLIP_TEMPERATURE=-1.0 must be positive"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        Settings.from_env(env)


def test_every_field_has_its_own_variable():
    assert len(set(ENV.values())) == len(ENV)
    assert {"LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "MODEL_DIR", "BASIC_AUTH_USER", "BASIC_AUTH_PASS",
            "LOG_LEVEL", "MASKCLIP_MODEL", "MASKCLIP_PRETRAINED", "MASKCLIP_DEVICE"} <= set(ENV.values())  # fmt: skip


def test_secrets_are_declared_once_and_kept_out_of_public_views():
    from labelstudio_maskclip.settings import SECRET_FIELDS, redact

    assert set(SECRET_FIELDS) == {
        "label_studio_api_key",
        "basic_auth_pass",
        "store_url",
    }  # a store URL may hold a password
    s = Settings(label_studio_api_key="key-123-secret", basic_auth_pass="pass-456-secret", basic_auth_user="ls",
                 store_url="postgresql://maskclip:pw-secret@db/maskclip")  # fmt: skip
    public = s.public()
    assert not set(SECRET_FIELDS) & public.keys() and public["basic_auth_user"] == "ls"
    assert set(public) | set(SECRET_FIELDS) == set(ENV)  # everything else is there
    assert "secret" not in repr(s) and "secret" not in str(public)
    legacy = {"model": "RN50", "label_studio_api_key": "k", "BASIC_AUTH_PASS": "p", "basic_auth_user": "ls"}
    assert redact(legacy) == {"model": "RN50", "basic_auth_user": "ls"}


def test_the_pipeline_in_a_model_version_never_holds_a_comma():
    """Label Studio lists a task's model versions joined by commas: a comma would split ours in two."""
    from labelstudio_maskclip.models import pipeline_description

    assert pipeline_description(Settings()) == "naclip"
    described = pipeline_description(Settings(short_side=448, templates="a,b.txt"))
    assert described == "naclip+short_side=448+templates=a;b.txt"


@pytest.mark.parametrize("url", ["", "/srv/store.sqlite3", "sqlite:///store.db", "postgresql://u:p@db:5432/maskclip",
                                 "postgres://db/maskclip", "postgresql://u@/maskclip?host=/run/postgresql"])  # fmt: skip
def test_the_store_url_is_a_path_an_sqlite_url_or_a_postgresql_url(url):
    assert Settings.from_env({"MASKCLIP_STORE_URL": url}).store_url == url


def test_a_store_url_of_another_database_is_refused_with_its_variable():
    with pytest.raises(SettingsError, match="MASKCLIP_STORE_URL.*'mysql'"):
        Settings.from_env({"MASKCLIP_STORE_URL": "mysql://db/maskclip"})


def test_the_store_url_scheme_is_written_in_lower_case():
    """libpq reads ``POSTGRESQL://`` as a key=value string and quotes all of it, password included, in its error."""
    assert Settings.from_env({"MASKCLIP_STORE_URL": "POSTGRESQL://u:pw@db/x"}).store_url == "postgresql://u:pw@db/x"
    assert Settings.from_env({"MASKCLIP_STORE_URL": "SQLite:///a/b.db"}).store_url == "sqlite:///a/b.db"


@pytest.mark.parametrize("url", ["sqlite://store.db", "sqlite://", "sqlite:///", "SQLITE://relative/x.sqlite3"])
def test_an_sqlite_url_without_its_third_slash_is_refused_at_startup(url):
    with pytest.raises(SettingsError, match="MASKCLIP_STORE_URL.*three slashes"):
        Settings.from_env({"MASKCLIP_STORE_URL": url})
