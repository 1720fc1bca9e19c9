"""Background jobs (embedding, map layout, fine-tuning rounds) on FiftyOne delegated operations.

:func:`submit` queues a ``@vigil/jobs/run_job`` operation in the same MongoDB; ``python -m core
worker`` (``fiftyone delegated launch --monitor``, started by ``make run``) runs each queued job
in a child process; the FiftyOne App lists them too. Jobs therefore survive a browser reload and
an app restart. Vigil keeps one record per job in its ``vigil_jobs`` collection: the process id
running it, live details (step, loss, ETA, metrics history), a cancel flag and the log file.

A job whose process died (SIGKILL, OOM, machine restart) is found by :func:`reconcile` — called
by :func:`list_jobs` and at worker start — and marked failed with the tail of its log, never left
"running". Cancelling is cooperative: the task polls :meth:`Reporter.should_stop` and raises
:class:`JobCancelled`; a queued job is failed at once.
"""
from __future__ import annotations

import logging
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from core.data import store
from core.config import settings

log = logging.getLogger(__name__)

OPERATOR = "@vigil/jobs/run_job"
COLLECTION = "vigil_jobs"

# The job kinds; each runs core.jobs.tasks.TASKS[kind](dataset, args, reporter) -> dict in a worker.
KINDS = ("embed", "embed_shard", "layout", "train", "ingest", "export_dataset", "export_model")
RUNS = "vigil_embed_runs"  # one record per spread embedding: its shards, which are done, attempts
SHARD_ATTEMPTS = 3  # a shard whose job died is queued again at most this often in all


class JobCancelled(RuntimeError):
    """Raised inside a task when the operator cancelled it."""


class JobError(RuntimeError):
    """A job cannot be submitted or found."""


def _jobs():
    return store.db()[COLLECTION]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def log_path(job_id: str) -> Path:
    return settings().data_root / "jobs" / f"{job_id}.log"


# ------------------------------------------------------------------ submitting and listing

def submit(dataset: str, kind: str, args: dict[str, Any] | None = None, create: bool = False) -> str:
    """Queue a job; returns its id. The worker (``python -m core worker``) runs it. A delegated
    operation needs an existing dataset: ``create`` makes an empty one first (an ingest job)."""
    import fiftyone.operators as foo

    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}: one of {', '.join(KINDS)}")
    store.get_dataset(dataset, create=create)  # a clear error when the dataset is missing
    res = foo.execute_operator(OPERATOR, {"dataset": dataset, "params": {"kind": kind, "args": args or {}},
                                          "request_delegation": True})
    if res.error:
        raise JobError(f"could not queue the {kind} job: {res.error_message or res.error}")
    job_id = str(res.result["id"])
    record_job(job_id, dataset, kind, args or {})
    log.info("queued %s job %s on %s", kind, job_id, dataset)
    return job_id


def record_job(job_id: str, dataset: str, kind: str, args: dict[str, Any], **started: Any) -> None:
    """Write Vigil's record of a job idempotently: the submitter and the worker both call it and
    either may come first (a fast worker starts the job before :func:`submit` returns), so it is
    an upsert that never clobbers what the other side wrote (its cancel flag, its history)."""
    _jobs().update_one({"_id": job_id},
                       {"$set": {"dataset": dataset, "kind": kind, "args": args, **started},
                        "$setOnInsert": {"submitted_at": _now(), "cancel": False, "history": []}},
                       upsert=True)


def _service():
    import fiftyone.operators.delegated as food

    return food.DelegatedOperationService()


def _state(op, rec: dict) -> str:
    state = str(op.run_state)
    if state == "failed" and rec.get("cancel"):
        return "cancelled"
    return state


