"""Settings from environment variables, all prefixed `UNDISTILLABLE_` (see docs/serving.md)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from protect.host import cpu_count
from serving.ledger_rules import is_url

PREFIX = "UNDISTILLABLE_"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = PROJECT_ROOT / "models" / "default"
DEFAULT_KEYS_DB = PROJECT_ROOT / "ledger" / "serving.sqlite"


class ConfigError(ValueError):
    """An environment variable with a value the service cannot use."""


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(PREFIX + name)
    return default if value is None or value.strip() == "" else value.strip()


def _int(name: str, default: int | None, minimum: int = 0) -> int | None:
    raw = _env(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{PREFIX}{name}={value} must be ≥ {minimum}")
    return value


def _bool(name: str, default: bool) -> bool:
    raw = _env(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{PREFIX}{name}={raw!r}: use 1/0, true/false, yes/no or on/off")


@dataclass(frozen=True)
class OutputPolicy:
    """What the API reveals per row: full probabilities, the top k (rest zero), or the label only."""

    kind: str = "probs"
    k: int | None = None
    decimals: int | None = None

    def __post_init__(self):
        if self.kind not in ("probs", "topk", "label"):
            raise ConfigError(f"output policy {self.kind!r}: use probs, topk or label")
        if self.kind == "topk" and (self.k is None or self.k < 1):
            raise ConfigError("output policy topk needs k ≥ 1")
        if self.kind != "topk" and self.k is not None:
            object.__setattr__(self, "k", None)
        if self.decimals is not None and not 0 <= self.decimals <= 8:
            raise ConfigError(f"decimals={self.decimals}: use 0…8")

    def as_dict(self) -> dict:
        return {"kind": self.kind, "k": self.k, "decimals": self.decimals}


@dataclass(frozen=True)
class Settings:
    model_dir: Path = DEFAULT_MODEL_DIR
    policy: OutputPolicy = field(default_factory=OutputPolicy)
    keys_db: Path | str = DEFAULT_KEYS_DB  # a SQLite file, or a postgresql:// URL (serving/ledger_pg.py)
    keys_db_configured: bool = False  # UNDISTILLABLE_KEYS_DB was set (else the default path): for messages
    # Fail closed: keys are required unless the operator turns them off (UNDISTILLABLE_REQUIRE_KEYS=off).
    # Never inferred from the database's contents, so revoking the last key or naming the wrong database
    # cannot open the API.
    require_keys: bool = True
    max_rows: int = 8192
    max_body_bytes: int = 64 << 20
    workers: int = field(default_factory=cpu_count)
    api_threads: int = 4
    ort_threads: int = 1
    hide_options: bool = False
    ledger: bool = True
    access_log: bool = True
    tracing: bool = False  # OpenTelemetry spans on prediction routes (health, docs and metadata always have them)

    @classmethod
    def from_env(cls) -> "Settings":
        workers = _int("WORKERS", cpu_count(), minimum=1)
        kind = (_env("OUTPUT_POLICY", "probs") or "probs").lower()
        policy = OutputPolicy(kind=kind, k=_int("TOPK", 3, minimum=1) if kind == "topk" else None,
                              decimals=_int("DECIMALS", None))
        require = (_env("REQUIRE_KEYS", "on") or "on").lower()
        if require not in ("auto", "1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"{PREFIX}REQUIRE_KEYS={require!r}: use on (the default) or off")
        keys_db = _env("KEYS_DB")
        return cls(
            model_dir=Path(_env("MODEL_DIR", str(DEFAULT_MODEL_DIR))).expanduser(),
            policy=policy,
            keys_db=keys_db if is_url(keys_db) else Path(keys_db or DEFAULT_KEYS_DB).expanduser(),
            keys_db_configured=keys_db is not None,
            # "auto" was the former default; it now means on (it used to open the API when no key was active)
            require_keys=require not in ("0", "false", "no", "off"),
            max_rows=_int("MAX_ROWS", 8192, minimum=1),
            max_body_bytes=_int("MAX_BODY_BYTES", 64 << 20, minimum=1024),
            workers=workers,
            api_threads=_int("API_THREADS", 4, minimum=1),
            # workers × ORT threads ≤ cores: no oversubscription by default
            ort_threads=_int("ORT_THREADS", max(1, cpu_count() // workers), minimum=1),
            hide_options=_bool("HIDE_OPTIONS", False),
            ledger=_bool("LEDGER", True),
            access_log=_bool("ACCESS_LOG", True),
            tracing=_bool("TRACING", False),
        )
