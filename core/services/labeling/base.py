"""What every part of the labelling loop shares: collection names, the label fields, the errors,
the database plumbing (collections, the dataset with its fields and indexes declared, ids, time)
and a sample's label state with the token and compare-and-set filter decisions are checked by."""
from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from core.math.conditions import CONDITION_TAGS
from core.data import store

QUEUES, ITEMS, LEASES, DECISIONS, COUNTERS, PAIRS = (
    "vigil_queues", "vigil_queue", "vigil_leases", "vigil_decisions", "vigil_counters", "vigil_pairs")
TO_LABEL = "to-label"  # tag the Map page puts on samples it sends to the queue (served first)

LABEL_FIELDS = ("label", "identity", "behaviour", "attributes", "labelled_by", "labelled_at",
                "label_round", "label_version")
_EXTRA_FIELDS = {  # sample fields the labelling loop writes (declared so FiftyOne shows them)
    "behaviour": "StringField", "attributes": "DictField", "labelled_by": "StringField",
    "labelled_at": "StringField", "label_round": "IntField", "label_version": "IntField",
    "flagged": "BooleanField", "flag_reason": "StringField",
    # written by the identity graph (core.services.labeling.identity): the name it wrote, what was there before
    "graph_identity": "StringField", "identity_base": "StringField",
}


class LabelingError(RuntimeError):
    """A labelling request that cannot be done, with what to do about it."""


class LabelConflict(LabelingError):
    """The sample changed since it was served. ``mine``: the values this decision would write;
    ``theirs``: the sample's current label values (with ``labelled_by``/``labelled_at``);
    ``token``: the current state, pass it as ``expected_version`` to overwrite knowingly."""

    def __init__(self, sample_id: str, mine: dict[str, Any], theirs: dict[str, Any], token: str):
        self.sample_id, self.mine, self.theirs, self.token = sample_id, mine, theirs, token
        who = theirs.get("labelled_by") or "someone"
        super().__init__(f"sample {sample_id} was changed by {who} since it was served: "
                         f"theirs {describe(theirs)}, yours {describe(mine)}")


def describe(d: dict[str, Any]) -> str:
    """One line of the label values that are set (for messages)."""
    keys = ("label", "identity", "behaviour", "tags", "attributes")
    return ", ".join(f"{k}={d[k]!r}" for k in keys if d.get(k) not in (None, [], {}))


# --------------------------------------------------------------------------------------------
# plumbing
# --------------------------------------------------------------------------------------------

def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(t: datetime | None) -> datetime | None:
    """pymongo returns naive UTC datetimes unless the client is tz-aware."""
    if t is not None and t.tzinfo is None:
        return t.replace(tzinfo=timezone.utc)
    return t


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def _coll(name: str):
    return store.db()[name]


_ENSURED: set[tuple[str, str]] = set()
_ENSURE_LOCK = threading.Lock()


def _ensure(name: str):
    """The dataset with the labelling loop's sample fields and collection indexes declared (once per
    process and dataset). Returns the FiftyOne dataset."""
    ds = store.get_dataset(name)
    key = (name, store.sample_collection(name)[1])
    if key in _ENSURED:
        return ds
    with _ENSURE_LOCK:
        store.declare_fields(ds, _EXTRA_FIELDS)
        db = store.db()
        db[ITEMS].create_index([("dataset", 1), ("queue", 1), ("status", 1), ("batch", 1), ("rank", 1)])
        db[ITEMS].create_index([("dataset", 1), ("sample_id", 1)])
        db[LEASES].create_index([("dataset", 1), ("session", 1)])
        db[DECISIONS].create_index([("dataset", 1), ("session_id", 1), ("seq", -1)])
        db[DECISIONS].create_index([("dataset", 1), ("at", 1)])
        db[DECISIONS].create_index([("dataset", 1), ("bulk", 1)])
        _ENSURED.add(key)
    return ds


def _samples(name: str):
    """The pymongo collection of the dataset's samples (compare-and-set writes need it)."""
    ds = _ensure(name)
    return store.sample_collection(name)[0], ds


def _oid(sample_id: str):
    return store.object_id(sample_id)


def _log(doc: dict[str, Any]) -> str:
    """Append one entry to the decision log; returns its id."""
    doc.setdefault("_id", uuid.uuid4().hex)
    doc.setdefault("seq", _seq())
    doc.setdefault("undone", False)
    _coll(DECISIONS).insert_one(doc)
    return doc["_id"]


def _seq() -> int:
    """A monotonic sort key for decisions (ns since epoch; unique enough per session)."""
    return time.time_ns()


# --------------------------------------------------------------------------------------------
# label state, tokens
# --------------------------------------------------------------------------------------------

def _state(doc: dict[str, Any] | None) -> dict[str, Any]:
    """The label values of a raw sample document (condition tags only for ``tags``)."""
    doc = doc or {}
    out = {f: doc.get(f) for f in LABEL_FIELDS}
    out["tags"] = sorted(t for t in (doc.get("tags") or []) if t in CONDITION_TAGS)
    return out


def _token(state: dict[str, Any]) -> str:
    """Hash of the label values (not ``label_version``: a change undone is no change)."""
    payload = json.dumps({k: state.get(k) for k in (*LABEL_FIELDS, "tags") if k != "label_version"},
                         sort_keys=True, default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def _read(coll, sample_id: str) -> dict[str, Any]:
    doc = coll.find_one({"_id": _oid(sample_id)}, {f: 1 for f in (*LABEL_FIELDS, "tags")})
    if doc is None:
        raise LabelingError(f"sample {sample_id} is not in the dataset (deleted?)")
    return doc


def sample_state(name: str, sample_id: str) -> tuple[dict[str, Any], str]:
    """(label values, token) of a sample now."""
    coll, _ = _samples(name)
    st = _state(_read(coll, sample_id))
    return st, _token(st)


def _cas_filter(sample_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    """Match the sample only while every label field (and the full tag list) is as in ``doc``."""
    f: dict[str, Any] = {"_id": _oid(sample_id)}
    for k in LABEL_FIELDS:
        f[k] = doc.get(k)
    tags = doc.get("tags")
    f["tags"] = tags if tags else {"$in": [None, []]}
    return f