def _as_dict(op, rec: dict) -> dict[str, Any]:
    status = op.status
    result = op.result
    error = None
    if result is not None:
        error = getattr(result, "error", None) if not isinstance(result, dict) else result.get("error")
    output = None
    if result is not None:
        output = getattr(result, "result", None) if not isinstance(result, dict) else result.get("result")
    return {
        "id": str(op.id),
        "kind": rec.get("kind") or (op.context.params or {}).get("kind"),
        "dataset": rec.get("dataset"),
        "state": _state(op, rec),
        "progress": getattr(status, "progress", None) if status else None,
        "label": getattr(status, "label", None) if status else None,
        "queued_at": op.queued_at,
        "started_at": op.started_at,
        "finished_at": op.completed_at or op.failed_at,
        "error": _short_error(error),
        "result": output,
        "details": rec.get("details", {}),
        "history": rec.get("history", []),
        "args": rec.get("args", {}),
    }


def _short_error(error: str | None) -> str | None:
    """The last line of a traceback is what an operator needs; the log keeps the rest."""
    if not error:
        return None
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None


def get(job_id: str) -> dict[str, Any]:
    reconcile()
    op = _service().get(_oid(job_id))
    if op is None:
        raise JobError(f"no job {job_id}")
    return _as_dict(op, _jobs().find_one({"_id": job_id}) or {})


def list_jobs(dataset: str | None = None, kind: str | tuple[str, ...] | None = None,
              limit: int = 20) -> list[dict[str, Any]]:
    """Newest first; ``kind``: one kind or a tuple of them."""
    reconcile()
    q: dict[str, Any] = {}
    if dataset:
        q["dataset"] = dataset
    if kind:
        q["kind"] = {"$in": list(kind)} if isinstance(kind, tuple) else kind
    recs = list(_jobs().find(q).sort("submitted_at", -1).limit(limit))
    svc = _service()
    out = []
    for rec in recs:
        op = svc.get(_oid(rec["_id"]))
        if op is not None:
            out.append(_as_dict(op, rec))
    return out


def cancel(job_id: str) -> None:
    """Ask a job to stop; a queued job is failed at once so the worker never starts it."""
    from fiftyone.operators.executor import ExecutionResult

    _jobs().update_one({"_id": job_id}, {"$set": {"cancel": True}})
    op = _service().get(_oid(job_id))
    if op is not None and str(op.run_state) in ("queued", "scheduled"):
        _service().set_failed(_oid(job_id), result=ExecutionResult(error="cancelled by operator"))


def log_tail(job_id: str, lines: int = 40) -> str:
    p = log_path(job_id)
    if not p.exists():
        return ""
    return "\n".join(p.read_text(errors="replace").splitlines()[-lines:])


def wait(job_id: str, timeout: float = 600, poll: float = 0.5) -> dict[str, Any]:
    """Block until the job ends (for the CLI and tests)."""
    end = time.time() + timeout
    while time.time() < end:
        j = get(job_id)
        if j["state"] in ("completed", "failed", "cancelled"):
            return j
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still {j['state']} after {timeout:.0f} s")


