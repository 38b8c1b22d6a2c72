"""The one settings object, read from the environment in one place.

Entry points (the CLI, the WSGI app, the trainer process) call :meth:`Settings.from_env` once and pass the
result down; nothing else in the package reads a setting from ``os.environ`` (what else reads it: torchrun's
rank variables, where a process runs under torchrun, and copies of the environment for child processes). Names follow label-studio-ml where it has
one (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``, ``MODEL_DIR``, ``BASIC_AUTH_*``, ``LOG_LEVEL``); the
rest are ``MASKCLIP_*``. Every field's environment variable is listed in :data:`ENV`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .engine.modes import DENSE_MODES
from .engine.presets import DEFAULT_PRESET, GOVERNED, PRESETS
from .errors import BadInput

__all__ = ["Settings", "ENV", "SECRET_FIELDS", "SettingsError", "redact"]


class SettingsError(BadInput):
    """A setting has a value that cannot be used; the message names the variable."""


def _env(name: str) -> dict[str, Any]:
    return {"env": name, "secret": False}


def _secret(name: str) -> Any:
    """A secret setting (a credential): left out of ``repr``, :meth:`Settings.public`, checkpoints and
    ``/metrics``. Marking a field here is the one place that makes it secret (see :data:`SECRET_FIELDS`)."""
    return field(default="", repr=False, metadata={"env": name, "secret": True})


@dataclass(frozen=True)
class Settings:
    # --- model -------------------------------------------------------------------------------------
    model: str = field(default="ViT-B-16", metadata=_env("MASKCLIP_MODEL"))
    # open_clip pretrained tag ("openai", "laion2b_s34b_b88k"), a local state-dict file, or "hf-hub:org/name".
    # "random" gives random weights and is refused unless allow_random is set (tests, smoke runs).
    pretrained: str = field(default="openai", metadata=_env("MASKCLIP_PRETRAINED"))
    allow_random: bool = field(default=False, metadata=_env("MASKCLIP_ALLOW_RANDOM"))
    device: str = field(default="auto", metadata=_env("MASKCLIP_DEVICE"))  # auto | cpu | cuda | cuda:N
    precision: str = field(default="auto", metadata=_env("MASKCLIP_PRECISION"))  # auto | fp32 | bf16 | fp16
    cache_dir: str = field(default="", metadata=_env("MASKCLIP_CACHE_DIR"))  # open_clip download cache
    # Run the image tower through torch.compile (a GPU speed-up; compiling takes a minute at start, per size).
    compile: bool = field(default=False, metadata=_env("MASKCLIP_COMPILE"))

    # --- dense prediction --------------------------------------------------------------------------
    # A method's published inference as a whole (engine/presets.py, docs/method.md): maskclip | sclip |
    # clearclip | naclip (the default: the best published, with PAMR) | legacy (this project's earlier
    # pipeline). The settings below marked "preset" default to None, which means "as the preset says"; one
    # set explicitly overrides the preset (`Settings.overrides` lists them; /metrics and the model version
    # name them).
    preset: str = field(default=DEFAULT_PRESET, metadata=_env("MASKCLIP_PRESET"))
    dense_mode: str | None = field(default=None, metadata=_env("MASKCLIP_DENSE_MODE"))  # preset
    templates: str | None = field(default=None, metadata=_env("MASKCLIP_TEMPLATES"))  # preset; name or file path
    short_side: int | None = field(default=None, metadata=_env("MASKCLIP_SHORT_SIDE"))  # preset; resize
    # Resized sides are rounded to about this many pixels (a multiple of the encoder stride), so images of
    # similar shapes share a batch; 0 rounds to the stride only (exact aspect, smaller batches). Legacy only.
    size_multiple: int = field(default=64, metadata=_env("MASKCLIP_SIZE_MULTIPLE"))
    # At most this many pixels enter the encoder per image (0: 4 x short_side^2); extreme aspect ratios are
    # squeezed to fit instead of costing gigabytes. Legacy only (the presets cap the long side at 2048).
    max_input_pixels: int = field(default=0, metadata=_env("MASKCLIP_MAX_INPUT_PIXELS"))
    window: int | None = field(default=None, metadata=_env("MASKCLIP_WINDOW"))  # preset; 0: whole image
    stride: int | None = field(default=None, metadata=_env("MASKCLIP_STRIDE"))  # preset
    key_smoothing: bool | None = field(default=None, metadata=_env("MASKCLIP_KEY_SMOOTHING"))  # preset
    prompt_denoising: bool | None = field(default=None, metadata=_env("MASKCLIP_PROMPT_DENOISING"))  # preset
    # preset; "pamr": pixel-adaptive mask refinement (at the original size with the authors' presets); "none".
    refine: str | None = field(default=None, metadata=_env("MASKCLIP_REFINE"))
    temperature: float | None = field(default=None, metadata=_env("MASKCLIP_TEMPERATURE"))  # preset
    # A pixel whose best class probability is below this belongs to no label.
    min_confidence: float = field(default=0.0, metadata=_env("MASKCLIP_MIN_CONFIDENCE"))
    # Regions smaller than this fraction of the image are dropped from pre-annotations.
    min_area: float = field(default=0.0005, metadata=_env("MASKCLIP_MIN_AREA"))
    batch_size: int = field(default=16, metadata=_env("MASKCLIP_BATCH_SIZE"))
    # The task score Label Studio sorts by (lower = less sure, label it next), averaged over labelled
    # pixels: confidence (winning probability) | margin (best minus second best) | entropy (1 - normalised).
    score: str = field(default="confidence", metadata=_env("MASKCLIP_SCORE"))

    # --- Label Studio and serving ------------------------------------------------------------------
    label_studio_url: str = field(default="", metadata=_env("LABEL_STUDIO_URL"))
    label_studio_api_key: str = _secret("LABEL_STUDIO_API_KEY")
    model_dir: str = field(default="./model_dir", metadata=_env("MODEL_DIR"))
    # Where the annotation store lives: "" = the SQLite file MODEL_DIR/annotations.sqlite3 (one machine); a
    # path or sqlite:///path for another SQLite file; postgresql://user:password@host:port/db for a
    # PostgreSQL database that several instances share (docs/replicas.md). Secret: the URL may hold a password.
    store_url: str = _secret("MASKCLIP_STORE_URL")
    basic_auth_user: str = field(default="", metadata=_env("BASIC_AUTH_USER"))
    basic_auth_pass: str = _secret("BASIC_AUTH_PASS")
    log_level: str = field(default="INFO", metadata=_env("LOG_LEVEL"))
    workers: int = field(default=1, metadata=_env("WORKERS"))
    threads: int = field(default=4, metadata=_env("THREADS"))
    # OpenMP's wait policy for torch's CPU threads in the served workers; "" means PASSIVE there (`serve` sets
    # it before torch loads): a thread that waits at a barrier sleeps instead of spinning on a core its
    # partner needs (interactive speed on a shared CPU, docs/interactive.md). ACTIVE spins.
    omp_wait_policy: str = field(default="", metadata=_env("OMP_WAIT_POLICY"))
    # Image fetching: private, loopback and link-local hosts other than LABEL_STUDIO_URL's are refused
    # unless allowed (server-side request forgery).
    allow_private_urls: bool = field(default=False, metadata=_env("MASKCLIP_ALLOW_PRIVATE_URLS"))
    max_image_pixels: int = field(default=64_000_000, metadata=_env("MASKCLIP_MAX_IMAGE_PIXELS"))
    # Pixels being decoded at once per worker process (images wait for room, up to the download timeout).
    max_pixels_in_flight: int = field(default=128_000_000, metadata=_env("MASKCLIP_MAX_PIXELS_IN_FLIGHT"))
    max_download_bytes: int = field(default=50_000_000, metadata=_env("MASKCLIP_MAX_DOWNLOAD_BYTES"))
    download_timeout: float = field(default=20.0, metadata=_env("MASKCLIP_DOWNLOAD_TIMEOUT"))
    polygons: bool = field(default=True, metadata=_env("MASKCLIP_POLYGONS"))
    # /predict stops starting new batches after this many seconds (Label Studio gives up at 100 s); tasks
    # left over get no prediction and are asked for again later (or use `labelstudio-maskclip preannotate`).
    predict_time_budget: float = field(default=75.0, metadata=_env("MASKCLIP_PREDICT_TIME_BUDGET"))
    fetch_threads: int = field(default=8, metadata=_env("MASKCLIP_FETCH_THREADS"))
    # Interactive prompting keeps each image's decoded pixels and dense features for further clicks and
    # boxes; this bounds that cache per worker process (MiB).
    interactive_cache_mb: int = field(default=512, metadata=_env("MASKCLIP_INTERACTIVE_CACHE_MB"))

    # --- MaskCLIP+ training ------------------------------------------------------------------------
    train_steps: int = field(default=2000, metadata=_env("MASKCLIP_TRAIN_STEPS"))
    train_batch_size: int = field(default=4, metadata=_env("MASKCLIP_TRAIN_BATCH_SIZE"))
    train_crop: int = field(default=512, metadata=_env("MASKCLIP_TRAIN_CROP"))
    train_lr: float = field(default=0.01, metadata=_env("MASKCLIP_TRAIN_LR"))
    train_momentum: float = field(default=0.9, metadata=_env("MASKCLIP_TRAIN_MOMENTUM"))
    train_weight_decay: float = field(default=5e-4, metadata=_env("MASKCLIP_TRAIN_WEIGHT_DECAY"))
    train_self_training_start: float = field(default=0.1, metadata=_env("MASKCLIP_TRAIN_SELF_TRAINING_START"))
    train_pseudo_threshold: float = field(default=0.0, metadata=_env("MASKCLIP_TRAIN_PSEUDO_THRESHOLD"))
    train_every_n: int = field(default=0, metadata=_env("MASKCLIP_TRAIN_EVERY_N"))  # 0: off
    train_interval_minutes: float = field(default=0.0, metadata=_env("MASKCLIP_TRAIN_INTERVAL_MINUTES"))
    train_val_fraction: float = field(default=0.2, metadata=_env("MASKCLIP_TRAIN_VAL_FRACTION"))
    student: str = field(default="deeplabv3_resnet50", metadata=_env("MASKCLIP_STUDENT"))
    student_pretrained: str = field(default="imagenet", metadata=_env("MASKCLIP_STUDENT_PRETRAINED"))
    promote: str = field(default="better", metadata=_env("MASKCLIP_PROMOTE"))  # better | always
    # After a promotion or rollback, re-predict the unlabeled tasks in the background (needs LABEL_STUDIO_URL).
    rescore: bool = field(default=True, metadata=_env("MASKCLIP_RESCORE"))

    def __post_init__(self) -> None:
        """Fill the settings left None from the preset; remember which ones were set (the overrides)."""
        if self.preset not in PRESETS:
            raise SettingsError(f"MASKCLIP_PRESET={self.preset!r}: choose one of {', '.join(PRESETS)}")
        preset = PRESETS[self.preset]
        explicit = tuple(name for name in GOVERNED if getattr(self, name) is not None)
        object.__setattr__(self, "_overrides", explicit)
        for name, attr in GOVERNED.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(preset, attr))

    @property
    def overrides(self) -> dict[str, Any]:
        """The settings that a preset governs but were set explicitly, by field name, with their values."""
        return {name: getattr(self, name) for name in getattr(self, "_overrides", ())}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every field from ``environ`` (default ``os.environ``); ``overrides`` (CLI flags) win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validated()

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes``; settings taken from the preset follow a new preset."""
        unset: dict[str, Any] = {name: None for name in GOVERNED if name not in self.overrides and name not in changes}
        return dataclasses.replace(self, **unset, **changes).validated()

    def validated(self) -> Settings:
        if self.dense_mode not in DENSE_MODES:
            raise SettingsError(f"MASKCLIP_DENSE_MODE={self.dense_mode!r}: choose one of {', '.join(DENSE_MODES)}")
        if self.refine not in ("none", "pamr"):
            raise SettingsError(f"MASKCLIP_REFINE={self.refine!r}: choose none or pamr")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise SettingsError(f"MASKCLIP_PRECISION={self.precision!r}: choose auto, fp32, bf16 or fp16")
        if self.score not in SCORES:
            raise SettingsError(f"MASKCLIP_SCORE={self.score!r}: choose one of {', '.join(SCORES)}")
        if self.promote not in ("better", "always"):
            raise SettingsError(f"MASKCLIP_PROMOTE={self.promote!r}: choose better or always")
        if self.window and (self.stride or 0) <= 0:
            raise SettingsError("MASKCLIP_STRIDE must be positive when MASKCLIP_WINDOW is set")
        positive = ("batch_size", "train_steps", "train_batch_size", "train_crop", "max_image_pixels",
                    "max_pixels_in_flight", "max_download_bytes", "fetch_threads", "workers", "threads",
                    "interactive_cache_mb")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{ENV[name]}={getattr(self, name)!r} must be positive")
        fractions = ("min_confidence", "min_area", "train_val_fraction", "train_self_training_start",
                     "train_pseudo_threshold")  # fmt: skip
        for name in fractions:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SettingsError(f"{ENV[name]}={getattr(self, name)!r} must be between 0 and 1")
        if min(self.short_side or 0, self.window or 0, self.size_multiple, self.max_input_pixels) < 0:
            raise SettingsError(
                "MASKCLIP_SHORT_SIDE, MASKCLIP_MAX_INPUT_PIXELS, MASKCLIP_WINDOW and MASKCLIP_SIZE_MULTIPLE must be >= 0"
            )
        for name in ("download_timeout", "temperature", "predict_time_budget"):
            if not (getattr(self, name) or 0) > 0:  # NaN too
                raise SettingsError(f"{ENV[name]}={getattr(self, name)!r} must be positive")
        store_url = self._checked_store_url()
        return self if store_url == self.store_url else dataclasses.replace(self, store_url=store_url)

    def _checked_store_url(self) -> str:
        """The store URL with its scheme in lower case (libpq reads ``POSTGRESQL://`` as a ``key=value``
        string and quotes all of it in its error); :class:`SettingsError` if its form is wrong."""
        scheme, sep, rest = self.store_url.partition("://")
        if not sep:
            return self.store_url
        scheme = scheme.lower()
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise SettingsError(
                f"MASKCLIP_STORE_URL has the scheme {scheme!r}: use a path, sqlite:///path or postgresql://..."
            )
        if scheme == "sqlite" and (not rest.startswith("/") or not rest[1:].strip()):
            raise SettingsError(
                f"MASKCLIP_STORE_URL={self.store_url!r}: an SQLite URL is sqlite:///relative/path or "
                "sqlite:////absolute/path (three slashes, then the path), or give the path itself"
            )
        return f"{scheme}{sep}{rest}"

    def public(self) -> dict[str, Any]:
        """Every setting but the secrets, by field name: what may be written to disk, logged or served."""
        return redact(dataclasses.asdict(self))


SCORES = ("confidence", "margin", "entropy")  # the engine's image score kinds (engine.segmenter.SCORES)

#: field name -> environment variable
ENV: dict[str, str] = {f.name: f.metadata["env"] for f in dataclasses.fields(Settings)}


#: names of the secret settings (credentials), from the fields declared with ``_secret``
SECRET_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Settings) if f.metadata["secret"])


def redact(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (settings by field name or environment variable, e.g. read back from an older checkpoint)
    without the secret ones."""
    hidden = set(SECRET_FIELDS) | {ENV[name] for name in SECRET_FIELDS}
    return {k: v for k, v in values.items() if k not in hidden}


def _parse(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kind = kind.removesuffix(" | None")
    try:
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return raw
    except ValueError:
        raise SettingsError(f"{f.metadata['env']}={raw!r} is not a valid {kind}") from None
