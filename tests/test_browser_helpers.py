"""The browser test's own helper, checked without a browser (tests/test_browser.py skips
wherever chromium is absent; this must run everywhere)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests import test_browser as browser


def test_settle_raises_when_the_run_does_not_settle(tmp_path, monkeypatch):
    """A page that keeps running fails at once with what it was doing, never silently."""
    class Running:  # a page whose Streamlit status widget never goes away
        url = "http://127.0.0.1:1/train"

        def locator(self, _sel):
            return self

        def count(self):
            return 1

        def screenshot(self, path, full_page=True):
            Path(path).write_bytes(b"")

    monkeypatch.setattr(browser, "SHOTS", tmp_path)
    t0 = time.time()
    with pytest.raises(AssertionError, match=r"did not settle after activating: .* still running 2 s later on "
                                             r"http://127\.0\.0\.1:1/train"):
        browser._settle(Running(), "activating", timeout=2)
    assert time.time() - t0 < 10 and (tmp_path / "unsettled.png").exists()
