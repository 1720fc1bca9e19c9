"""The worker side of background jobs: ``python -m core worker`` and the body of the delegated
operation (``plugins/vigil``). A job's record, progress and cancel flag live in
:mod:`core.data.jobs`; the work of each kind is in :mod:`core.jobs.tasks`.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Callable

from core.data.jobs import (JobCancelled, Reporter, _now, _process_started, execute_queued, log_path,
                            reconcile, record_job)

log = logging.getLogger(__name__)


def _resolve(kind: str) -> Callable:
    from core.jobs import tasks  # on first job: the services behind the tasks are heavy to import

    return tasks.TASKS[kind]


def run(ctx) -> dict[str, Any]:
    """Body of the delegated operation: runs the task named in ``ctx.params``."""
    job_id = str(ctx.request_params.get("run_doc"))
    kind = ctx.params["kind"]
    args = ctx.params.get("args") or {}
    dataset = ctx.dataset.name
    lp = log_path(job_id)
    lp.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(lp)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    record_job(job_id, dataset, kind, args, pid=os.getpid(), pid_started=_process_started(os.getpid()),
               host=socket.gethostname(), worker_pid=os.getppid(), started_at=_now(), log=str(lp))
    reporter = Reporter(job_id, ctx)
    log.info("job %s: %s on %s with %s", job_id, kind, dataset, args)
    try:
        reporter.check()
        result = _resolve(kind)(dataset, args, reporter)
        reporter.progress(1.0, "done", force=True)
        log.info("job %s finished: %s", job_id, result)
        return result
    except JobCancelled:
        log.warning("job %s cancelled by operator", job_id)
        raise
    except Exception:
        log.exception("job %s failed", job_id)
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def launch_worker(poll: float = 0.5, reconcile_every: float = 10.0) -> None:
    """``python -m core worker``: what ``fiftyone delegated launch --monitor`` does (each job in
    a monitored child process), plus marking jobs whose process died as failed."""
    n = reconcile()
    print(f"Vigil worker ready (pid {os.getpid()}); {n} orphaned job(s) marked failed", flush=True)
    last = time.time()
    try:
        while True:
            execute_queued(limit=1)
            if time.time() - last > reconcile_every:
                reconcile()
                last = time.time()
            time.sleep(poll)
    except KeyboardInterrupt:
        pass


class LocalReporter(Reporter):
    """A reporter for running a task in the foreground (CLI): progress goes to a tqdm bar,
    Ctrl-C cancels."""

    def __init__(self, desc: str):
        from tqdm import tqdm

        super().__init__(job_id="local")
        self.bar = tqdm(total=1000, desc=desc, dynamic_ncols=True, bar_format="{l_bar}{bar}| {elapsed}<{remaining}")

    def progress(self, fraction: float, label: str = "", force: bool = False, **details: Any) -> None:
        self.bar.n = int(1000 * max(0.0, min(1.0, fraction)))
        self.bar.set_postfix_str(label[:60], refresh=True)

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        self.bar.close()
