"""Settings from environment variables, resolved once per process.

Everything Vigil writes lives under one data root (``VIGIL_DATA_ROOT``, default ``datasets/``
beside this repository): FiftyOne's database directory, materialised media, model versions and
exports. Tests point ``VIGIL_DATA_ROOT`` at a temporary folder and ``VIGIL_DB_NAME`` at their own
database name so they never touch an operator's data.

:func:`apply_fiftyone_env` must run before ``fiftyone`` is imported; :mod:`core.data.store` does it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Settings:
    data_root: Path
    db_name: str

    @property
    def db_dir(self) -> Path:
        return self.data_root / "db"

    @property
    def media_dir(self) -> Path:
        return self.data_root / "media"

    @property
    def models_dir(self) -> Path:
        return self.data_root / "models"

    @property
    def exports_dir(self) -> Path:
        return self.data_root / "exports"


def settings() -> Settings:
    root = Path(os.environ.get("VIGIL_DATA_ROOT", REPO / "datasets")).expanduser().resolve()
    return Settings(data_root=root, db_name=os.environ.get("VIGIL_DB_NAME", "vigil"))


SIMILARITY_SERVER_SCHEMES = ("http://", "https://", "tcp://")


def similarity_uri() -> str:
    """Where the similarity indexes live (:mod:`core.data.similarity`): ``VIGIL_SIMILARITY_URI``
    (a Milvus server's address, or a folder), else LanceDB tables in ``<data root>/similarity``."""
    return os.environ.get("VIGIL_SIMILARITY_URI") or str(settings().data_root / "similarity")


def similarity_backend() -> str:
    """FiftyOne Brain's backend for :func:`similarity_uri`: "milvus" for a server, else "lancedb"."""
    return "milvus" if similarity_uri().startswith(SIMILARITY_SERVER_SCHEMES) else "lancedb"


def apply_fiftyone_env() -> Settings:
    """Point FiftyOne at the data root's embedded MongoDB (unless the user gave their own URI)."""
    s = settings()
    s.data_root.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("FIFTYONE_DATABASE_URI"):
        os.environ["FIFTYONE_DATABASE_DIR"] = str(s.db_dir)
    os.environ["FIFTYONE_DATABASE_NAME"] = s.db_name
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ.setdefault("FIFTYONE_PLUGINS_DIR", str(REPO / "plugins"))
    os.environ.setdefault("FIFTYONE_DEFAULT_APP_ADDRESS", "127.0.0.1")
    # FiftyOne Brain (and the App's similarity search) find the index backend here
    os.environ[f"FIFTYONE_BRAIN_SIMILARITY_{similarity_backend().upper()}_URI"] = similarity_uri()
    return s


def shared_data() -> Path:
    """Real footage for tests and benchmarks (``../shared/data``; never shipped or committed)."""
    return Path(os.environ.get("VIGIL_SHARED_DATA", REPO.parent / "shared" / "data"))


class OutsideDataRoot(ValueError):
    """A path Vigil was about to write lies outside the data root."""


def inside_data_root(path: str | os.PathLike, root: Path | None = None) -> Path:
    """``path`` resolved (symbolic links followed), or :class:`OutsideDataRoot` when it is not
    under ``root`` (default: the data root). Every path built from outside input goes through
    this before anything is written there."""
    base = (root or settings().data_root).resolve()
    p = Path(path).resolve()
    if p != base and not p.is_relative_to(base):
        raise OutsideDataRoot(f"refusing to write {p}: it is outside {base}")
    return p
