"""Test isolation: a temporary data root and database name for the whole session.

The environment is set before anything imports ``core.data.store`` (and with it FiftyOne), so tests
never touch an operator's ``datasets/`` or database.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

# Test modules also import this file as ``tests.conftest``: the second import must reuse the
# session's root, or the job worker would be pointed at another database.
if os.environ.get("_VIGIL_TEST_PID") != str(os.getpid()):
    os.environ["_VIGIL_TEST_PID"] = str(os.getpid())
    os.environ["VIGIL_DATA_ROOT"] = tempfile.mkdtemp(prefix="vigil-test-")
    os.environ["VIGIL_DB_NAME"] = f"vigil_test_{uuid.uuid4().hex[:8]}"
    os.environ.pop("FIFTYONE_DATABASE_URI", None)
_ROOT = Path(os.environ["VIGIL_DATA_ROOT"])

from core.config import shared_data  # noqa: E402

SHARED = shared_data()


def in_ci() -> bool:
    """True in CI (``CI`` set to anything but empty / 0 / false, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def need_shared(*parts: str) -> Path:
    """Path inside ../shared/data, or skip the test with a reason when it is absent. In CI a
    missing folder fails the test: a green run must not mean that half the suite was skipped."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        msg = f"real data not available: {p} is absent (see ../shared/data/README.md)"
        if in_ci():
            pytest.fail(f"{msg}; in CI (CI={os.environ['CI']!r}) the real data must be there", pytrace=False)
        pytest.skip(msg)
    return p


def tamper_onnx(path: Path) -> None:
    """Corrupt an exported model the way a stale or damaged file differs: noise of 2 % of its
    spread on the largest weight tensor (a plain scale would not do: the unit-length output
    cancels it)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    init = max((i for i in m.graph.initializer if len(i.dims) >= 2), key=lambda i: int(np.prod(i.dims)))
    w = numpy_helper.to_array(init)
    noisy = w + 0.02 * w.std() * np.random.default_rng(0).standard_normal(w.shape)
    init.CopyFrom(numpy_helper.from_array(noisy.astype(w.dtype), init.name))
    onnx.save(m, str(path))


@pytest.fixture(scope="session")
def data_root() -> Path:
    return _ROOT


@pytest.fixture
def dsname(request) -> str:
    """A fresh dataset name per test, deleted afterwards."""
    name = "t_" + uuid.uuid4().hex[:10]
    yield name
    from core.data import store

    store.delete_dataset(name)


def ingest_campus62(name: str, dest: Path, identities: slice, val: bool = False) -> str:
    """Ingest real campus62 crops into dataset ``name``: the training identities ``identities``
    (folders in sorted order) and, with ``val``, the val split (query/gallery tags, two cameras),
    copied under ``dest`` first. Returns ``name``."""
    import shutil

    from core.services.ingest import ingest

    src = need_shared("reid", "campus62")
    for d in sorted((src / "train").iterdir())[identities]:
        shutil.copytree(d, dest / "train" / d.name)
    if val:
        shutil.copytree(src / "val", dest / "val")
    ingest(dest, "reid", name)
    return name


def fake_embeddings(name: str, dim: int = 16, noise: float = 0.35, seed: int = 0) -> None:
    """Unit vectors clustered by identity into ``emb_base``; activates model "base"."""
    import numpy as np

    from core.data import store

    ds = store.get_dataset(name)
    ids, idents = ds.values(["id", "identity"])
    rng = np.random.default_rng(seed)
    centres = {i: rng.normal(size=dim) for i in sorted(set(idents), key=str)}
    vecs = {}
    for sid, ident in zip(ids, idents):
        v = centres[ident] + noise * rng.normal(size=dim) * np.sqrt(dim) / 4
        vecs[sid] = (v / np.linalg.norm(v)).astype(np.float32)
    store.set_values(name, store.embedding_field("base"), vecs)
    store.set_active_model(name, "base")


@pytest.fixture(scope="session")
def tud_campus():
    """TUD-Campus (every 10th frame, MOT15 identities) with synthetic embeddings (identity
    centroid + noise): ingested once per session, never written; tests work on ``tud_clone``."""
    from core.data import store
    from core.services.ingest import ingest

    name = "tud_base_" + uuid.uuid4().hex[:6]
    ingest(need_shared("mot", "TUD-Campus"), "mot", name, every_n=10)
    fake_embeddings(name)
    yield name
    store.delete_dataset(name)


@pytest.fixture
def tud_clone(tud_campus, dsname) -> str:
    """A fresh clone of ``tud_campus`` per test, model "base" active (deleted by ``dsname``)."""
    from core.data import store

    store.get_dataset(tud_campus).clone(dsname, persistent=True)
    store.set_active_model(dsname, "base")
    return dsname


class Worker:
    """A real job worker process (``python -m core worker``) on the test database."""

    def __init__(self):
        self.proc = None

    def start(self) -> "Worker":
        import subprocess
        import sys
        import time

        from core.data import store

        store.dataset_names()  # bring up the embedded MongoDB first: two processes starting it race
        logf = _ROOT / "worker.log"
        start = logf.stat().st_size if logf.exists() else 0
        self.log = open(logf, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "core", "worker"], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=Path(__file__).resolve().parent.parent)
        deadline = time.time() + 90
        while "worker ready" not in logf.read_text()[start:]:
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("job worker did not start:\n" + logf.read_text()[-3000:])
            time.sleep(0.3)
        return self

    def kill(self) -> None:
        """SIGKILL the worker and the job process it runs (a machine losing the worker)."""
        import signal

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def worker():
    """A real job worker on the test database, for the session (restartable by tests)."""
    w = Worker().start()
    yield w
    w.stop()


def pytest_sessionfinish(session, exitstatus):
    """Stop this session's MongoDB: FiftyOne's service would wait for every client process,
    including ones a test killed, and keep the test run's output pipe open."""
    import shutil

    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if str(_ROOT) not in " ".join(p.info["cmdline"] or []):
            continue
        try:
            parent = p.parent()
            if parent is not None and "fiftyone/service/main.py" in " ".join(parent.cmdline()):
                parent.kill()
            p.kill()
        except psutil.Error:
            pass
    shutil.rmtree(_ROOT, ignore_errors=True)
