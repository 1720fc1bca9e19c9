"""Leases: handing queue items to sessions (one per-sample lease, so two sessions never hold
the same sample), heartbeats, giving items back and closing them once decided."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from core.data import store
from core.services.labeling.base import (ITEMS, LABEL_FIELDS, LEASES, LabelingError, _aware, _coll, _ensure, _now, _oid, _samples, _state, _token)
from core.services.labeling.queue import (QueueSpec, _decided, _refill, _refill_in_background, build_queue, queue_counts, queue_spec)
from core.services.labeling.schema import label_schema


@dataclass
class Item:
    """A queue item leased to one session. ``token``: the sample's label state when it was
    served (pass to :func:`decide` as ``expected_version``); ``current``: its label values now."""

    sample_id: str
    queue: str
    rank: int
    batch: int
    score: float
    reason: str
    strategy: str
    lease_until: datetime
    token: str
    current: dict[str, Any]
    filepath: str
    camera: str | None = None
    kind: str | None = None
    tracklet: str | None = None
    low_light: bool | None = None
    brightness: float | None = None

    @property
    def identity(self) -> str | None:
        return self.current.get("identity")

    @property
    def label(self) -> str | None:
        return self.current.get("label")


def _claim_sample(name: str, sample_id: str, session_id: str, until: datetime) -> bool:
    """Atomically take (or renew) the per-sample lease; False when another session holds it."""
    now = _now()
    return store.upsert_if(
        _coll(LEASES),
        {"_id": f"{name}|{sample_id}", "$or": [{"session": session_id}, {"until": {"$lt": now}}]},
        {"$set": {"dataset": name, "sample_id": sample_id, "session": session_id, "until": until}})


def _make_item(name: str, doc: dict[str, Any], token: str) -> Item | None:
    coll, _ = store.sample_collection(name)
    s = coll.find_one({"_id": _oid(doc["sample_id"])})
    if s is None:
        return None
    return Item(sample_id=doc["sample_id"], queue=doc["queue"], rank=int(doc.get("rank", 0)),
                batch=int(doc.get("batch", 0)), score=float(doc.get("score") or 0.0),
                reason=doc.get("reason", ""), strategy=doc.get("strategy", ""),
                lease_until=_aware(doc["lease_until"]), token=token, current=_state(s),
                filepath=s.get("filepath"), camera=s.get("camera"), kind=s.get("kind"),
                tracklet=s.get("tracklet"), low_light=s.get("low_light"), brightness=s.get("brightness"))


def next_item(name: str, session_id: str, lease_s: float = 120, queue: str | QueueSpec | None = None,
              refill: bool = True) -> Item | None:
    """Lease the next queue item to ``session_id`` (its current one while that lease holds).

    ``queue``: a spec or a queue key (None: the default strategy's identity queue; built when
    missing). An item is handed out only when both its queue document (find_one_and_update on
    pending or expired items, best rank first) and the per-sample lease are taken atomically, so
    two sessions never hold the same sample. Samples decided meanwhile (elsewhere) are closed and
    skipped. With ``refill``: a background refill starts when few items are left, and an empty
    queue is recomputed synchronously. Returns None when nothing is left to label."""
    _ensure(name)
    if isinstance(queue, QueueSpec):
        spec = queue
        if queue_spec(name, spec.key) is None:
            build_queue(name, spec=spec)
    else:
        key = queue or QueueSpec(mode=label_schema(name).mode).key
        spec = queue_spec(name, key)
        if spec is None:
            if queue is not None:
                raise LabelingError(f"no queue {key!r} in {name!r}: build it first")
            spec = build_queue(name)
    key = spec.key
    items = _coll(ITEMS)
    now = _now()
    until = now + timedelta(seconds=lease_s)
    mine = items.find_one({"dataset": name, "queue": key, "status": "leased", "leased_by": session_id,
                           "lease_until": {"$gte": now}}, sort=[("batch", 1), ("rank", 1)])
    if mine is not None:
        if _claim_sample(name, mine["sample_id"], session_id, until):
            items.update_one({"_id": mine["_id"]}, {"$set": {"lease_until": until}})
            mine["lease_until"] = until
            it = _make_item(name, mine, mine.get("served_token") or "")
            if it is not None:
                return it
        else:  # lost to another session (through another queue): mirror its lease
            other = _coll(LEASES).find_one({"_id": f"{name}|{mine['sample_id']}"}) or {}
            items.update_one({"_id": mine["_id"], "leased_by": session_id},
                             {"$set": {"leased_by": other.get("session"), "lease_until": other.get("until", now)}})
    coll, _ = _samples(name)
    for attempt in range(2):
        for _ in range(500):
            now = _now()
            doc = items.find_one_and_update(
                {"dataset": name, "queue": key,
                 "$or": [{"status": "pending"}, {"status": "leased", "lease_until": {"$lt": now}}]},
                {"$set": {"status": "leased", "leased_by": session_id, "lease_until": until,
                          "served_at": now}, "$push": {"served_to": session_id}},
                sort=[("batch", 1), ("rank", 1)], return_document=True)
            if doc is None:
                break
            sid = doc["sample_id"]
            if not _claim_sample(name, sid, session_id, until):  # held through another queue
                other = _coll(LEASES).find_one({"_id": f"{name}|{sid}"}) or {}
                items.update_one({"_id": doc["_id"], "leased_by": session_id},
                                 {"$set": {"leased_by": other.get("session"), "lease_until": other.get("until", until)},
                                  "$pop": {"served_to": 1}})
                continue
            raw = coll.find_one({"_id": _oid(sid)}, {f: 1 for f in (*LABEL_FIELDS, "tags", spec.target)})
            if raw is None or _decided(spec.mode, raw.get(spec.target), raw.get("labelled_by")):
                items.update_one({"_id": doc["_id"]}, {"$set": {"status": "done", "note": "decided elsewhere"}})
                _coll(LEASES).delete_one({"_id": f"{name}|{sid}", "session": session_id})
                continue
            token = _token(_state(raw))
            items.update_one({"_id": doc["_id"]}, {"$set": {"served_token": token}})
            if refill and queue_counts(name, key)["pending"] < spec.refill_below:
                _refill_in_background(name, key)
            return _make_item(name, doc, token)
        if not refill or attempt:
            return None
        _refill(name, key, force=True)
    return None


def renew(name: str, session_id: str, sample_id: str, lease_s: float = 120) -> bool:
    """Heartbeat: extend this session's lease on ``sample_id``. False when the lease was lost
    (it expired and another session took the sample)."""
    until = _now() + timedelta(seconds=lease_s)
    if not _claim_sample(name, sample_id, session_id, until):
        return False
    _coll(ITEMS).update_many({"dataset": name, "sample_id": sample_id, "status": "leased", "leased_by": session_id},
                             {"$set": {"lease_until": until}})
    return True


def release(name: str, session_id: str, sample_id: str | None = None) -> int:
    """Give this session's leases back (one sample, or all): the items become pending again."""
    f: dict[str, Any] = {"dataset": name, "session": session_id}
    q: dict[str, Any] = {"dataset": name, "status": "leased", "leased_by": session_id}
    if sample_id is not None:
        f["sample_id"] = q["sample_id"] = sample_id
    _coll(LEASES).delete_many(f)
    return _coll(ITEMS).update_many(q, {"$set": {"status": "pending", "leased_by": None, "lease_until": None}}).modified_count


def _close_item(name: str, sample_id: str, session_id: str, status: str) -> None:
    """Mark the sample's open queue items done / skipped and drop this session's lease. Items
    another session holds stay with it: that tab keeps showing the sample and learns of the
    change when it decides (a conflict) or when its lease ends (closed as decided elsewhere)."""
    _coll(ITEMS).update_many({"dataset": name, "sample_id": sample_id,
                              "$or": [{"status": "pending"}, {"status": "leased", "leased_by": session_id},
                                      {"status": "leased", "lease_until": {"$lt": _now()}}]},
                             {"$set": {"status": status, "closed_by": session_id, "closed_at": _now()}})
    _coll(LEASES).delete_one({"_id": f"{name}|{sample_id}", "session": session_id})