def _oid(job_id: str):
    from bson import ObjectId

    return ObjectId(job_id)


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _alive(pid: int | None, host: str | None, started: float | None = None) -> bool:
    """Whether the job's process still runs: its pid exists, is no zombie and, when its start
    time was recorded, started then (a pid the system reused for another process is not it)."""
    import psutil

    if not pid or host != socket.gethostname():
        return True  # another machine's worker: not ours to judge
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(p.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False


SHARD_SILENCE_S = 180  # a shard on another machine that reported nothing for this long is dead


def _silent_shard(rec: dict) -> bool:
    """A shard job on another machine (its pid cannot be checked from here) whose last progress
    (``beat``) or start is older than :data:`SHARD_SILENCE_S`: its worker is gone."""
    if rec.get("kind") != "embed_shard" or rec.get("host") in (None, socket.gethostname()):
        return False
    last = rec.get("beat") or rec.get("started_at")
    if last is None:
        return False
    if last.tzinfo is None:
        last = last.replace(tzinfo=timezone.utc)
    return (_now() - last).total_seconds() > SHARD_SILENCE_S


def reconcile() -> int:
    """Mark running jobs whose process died as failed, with their log tail. Returns how many."""
    from fiftyone.operators.executor import ExecutionResult, ExecutionRunState

    svc = _service()
    n = 0
    for op in svc.get_running_operations():
        rec = _jobs().find_one({"_id": str(op.id)})
        if rec is None or "pid" not in rec:
            continue
        if _alive(rec.get("pid"), rec.get("host"), rec.get("pid_started")) and not _silent_shard(rec):
            continue
        msg = (f"the job's process {rec.get('pid')} died while the job was running (killed or out of "
               f"memory; its pid may now belong to another process); its log: {log_path(str(op.id))}")
        if _silent_shard(rec):
            msg = (f"the shard's worker on {rec.get('host')} reported nothing for over {SHARD_SILENCE_S} s: "
                   f"taken as died, the shard goes to another worker; its log there: {log_path(str(op.id))}")
        if svc.set_failed(op.id, result=ExecutionResult(error=msg), required_state=ExecutionRunState.RUNNING):
            log.warning("job %s: %s", op.id, msg.splitlines()[0])
            n += 1
    retry_failed_shards()
    return n


# ------------------------------------------------------------------ embedding spread over workers

def create_run(dataset: str, version: str, shards: list[list[str]]) -> str:
    """Queue one ``embed_shard`` job per list of sample ids; any running worker (on this machine
    or another against the same MongoDB) takes the next one. Returns the run's id."""
    run_id = uuid.uuid4().hex[:12]
    store.db()[RUNS].insert_one({"_id": run_id, "dataset": dataset, "version": version, "n": len(shards),
                                 "done": [], "embedded": False, "finished": False, "created_at": _now(),
                                 "attempts": {str(i): 1 for i in range(len(shards))}})
    for i, ids in enumerate(shards):
        submit(dataset, "embed_shard", {"run": run_id, "shard": i, "of": len(shards), "ids": ids,
                                        "version": version, "attempt": 1})
    return run_id


def run_status(run_id: str) -> dict[str, Any]:
    """A spread embedding's record: ``n`` shards, ``done`` (their indices), ``embedded`` (all
    shards are), ``finished`` (and the last one laid out the map and updated the index)."""
    rec = store.db()[RUNS].find_one({"_id": run_id})
    if rec is None:
        raise JobError(f"no embedding run {run_id}")
    return rec


def shard_done(run_id: str, shard: int) -> bool:
    """Record shard ``shard`` of ``run_id`` as embedded; True for exactly one caller: the one
    whose shard completed the embedding (it then does what follows it and calls :func:`finish_run`)."""
    from pymongo import ReturnDocument

    coll = store.db()[RUNS]
    rec = coll.find_one_and_update({"_id": run_id}, {"$addToSet": {"done": shard}},
                                   return_document=ReturnDocument.AFTER)
    if rec is None or len(rec["done"]) < rec["n"]:
        return False
    return coll.update_one({"_id": run_id, "embedded": False},
                           {"$set": {"embedded": True, "embedded_at": _now()}}).modified_count == 1


def finish_run(run_id: str) -> None:
    """The run's last shard did what follows the embedding: the run is finished."""
    store.db()[RUNS].update_one({"_id": run_id}, {"$set": {"finished": True, "finished_at": _now()}})


def retry_failed_shards() -> int:
    """Queue again each shard of an unfinished run whose last attempt failed without being
    cancelled (its worker died, or the job failed), up to :data:`SHARD_ATTEMPTS` in all. The
    attempt count is claimed by compare-and-set, so two sweeping processes queue it once."""
    from fiftyone.operators.executor import ExecutionRunState

    svc, n = _service(), 0
    for run in store.db()[RUNS].find({"finished": False}):
        for i in set(range(run["n"])) - set(run["done"]):
            attempt = int(run["attempts"].get(str(i), 1))
            rec = _jobs().find_one({"kind": "embed_shard", "args.run": run["_id"], "args.shard": i,
                                    "args.attempt": attempt})
            op = svc.get(_oid(rec["_id"])) if rec else None
            if op is None or op.run_state != ExecutionRunState.FAILED or rec.get("cancel"):
                continue
            if attempt >= SHARD_ATTEMPTS:
                continue  # the run stays unfinished; its shard's jobs say why
            won = store.db()[RUNS].update_one({"_id": run["_id"], f"attempts.{i}": attempt},
                                              {"$set": {f"attempts.{i}": attempt + 1}}).modified_count
            if won:
                submit(run["dataset"], "embed_shard", {**rec["args"], "attempt": attempt + 1})
                log.warning("embedding run %s: shard %d failed (attempt %d), queued again", run["_id"], i, attempt)
                n += 1
    return n


# ------------------------------------------------------------------ what a running job reports

class Reporter:
    """What a task sees of its job: progress with details, cancellation, a logger."""

    def __init__(self, job_id: str, ctx=None, min_interval: float = 0.5):
        self.job_id = job_id
        self.ctx = ctx
        self.min_interval = min_interval
        self._last = 0.0
        self.started = time.time()
        self.log = logging.getLogger(f"vigil.job.{job_id}")

    def progress(self, fraction: float, label: str = "", force: bool = False, **details: Any) -> None:
        """Report progress 0..1 with a label; ``details`` (step, loss, metrics...) are kept and a
        ``step`` detail is appended to the job's history (for loss curves)."""
        now = time.time()
        fraction = max(0.0, min(1.0, float(fraction)))
        if fraction > 0:
            details.setdefault("eta_s", round((now - self.started) * (1 - fraction) / fraction, 1))
        update: dict[str, Any] = {"$set": {"details": details, "progress": fraction, "label": label,
                                           "beat": _now()}}
        if "step" in details:
            update["$push"] = {"history": {"$each": [details], "$slice": -2000}}
        if not force and now - self._last < self.min_interval and "step" not in details:
            return
        self._last = now
        _jobs().update_one({"_id": self.job_id}, update)
        if self.ctx is not None:
            self.ctx.set_progress(progress=fraction, label=label)
        self.log.info("%.0f%% %s %s", 100 * fraction, label, {k: v for k, v in details.items() if k != "metrics"})

    def span(self, lo: float = 0.0, hi: float = 1.0, label: str = "", counts: bool = True,
             check_every: float = 0.25) -> Callable[[float, float, str], None]:
        """The one adapter from core's ``progress(done, total, msg)`` callbacks to this job: the
        work fills [``lo``, ``hi``] of the job's bar, labelled "label done/total msg" (no count
        with ``counts`` False), and the callback raises :class:`JobCancelled` once the operator
        cancelled: at every step of a coarse progress (20 steps or fewer), else at most every
        ``check_every`` seconds; never at the end (``done == total``: the work is written,
        nothing is left to stop)."""
        last = [0.0]

        def cb(done: float, total: float, msg: str = "") -> None:
            now = time.monotonic()
            if done < total and (total <= 20 or now - last[0] >= check_every):
                last[0] = now
                self.check()
            count = f"{done}/{total}" if counts and total else ""
            f = done / total if total else 0.0
            self.progress(lo + (hi - lo) * f, " ".join(x for x in (label, count, str(msg)) if x))
        return cb

    def should_stop(self) -> bool:
        rec = _jobs().find_one({"_id": self.job_id}, {"cancel": 1})
        return bool(rec and rec.get("cancel"))

    def check(self) -> None:
        if self.should_stop():
            raise JobCancelled("cancelled by operator")


def execute_queued(limit: int = 1) -> None:
    """Run up to ``limit`` queued jobs, each in a monitored child process (what ``fiftyone
    delegated launch --monitor`` does once)."""
    _service().execute_queued_operations(limit=limit, log=True, monitor=True, check_interval_seconds=2)
