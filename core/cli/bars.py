"""Terminal progress for the command line: a tqdm bar fed by core's ``progress(done, total,
msg)`` callbacks (its own module, so the commands of :mod:`core.services.export` need not import
:mod:`core.cli.main`)."""
from __future__ import annotations

from tqdm import tqdm


class Bar:
    """A tqdm bar fed by the ``progress(done, total, ...)`` callbacks of core."""

    def __init__(self, desc: str):
        self.bar = tqdm(desc=desc, unit="it", dynamic_ncols=True)

    def __call__(self, done: int, total: int, msg: str = "") -> None:
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        if msg:
            self.bar.set_postfix_str(str(msg)[:40], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
