"""The test suite's own guard: in CI a missing real-data folder fails instead of skipping."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
from tests.conftest import need_shared

def test_probe():
    need_shared("no-such-folder")
"""


def _run(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    t = tmp_path / "test_probe_shared.py"
    t.write_text(PROBE)
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("CI", "_VIGIL_TEST_PID")}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(REPO)
    env["TMPDIR"] = str(tmp_path)  # the child's data root (tests.conftest makes one) goes with tmp_path
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           "-c", "/dev/null", str(t)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_missing_shared_data_skips_locally_and_fails_in_ci(tmp_path):
    local = _run(tmp_path, None)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout
    ci = _run(tmp_path, "true")
    assert ci.returncode == 1 and "1 failed" in ci.stdout and "in CI" in ci.stdout, ci.stdout
