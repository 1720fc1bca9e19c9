"""The labelling loop's side effects: label schema, the queue with leases, decisions with
optimistic concurrency and undo, identity helpers, progress statistics and tracklet context.

Everything goes through :func:`core.store.get_dataset` and :func:`core.store.db` (pymongo);
the selection math is :mod:`core.strategies`.

Collections (one document per item, all keyed by dataset):

``vigil_queues``     one spec per queue (strategy, target, mode, view, batch counter, refill lock)
``vigil_queue``      the queue items: ``status`` pending | leased | done | skipped, ``leased_by``,
                     ``lease_until``, ``served_to`` (every session it was handed to),
                     ``served_token`` (the sample's label state when it was served)
``vigil_leases``     one lease per *sample* (``_id`` "dataset|sample_id"), so two sessions never
                     hold the same sample even when they work on different queues
``vigil_decisions``  append-only log: who, when, before and after values, the model's
                     prediction and whether it agreed, undone flags; a bulk decision (Map page)
                     is one "bulk" entry plus one "bulk_item" entry per sample it changed
``vigil_counters``   atomic counters (fresh identity names)

What "labelled" means (``mode``): ``"verify"`` (default) counts only human decisions
(``labelled_by`` set): identities that arrive with MOT / re-ID data are shown as unverified
suggestions the operator confirms with one click. ``"trust"`` also counts ingested values of the
target field as labels, so only samples without one are queued.

Concurrency: a decision is a compare-and-set on the sample document. Each item carries a token
(a hash of the sample's label fields when it was served); :func:`decide` writes only when the
sample still has that state and otherwise raises :class:`LabelConflict` with both values, so a
decision is never overwritten silently. Bulk decisions (:func:`bulk_decide`, the Map page) go
through the same compare-and-set and bump ``label_version`` too.

Refill: when a lease leaves fewer than ``refill_below`` unserved items, a daemon thread in the
serving process recomputes the next batch (one process at a time, guarded by a lock in the spec
document); when the queue is empty, :func:`next_item` recomputes synchronously.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Sequence

import numpy as np

from core import store, strategies

log = logging.getLogger(__name__)

QUEUES, ITEMS, LEASES, DECISIONS, COUNTERS = (
    "vigil_queues", "vigil_queue", "vigil_leases", "vigil_decisions", "vigil_counters")

DEFAULT_CLASSES = ("person", "vehicle", "animal", "shadow/noise", "other")
DEFAULT_BEHAVIOURS = ("walking", "loitering", "running", "other")
CONDITION_TAGS = ("night", "shadow", "occluded", "blur")
DEFAULT_ATTRIBUTES: dict[str, list[str]] = {"access": ["authorised", "intruder"], "clothing": []}
MODES = ("verify", "trust")
TO_LABEL = "to-label"  # tag the Map page puts on samples it sends to the queue (served first)
TARGETS = ("identity", "label")

LABEL_FIELDS = ("label", "identity", "behaviour", "attributes", "labelled_by", "labelled_at",
                "label_round", "label_version")
_EXTRA_FIELDS = {  # sample fields this module writes (declared so FiftyOne shows them)
    "behaviour": "StringField", "attributes": "DictField", "labelled_by": "StringField",
    "labelled_at": "StringField", "label_round": "IntField", "label_version": "IntField",
    "flagged": "BooleanField", "flag_reason": "StringField",
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
    """The dataset with this module's sample fields and collection indexes declared (once per
    process and dataset). Returns the FiftyOne dataset."""
    import fiftyone as fo

    ds = store.get_dataset(name)
    key = (name, str(ds._doc.id))
    if key in _ENSURED:
        return ds
    with _ENSURE_LOCK:
        schema = ds.get_field_schema()
        for f, ftype in _EXTRA_FIELDS.items():
            if f not in schema:
                try:
                    ds.add_sample_field(f, getattr(fo, ftype))
                except ValueError:  # another process added it meanwhile
                    ds.reload()
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
    return store.db()[ds._sample_collection_name], ds


def _oid(sample_id: str):
    from bson import ObjectId

    return ObjectId(sample_id)


def _seq() -> int:
    """A monotonic sort key for decisions (ns since epoch; unique enough per session)."""
    return time.time_ns()


# --------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------

@dataclass
class LabelSchema:
    """What an operator can decide. ``attributes``: name -> allowed values (empty: free text)."""

    classes: list[str] = field(default_factory=lambda: list(DEFAULT_CLASSES))
    behaviours: list[str] = field(default_factory=lambda: list(DEFAULT_BEHAVIOURS))
    conditions: list[str] = field(default_factory=lambda: list(CONDITION_TAGS))
    attributes: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_ATTRIBUTES.items()})
    mode: str = "verify"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LabelSchema":
        d = dict(d or {})
        known = {k: d[k] for k in ("classes", "behaviours", "conditions", "attributes", "mode") if k in d}
        s = cls(**known)
        s.validate()
        return s

    def validate(self) -> None:
        if not self.classes:
            raise LabelingError("the label schema needs at least one class")
        if self.mode not in MODES:
            raise LabelingError(f"mode must be one of {MODES}, not {self.mode!r}")
        for name, vals in self.attributes.items():
            if not isinstance(vals, list):
                raise LabelingError(f"attribute {name!r}: allowed values must be a list (empty for free text)")


def label_schema(name: str) -> LabelSchema:
    """The dataset's schema (its ``label_schema`` state), defaults where unset."""
    return LabelSchema.from_dict(store.state(name).get("label_schema"))


def set_label_schema(name: str, schema: LabelSchema | dict[str, Any]) -> LabelSchema:
    s = schema if isinstance(schema, LabelSchema) else LabelSchema.from_dict(schema)
    s.validate()
    store.set_state(name, "label_schema", asdict(s))
    return s


def current_round(name: str) -> int:
    """The labelling round: the round of the active model version (0 for "base" / unknown).
    Labels made while round r's model is active feed round r + 1."""
    version = store.active_model(name)
    if not version:
        return 0
    rec = store.db()["vigil_models"].find_one({"dataset": name, "version": version}, {"round": 1})
    return int((rec or {}).get("round") or 0)


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


# --------------------------------------------------------------------------------------------
# queue
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QueueSpec:
    """How a queue is computed. ``target``: the field labelled ("identity" or "label");
    ``mode``: "verify" | "trust" (see the module doc); ``view_ids``: restrict candidates to
    these samples (None: the whole dataset); ``refill_below``: recompute when fewer unserved
    items are left."""

    strategy: str = strategies.DEFAULT_STRATEGY
    k: int = 20
    target: str = "identity"
    mode: str = "verify"
    boost_conditions: bool = True
    seed: int = 0
    view_ids: tuple[str, ...] | None = None
    refill_below: int = 5

    @property
    def key(self) -> str:
        view = "all" if self.view_ids is None else \
            "v" + hashlib.sha1(",".join(sorted(self.view_ids)).encode()).hexdigest()[:10]
        return f"{self.target}/{self.mode}/{self.strategy}/{'boost' if self.boost_conditions else 'plain'}/{view}"

    def validate(self) -> None:
        if self.strategy not in strategies.STRATEGIES:
            raise LabelingError(f"unknown strategy {self.strategy!r}; choose from {sorted(strategies.STRATEGIES)}")
        if self.target not in TARGETS:
            raise LabelingError(f"target must be one of {TARGETS}, not {self.target!r}")
        if self.mode not in MODES:
            raise LabelingError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.k < 1:
            raise LabelingError("k must be at least 1")

    def to_doc(self) -> dict[str, Any]:
        d = asdict(self)
        d["view_ids"] = list(self.view_ids) if self.view_ids is not None else None
        return d

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> "QueueSpec":
        kw = {k: d[k] for k in ("strategy", "k", "target", "mode", "boost_conditions", "seed", "refill_below") if k in d}
        v = d.get("view_ids")
        return cls(**kw, view_ids=tuple(v) if v is not None else None)


@dataclass
class BatchRow:
    rank: int
    sample_id: str
    score: float
    reason: str
    identity: str | None
    label: str | None
    camera: str | None
    filepath: str


@dataclass
class Batch:
    """One computed batch (not yet stored). ``strategy`` is the one that ran (after fallback)."""

    rows: list[BatchRow]
    strategy: str
    version: str
    n_labelled: int
    n_candidates: int


def embedding_status(name: str) -> dict[str, Any]:
    """{version, field, embedded, total}: how many samples have vectors of the active model."""
    ds = store.get_dataset(name)
    version = store.active_model(name)
    total = len(ds)
    if not version:
        return {"version": None, "field": None, "embedded": 0, "total": total}
    f = store.embedding_field(version)
    n = ds.exists(f).count() if f in ds.get_field_schema() else 0
    return {"version": version, "field": f, "embedded": n, "total": total}


def _load(name: str, fields: Sequence[str], labelled_only: str | None = None) -> dict[str, Any]:
    """ids, X float32 [N, D] (active model) and ``fields`` of every embedded sample.
    ``labelled_only``: "verify" keeps samples with ``labelled_by``; "trust" those with the
    target value or ``labelled_by`` (target passed through ``fields[0]``)."""
    from fiftyone import ViewField as F

    version = store.active_model(name)
    if not version:
        raise LabelingError(f"dataset {name!r} has no embeddings yet: embed it first (Map or Annotate page)")
    ds = store.get_dataset(name)
    ef = store.embedding_field(version)
    if ef not in ds.get_field_schema():
        raise LabelingError(f"dataset {name!r} has no embeddings of model {version!r}: embed it first")
    view = ds.exists(ef)
    if labelled_only == "verify":
        view = view.exists("labelled_by")
    elif labelled_only == "trust":
        view = view.match((F("labelled_by") != None) | (F(fields[0]) != None))  # noqa: E711
    fields = [f for f in fields if f in ds.get_field_schema() or f == "tags"]
    cols = ["id", ef, *fields]
    vals = view.values(cols)
    out = dict(zip(cols, vals))
    vecs = out.pop(ef)
    out["X"] = np.stack([np.asarray(v, np.float32) for v in vecs]) if vecs else np.zeros((0, 1), np.float32)
    out["version"] = version
    return out


def _decided(mode: str, target_value: Any, labelled_by: Any) -> bool:
    return labelled_by is not None or (mode == "trust" and target_value is not None)


def compute_batch(name: str, spec: QueueSpec, exclude: Iterable[str] = ()) -> Batch:
    """The next ``spec.k`` samples to label (nothing stored).

    Arrays handed to the strategy: labelled samples with a target value (its labels) plus the
    candidates (embedded, in the view, not decided, not in ``exclude``); decided samples without
    a target value (e.g. "shadow/noise" with no identity) and excluded ones are left out.
    The condition boost adds 1 for each of low light / night, shadow and operator flag."""
    spec.validate()
    data = _load(name, [spec.target, "labelled_by", "low_light", "tags", "flagged", "identity",
                        "label", "camera", "filepath"])
    ids, X = data["id"], data["X"]
    n = len(ids)
    get = lambda f: data.get(f) or [None] * n  # noqa: E731
    target, lab_by = get(spec.target), get("labelled_by")
    excl = set(exclude)
    view = set(spec.view_ids) if spec.view_ids is not None else None
    decided = np.array([_decided(spec.mode, t, b) for t, b in zip(target, lab_by)], dtype=bool)
    has_target = np.array([t is not None for t in target], dtype=bool)
    cand = ~decided & np.array([i not in excl and (view is None or i in view) for i in ids], dtype=bool)
    keep = np.flatnonzero((decided & has_target) | cand)
    labelled = decided[keep]
    labels = np.array([target[i] if decided[i] else None for i in keep], dtype=object)
    boost = None
    if spec.boost_conditions:
        tags = [set(t or ()) for t in get("tags")]
        b = (np.array([bool(v) for v in get("low_light")]) | np.array(["night" in t for t in tags])).astype(float)
        b += np.array(["shadow" in t for t in tags], float)
        b += np.array([bool(v) for v in get("flagged")], float)
        boost = b[keep]
    rng = np.random.default_rng(spec.seed)
    if len(keep) == 0 or not (~labelled).any():
        return Batch([], spec.strategy, data["version"], int(labelled.sum()), 0)
    sel = strategies.select(spec.strategy, X[keep], labelled, labels, spec.k, rng, boost=boost)
    picks = [(int(j), why) for j, why in zip(sel.indices, sel.reasons or [""] * len(sel.indices))]
    # samples sent from the Map page ("to-label" tag) go first, best score first
    sent = [j for j in np.flatnonzero(~labelled) if TO_LABEL in (get("tags")[keep[j]] or ())]
    if sent:
        sent = sorted(sent, key=lambda j: -np.nan_to_num(sel.scores[j], nan=-np.inf))[: spec.k]
        why = dict(picks)
        picks = [(j, "sent to the queue from the map" + (f"; {why[j]}" if why.get(j) else "")) for j in sent] + \
                [(j, w) for j, w in picks if j not in set(sent)]
        picks = picks[: spec.k]
    rows = []
    for r, (j, why) in enumerate(picks):
        i = int(keep[int(j)])
        rows.append(BatchRow(r, ids[i], float(np.nan_to_num(sel.scores[int(j)])), why, get("identity")[i],
                             get("label")[i], get("camera")[i], get("filepath")[i]))
    return Batch(rows, sel.strategy, data["version"], int(labelled.sum()), int((~labelled).sum()))


def _queued_ids(name: str, key: str) -> list[str]:
    """Samples of the queue that are still to be served, being served, or were skipped."""
    return [d["sample_id"] for d in _coll(ITEMS).find(
        {"dataset": name, "queue": key, "status": {"$in": ["pending", "leased", "skipped"]}}, {"sample_id": 1})]


def build_queue(name: str, strategy: str = strategies.DEFAULT_STRATEGY, k: int = 20,
                view_ids: Sequence[str] | None = None, boost_conditions: bool = True, seed: int = 0,
                target: str = "identity", mode: str | None = None, refill_below: int = 5,
                spec: QueueSpec | None = None) -> QueueSpec:
    """Compute the next batch with ``strategy`` on the active embeddings and append it to the
    queue ``spec.key`` (items already queued are left as they are). Returns the spec; its
    ``key`` names the queue for :func:`next_item`. ``mode`` None: the dataset schema's mode."""
    _ensure(name)
    if spec is None:
        spec = QueueSpec(strategy, int(k), target, mode or label_schema(name).mode, bool(boost_conditions),
                         int(seed), tuple(view_ids) if view_ids is not None else None, int(refill_below))
    spec.validate()
    meta = _coll(QUEUES).find_one_and_update(
        {"_id": f"{name}|{spec.key}"},
        {"$set": {"dataset": name, "key": spec.key, "spec": spec.to_doc(), "updated_at": _now()},
         "$inc": {"batches": 1}},
        upsert=True, return_document=True)
    batch_no = int(meta["batches"])
    run_spec = QueueSpec(**{**asdict(spec), "seed": spec.seed * 1_000_003 + batch_no,
                            "view_ids": spec.view_ids})
    batch = compute_batch(name, run_spec, exclude=_queued_ids(name, spec.key))
    now = _now()
    from pymongo import UpdateOne

    ops = [UpdateOne({"_id": f"{name}|{spec.key}|{r.sample_id}"},
                     {"$setOnInsert": {"dataset": name, "queue": spec.key, "sample_id": r.sample_id,
                                       "batch": batch_no, "rank": r.rank, "score": r.score,
                                       "reason": r.reason, "strategy": batch.strategy,
                                       "model": batch.version, "status": "pending", "leased_by": None,
                                       "lease_until": None, "served_to": [], "created_at": now}},
                     upsert=True) for r in batch.rows]
    if ops:
        _coll(ITEMS).bulk_write(ops, ordered=False)
    log.info("%s: queue %s batch %d: %d items (%s, %d labelled, %d candidates)", name, spec.key,
             batch_no, len(ops), batch.strategy, batch.n_labelled, batch.n_candidates)
    return spec


def queue_spec(name: str, key: str) -> QueueSpec | None:
    d = _coll(QUEUES).find_one({"_id": f"{name}|{key}"})
    return QueueSpec.from_doc(d["spec"]) if d else None


def queue_counts(name: str, key: str) -> dict[str, int]:
    """Items per status (pending / leased / done / skipped); expired leases count as pending."""
    out = {"pending": 0, "leased": 0, "done": 0, "skipped": 0}
    now = _now()
    for d in _coll(ITEMS).find({"dataset": name, "queue": key}, {"status": 1, "lease_until": 1}):
        s = d["status"]
        if s == "leased" and (_aware(d.get("lease_until")) or now) < now:
            s = "pending"
        out[s] = out.get(s, 0) + 1
    return out


def clear_queue(name: str, key: str | None = None, pending_only: bool = False) -> int:
    """Drop the queue's items and spec (all queues of the dataset when ``key`` is None). With
    ``pending_only`` only unserved items go (before a recompute): leased ones stay with their
    operators, and done / skipped ones keep their samples out of the next batch."""
    f: dict[str, Any] = {"dataset": name} if key is None else {"dataset": name, "queue": key}
    if pending_only:
        f["$or"] = [{"status": "pending"}, {"status": "leased", "lease_until": {"$lt": _now()}}]
        return _coll(ITEMS).delete_many(f).deleted_count
    n = _coll(ITEMS).delete_many(f).deleted_count
    _coll(QUEUES).delete_many({"dataset": name} if key is None else {"_id": f"{name}|{key}"})
    return n


def _refill(name: str, key: str, force: bool = False) -> bool:
    """Recompute the queue's next batch if no other process is doing it; True when it ran."""
    spec = queue_spec(name, key)
    if spec is None:
        return False
    now = _now()
    got = _coll(QUEUES).find_one_and_update(
        {"_id": f"{name}|{key}", "$or": [{"refilling_until": None}, {"refilling_until": {"$lt": now}}]},
        {"$set": {"refilling_until": now + timedelta(seconds=120)}})
    if got is None:
        return False
    try:
        if force or queue_counts(name, key)["pending"] < spec.refill_below:
            build_queue(name, spec=spec)
        return True
    finally:
        _coll(QUEUES).update_one({"_id": f"{name}|{key}"}, {"$set": {"refilling_until": None}})


_REFILLS: dict[tuple[str, str], threading.Thread] = {}


def _refill_in_background(name: str, key: str) -> None:
    t = _REFILLS.get((name, key))
    if t is not None and t.is_alive():
        return

    def run() -> None:
        try:
            _refill(name, key)
        except Exception:  # noqa: BLE001 - a background refill must never kill the server
            log.exception("background refill of %s / %s failed", name, key)

    t = threading.Thread(target=run, name=f"vigil-refill-{name}", daemon=True)
    _REFILLS[(name, key)] = t
    t.start()


def wait_for_refills(timeout: float = 30.0) -> None:
    """Join running background refills (tests, CLI)."""
    for t in list(_REFILLS.values()):
        t.join(timeout)


# --------------------------------------------------------------------------------------------
# leases
# --------------------------------------------------------------------------------------------

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
    from pymongo.errors import DuplicateKeyError

    now = _now()
    try:
        _coll(LEASES).find_one_and_update(
            {"_id": f"{name}|{sample_id}", "$or": [{"session": session_id}, {"until": {"$lt": now}}]},
            {"$set": {"dataset": name, "sample_id": sample_id, "session": session_id, "until": until}},
            upsert=True)
        return True
    except DuplicateKeyError:
        return False


def _make_item(name: str, doc: dict[str, Any], token: str) -> Item | None:
    ds = store.get_dataset(name)
    coll = store.db()[ds._sample_collection_name]
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


# --------------------------------------------------------------------------------------------
# predictions (model agreement, identity suggestions)
# --------------------------------------------------------------------------------------------

def _labelled_vectors(name: str, target: str, mode: str) -> tuple[list[str], np.ndarray, list[Any]]:
    data = _load(name, [target, "labelled_by"], labelled_only=mode)
    vals = data.get(target) or [None] * len(data["id"])
    keep = [i for i, v in enumerate(vals) if v is not None]
    return [data["id"][i] for i in keep], data["X"][keep] if keep else np.zeros((0, 1), np.float32), [vals[i] for i in keep]


def _vector(name: str, sample_id: str) -> np.ndarray | None:
    """The active model's vector of one sample (float32 [D]), None when it has none."""
    version = store.active_model(name)
    if not version:
        return None
    ds = store.get_dataset(name)
    ef = store.embedding_field(version)
    if ef not in ds.get_field_schema():
        return None
    vals = ds.select([sample_id]).values(ef)
    if not vals or vals[0] is None:
        return None
    return np.asarray(vals[0], np.float32)


def neighbours_by_value(name: str, sample_id: str, target: str = "identity", mode: str | None = None,
                        k: int = 5, n_neighbors: int = 15) -> list[dict[str, Any]]:
    """Distinct values of ``target`` among the ``n_neighbors`` nearest labelled samples (cosine,
    the sample itself excluded), closest first: [{value, distance, votes}] (at most ``k``)."""
    mode = mode or label_schema(name).mode
    x = _vector(name, sample_id)
    if x is None:
        return []
    ids, X, vals = _labelled_vectors(name, target, mode)
    keep = [i for i, s in enumerate(ids) if s != sample_id]
    if not keep:
        return []
    Xn = strategies.normalise(X[keep])
    sims = Xn @ strategies.normalise(x[None])[0]
    order = np.argsort(-sims, kind="stable")[:n_neighbors]
    best: dict[Any, dict[str, Any]] = {}
    for j in order:
        v = vals[keep[j]]
        d = float(1.0 - sims[j])
        e = best.setdefault(v, {"value": v, "distance": d, "votes": 0})
        e["votes"] += 1
    return sorted(best.values(), key=lambda e: e["distance"])[:k]


def suggest_identities(name: str, sample_id: str, k: int = 5, n_neighbors: int = 15) -> list[dict[str, Any]]:
    """Identities to offer first: the nearest labelled identities ([{identity, distance, votes,
    verified}], closest first). In "verify" mode, when fewer than ``k`` verified identities are
    near, ingested (unverified) ones fill the list."""
    mode = label_schema(name).mode
    out = [{"identity": e["value"], "distance": e["distance"], "votes": e["votes"], "verified": True}
           for e in neighbours_by_value(name, sample_id, "identity", mode, k, n_neighbors)]
    if mode == "verify" and len(out) < k:
        have = {e["identity"] for e in out}
        for e in neighbours_by_value(name, sample_id, "identity", "trust", k * 2, n_neighbors):
            if e["value"] not in have and len(out) < k:
                out.append({"identity": e["value"], "distance": e["distance"], "votes": e["votes"], "verified": False})
    return out


def similar_crops(name: str, sample_id: str, k: int = 8) -> list[dict[str, Any]]:
    """"More like this" on the Annotate page: the ``k`` crops most like ``sample_id`` under the
    active model, re-ranked by shared neighbours (core.embed.similar with ``rerank``), closest
    first: [{id, filepath, identity, camera, distance}]. Empty when the sample has no embedding."""
    from core import embed

    try:
        hits = embed.similar(name, sample_id, k=k, rerank=True)
    except embed.EmbedError:
        return []
    cols = store.view_columns(name, ["filepath", "identity", "camera"], [h[0] for h in hits])
    return [{"id": s, "filepath": f, "identity": i, "camera": c, "distance": d}
            for (s, d), f, i, c in zip(hits, cols["filepath"], cols["identity"], cols["camera"])]


def predict(name: str, sample_id: str, target: str = "identity", mode: str | None = None,
            n_neighbors: int = 5) -> Any:
    """The kNN prediction of ``target`` from previously labelled samples (similarity-weighted
    vote of the ``n_neighbors`` nearest); None without embeddings or labels."""
    mode = mode or label_schema(name).mode
    x = _vector(name, sample_id)
    if x is None:
        return None
    ids, X, vals = _labelled_vectors(name, target, mode)
    keep = [i for i, s in enumerate(ids) if s != sample_id]
    if not keep:
        return None
    sims = strategies.normalise(X[keep]) @ strategies.normalise(x[None])[0]
    order = np.argsort(-sims, kind="stable")[:n_neighbors]
    votes: Counter = Counter()
    for j in order:
        votes[vals[keep[j]]] += float(max(sims[j], 0.0) + 1e-6)
    return votes.most_common(1)[0][0]


# --------------------------------------------------------------------------------------------
# decisions
# --------------------------------------------------------------------------------------------

@dataclass
class Decision:
    id: str
    sample_id: str
    kind: str
    user: str
    session_id: str
    at: datetime
    before: dict[str, Any]
    after: dict[str, Any]
    predicted: Any = None
    model_agreed: bool | None = None
    not_restored: list[str] | None = None  # set by undo of a merge / bulk: samples changed since


def _log(doc: dict[str, Any]) -> str:
    doc.setdefault("_id", uuid.uuid4().hex)
    doc.setdefault("seq", _seq())
    doc.setdefault("undone", False)
    _coll(DECISIONS).insert_one(doc)
    return doc["_id"]


def _as_decision(d: dict[str, Any]) -> Decision:
    return Decision(d["_id"], d.get("sample_id"), d["kind"], d.get("user"), d.get("session_id"),
                    _aware(d["at"]), d.get("before") or {}, d.get("after") or {}, d.get("predicted"),
                    d.get("model_agreed"))


def decide(name: str, session_id: str, sample_id: str, user: str, label: str | None = None,
           identity: str | None = None, behaviour: str | None = None, tags_add: Iterable[str] = (),
           attributes: dict[str, Any] | None = None, skip: bool = False,
           expected_version: str | None = None, tags_remove: Iterable[str] = ()) -> Decision:
    """Write one decision to the sample at once and log it.

    Fields written: the given ones of label / identity / behaviour / attributes (merged into the
    existing dict), condition tags added / removed, ``labelled_by``, ``labelled_at`` (ISO UTC),
    ``label_round`` and ``label_version`` (+1). ``expected_version``: the item's token; when the
    sample's label state differs, :class:`LabelConflict` is raised and nothing is written. A
    ``skip`` writes nothing to the sample: it closes the item for this queue and is logged.
    The log entry holds before / after values and, for a label or identity decision on an
    embedded sample, the kNN prediction from previously labelled samples and ``model_agreed``."""
    coll, ds = _samples(name)
    schema = label_schema(name)
    tags_add, tags_remove = [t for t in tags_add if t], [t for t in tags_remove if t]
    bad = [t for t in (*tags_add, *tags_remove) if t not in CONDITION_TAGS and t not in schema.conditions]
    if bad:
        raise LabelingError(f"unknown condition tags {bad}; the schema allows {schema.conditions}")
    if label is not None and label not in schema.classes:
        raise LabelingError(f"unknown class {label!r}; the schema has {schema.classes}")
    at = _now()
    if skip:
        st_ = _state(_read(coll, sample_id))
        _close_item(name, sample_id, session_id, "skipped")
        did = _log({"dataset": name, "sample_id": sample_id, "kind": "skip", "user": user,
                    "session_id": session_id, "at": at, "before": st_, "after": st_, "token_after": _token(st_)})
        return Decision(did, sample_id, "skip", user, session_id, at, st_, st_)
    predicted = agreed = None
    target = "identity" if identity is not None else ("label" if label is not None else None)
    if target is not None:
        try:
            predicted = predict(name, sample_id, target, schema.mode)
        except LabelingError:
            predicted = None
        if predicted is not None:
            agreed = bool(predicted == (identity if target == "identity" else label))
    rnd = current_round(name)
    for _attempt in range(10):
        doc = _read(coll, sample_id)
        before = _state(doc)
        tok = _token(before)
        mine = dict(before)
        for k, v in (("label", label), ("identity", identity), ("behaviour", behaviour)):
            if v is not None:
                mine[k] = v
        if attributes:
            mine["attributes"] = {**(before.get("attributes") or {}), **attributes}
        mine["tags"] = sorted((set(before["tags"]) | set(tags_add)) - set(tags_remove))
        if expected_version is not None and tok != expected_version:
            raise LabelConflict(sample_id, mine, before, tok)
        all_tags = [t for t in (doc.get("tags") or []) if t not in tags_remove and t != TO_LABEL]
        all_tags += [t for t in tags_add if t not in all_tags]
        version = int(before.get("label_version") or 0) + 1
        sets = {"label": mine["label"], "identity": mine["identity"], "behaviour": mine["behaviour"],
                "attributes": mine["attributes"], "tags": all_tags, "labelled_by": user,
                "labelled_at": _iso(at), "label_round": rnd, "label_version": version,
                "last_modified_at": at.replace(tzinfo=None)}
        res = coll.update_one(_cas_filter(sample_id, doc), {"$set": sets})
        if res.matched_count == 1:
            after = _state({**doc, **sets})
            did = _log({"dataset": name, "sample_id": sample_id, "kind": "label", "user": user,
                        "session_id": session_id, "at": at, "before": before, "after": after,
                        "all_tags_before": doc.get("tags") or [], "token_before": tok,
                        "token_after": _token(after), "predicted": predicted, "model_agreed": agreed,
                        "target": target, "round": rnd})
            _close_item(name, sample_id, session_id, "done")
            return Decision(did, sample_id, "label", user, session_id, at, before, after, predicted, agreed)
        # raced with another writer between read and write: re-read and re-check
        if expected_version is None:
            expected_version = tok
    raise LabelingError(f"sample {sample_id} keeps changing under concurrent writes; try again")


@dataclass
class BulkResult:
    """What :func:`bulk_decide` did. ``id``: its log entry (None when nothing was written);
    ``changed``: samples written; ``unchanged``: samples that already had the values;
    ``conflicts``: samples someone else changed between this call's read and its write (left as
    they are); ``missing``: ids not in the dataset."""

    id: str | None
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


_BULK_CHUNK = 1000  # samples read per query in bulk decisions and their undo


def bulk_decide(name: str, session_id: str, ids: Sequence[str], user: str, label: str | None = None,
                identity: str | None = None, tags_add: Iterable[str] = ()) -> BulkResult:
    """One decision on many samples (the Map page's bulk actions), undoable as one step.

    Checked as in :func:`decide` (``label`` a class of the schema, ``tags_add`` condition tags).
    Each sample is written by compare-and-set against the state read here, so a concurrent
    writer is never overwritten: such samples are left and listed in ``conflicts``. A class or an
    identity is a human decision (``labelled_by``, ``labelled_at``, ``label_round`` set, the map's
    "to-label" tag dropped); condition tags alone verify nothing (``labelled_by`` is kept).
    ``label_version`` grows on every written sample. The log gets one "bulk" entry and one
    "bulk_item" entry per written sample (before / after state, tokens, tags added / removed);
    :func:`undo` by ``session_id`` reverts the samples nobody changed since."""
    coll, _ = _samples(name)
    schema = label_schema(name)
    tags_add = list(dict.fromkeys(t for t in tags_add if t))
    bad = [t for t in tags_add if t not in CONDITION_TAGS and t not in schema.conditions]
    if bad:
        raise LabelingError(f"unknown condition tags {bad}; the schema allows {schema.conditions}")
    if label is not None and label not in schema.classes:
        raise LabelingError(f"unknown class {label!r}; the schema has {schema.classes}")
    identity = (str(identity).strip() or None) if identity is not None else None
    if label is None and identity is None and not tags_add:
        raise LabelingError("nothing to apply: choose a class, an identity or condition tags")
    ids = list(dict.fromkeys(str(i) for i in ids))
    if not ids:
        raise LabelingError("no samples selected: select some on the map first")
    verifies = label is not None or identity is not None
    at = _now()
    rnd = current_round(name) if verifies else None
    bid, seq = uuid.uuid4().hex, _seq()
    out = BulkResult(None)
    # the head entry goes first: a process that dies half-way leaves an undoable decision
    _log({"_id": bid, "seq": seq, "dataset": name, "sample_id": None, "kind": "bulk", "user": user,
          "session_id": session_id, "at": at, "before": {},
          "after": {"label": label, "identity": identity, "tags_add": tags_add}, "round": rnd,
          "complete": False})
    for c0 in range(0, len(ids), _BULK_CHUNK):
        chunk = ids[c0: c0 + _BULK_CHUNK]
        docs = {str(d["_id"]): d for d in coll.find({"_id": {"$in": [_oid(i) for i in chunk]}},
                                                     {f: 1 for f in (*LABEL_FIELDS, "tags")})}
        entries = []
        for sid in chunk:
            doc = docs.get(sid)
            if doc is None:
                out.missing.append(sid)
                continue
            before = _state(doc)
            tags_before = list(doc.get("tags") or [])
            tags = [t for t in tags_before if not (verifies and t == TO_LABEL)]
            tags += [t for t in tags_add if t not in tags]
            if (tags == tags_before and label in (None, before["label"]) and identity in (None, before["identity"])
                    and (not verifies or before["labelled_by"] is not None)):
                out.unchanged.append(sid)
                continue
            sets: dict[str, Any] = {"tags": tags, "label_version": int(before.get("label_version") or 0) + 1,
                                    "last_modified_at": at.replace(tzinfo=None)}
            if label is not None:
                sets["label"] = label
            if identity is not None:
                sets["identity"] = identity
            if verifies:
                sets.update(labelled_by=user, labelled_at=_iso(at), label_round=rnd)
            if coll.update_one(_cas_filter(sid, doc), {"$set": sets}).matched_count != 1:
                out.conflicts.append(sid)  # changed since it was read: theirs stays
                continue
            after = _state({**doc, **sets})
            out.changed.append(sid)
            entries.append({"_id": uuid.uuid4().hex, "dataset": name, "sample_id": sid, "kind": "bulk_item",
                            "bulk": bid, "user": user, "session_id": session_id, "at": at, "seq": seq,
                            "undone": False, "before": before, "after": after,
                            "tags_added": [t for t in tags if t not in tags_before],
                            "tags_removed": [t for t in tags_before if t not in tags],
                            "token_before": _token(before), "token_after": _token(after)})
        if entries:
            _coll(DECISIONS).insert_many(entries, ordered=False)
    if out.changed:
        out.id = bid
        _coll(DECISIONS).update_one({"_id": bid}, {"$set": {
            "complete": True, "seq": _seq(), "n_changed": len(out.changed), "n_unchanged": len(out.unchanged),
            "conflicts": out.conflicts, "missing": out.missing}})
    else:  # nothing written: nothing to undo
        _coll(DECISIONS).delete_one({"_id": bid})
    log.info("%s: bulk decision by %s: %d changed, %d unchanged, %d conflicts, %d missing", name, user,
             len(out.changed), len(out.unchanged), len(out.conflicts), len(out.missing))
    return out


def _undo_bulk(name: str, coll, bulk_id: str) -> tuple[list[str], list[str]]:
    """Revert the samples of a bulk decision that nobody changed since (compare-and-set on the
    token it left); returns (restored, not restored) sample ids."""
    items = list(_coll(DECISIONS).find({"dataset": name, "bulk": bulk_id, "kind": "bulk_item"},
                                       {"sample_id": 1, "before": 1, "token_after": 1, "tags_added": 1,
                                        "tags_removed": 1}))
    restored, kept = [], []
    now = _now().replace(tzinfo=None)
    for c0 in range(0, len(items), _BULK_CHUNK):
        chunk = items[c0: c0 + _BULK_CHUNK]
        docs = {str(d["_id"]): d for d in coll.find({"_id": {"$in": [_oid(it["sample_id"]) for it in chunk]}},
                                                     {f: 1 for f in (*LABEL_FIELDS, "tags")})}
        for it in chunk:
            sid, doc = it["sample_id"], docs.get(it["sample_id"])
            if doc is None or _token(_state(doc)) != it["token_after"]:
                kept.append(sid)
                continue
            cur_tags = list(doc.get("tags") or [])
            tags = [t for t in cur_tags if t not in it.get("tags_added", [])]
            tags += [t for t in it.get("tags_removed", []) if t not in tags]
            sets = {f: it["before"].get(f) for f in LABEL_FIELDS}
            sets.update(label_version=int(doc.get("label_version") or 0) + 1, tags=tags, last_modified_at=now)
            if coll.update_one(_cas_filter(sid, doc), {"$set": sets}).matched_count == 1:
                restored.append(sid)
            else:
                kept.append(sid)
    return restored, kept


def _restore(name: str, coll, sample_id: str, target_state: dict[str, Any], expected_token: str,
             user: str, extra_tags: Sequence[str] = ()) -> dict[str, Any]:
    """Compare-and-set the sample back to ``target_state`` (label fields, condition tags)."""
    for _attempt in range(10):
        doc = _read(coll, sample_id)
        cur = _state(doc)
        tok = _token(cur)
        if tok != expected_token:
            raise LabelConflict(sample_id, target_state, cur, tok)
        tags = [t for t in (doc.get("tags") or []) if t not in CONDITION_TAGS or t in target_state["tags"]]
        tags += [t for t in (*target_state["tags"], *extra_tags) if t not in tags]
        sets = {f: target_state.get(f) for f in LABEL_FIELDS}
        sets["label_version"] = int(cur.get("label_version") or 0) + 1  # versions only grow
        sets["tags"] = tags
        sets["last_modified_at"] = _now().replace(tzinfo=None)
        res = coll.update_one(_cas_filter(sample_id, doc), {"$set": sets})
        if res.matched_count == 1:
            return _state({**doc, **sets})
    raise LabelingError(f"sample {sample_id} keeps changing under concurrent writes; try again")


UNDOABLE = ("label", "skip", "merge", "bulk")


def undo(name: str, session_id: str, user: str | None = None,
         kinds: Sequence[str] = UNDOABLE) -> Decision | None:
    """Revert this session's last decision (of ``kinds``) not yet undone; returns it (None:
    nothing to undo).

    A label decision is reverted only if nobody changed the sample since (else
    :class:`LabelConflict`); its item is leased to this session again so the page shows it.
    An undone skip re-serves the item; an undone merge or bulk decision restores the samples
    that were not changed since (the others are left, listed in the log and in the returned
    decision's ``not_restored``)."""
    bad = [k for k in kinds if k not in UNDOABLE]
    if bad or not kinds:
        raise LabelingError(f"cannot undo decisions of kind {bad or kinds}; undoable: {UNDOABLE}")
    coll, _ = _samples(name)
    d = _coll(DECISIONS).find_one({"dataset": name, "session_id": session_id, "undone": False,
                                   "kind": {"$in": list(kinds)}}, sort=[("seq", -1)])
    if d is None:
        return None
    who = user or d.get("user")
    extra: dict[str, Any] = {}
    if d["kind"] == "label":
        keep_tags = [t for t in d.get("all_tags_before", []) if t == TO_LABEL]
        restored = _restore(name, coll, d["sample_id"], d["before"], d["token_after"], who, keep_tags)
        extra["token_after"] = _token(restored)
    elif d["kind"] == "merge":
        kept = []
        for sid, v in d.get("versions", {}).items():
            r = coll.update_one({"_id": _oid(sid), "identity": d["after"]["identity"], "label_version": v + 1},
                                {"$set": {"identity": d["before"]["identity"], "label_version": v + 2,
                                          "last_modified_at": _now().replace(tzinfo=None)}})
            if r.matched_count == 0:
                kept.append(sid)
        extra["not_restored"] = kept
    elif d["kind"] == "bulk":
        restored, kept = _undo_bulk(name, coll, d["_id"])
        extra.update(n_restored=len(restored), not_restored=kept)
    res = _coll(DECISIONS).update_one({"_id": d["_id"], "undone": False},
                                      {"$set": {"undone": True, "undone_at": _now(), "undone_by": who}})
    if res.modified_count == 0:  # undone concurrently by the same session in another thread
        return None
    _log({"dataset": name, "sample_id": d.get("sample_id"), "kind": "undo", "user": who, "session_id": session_id,
          "at": _now(), "undoes": d["_id"], "before": d.get("after"), "after": d.get("before"), **extra})
    closed = {"dataset": name, "sample_id": d.get("sample_id"), "status": {"$in": ["done", "skipped"]},
              "closed_by": session_id}
    if d["kind"] in ("label", "skip") and d.get("sample_id") and _coll(ITEMS).count_documents(closed):
        until = _now() + timedelta(seconds=120)
        if _claim_sample(name, d["sample_id"], session_id, until):
            _coll(ITEMS).update_many(closed,
                                     {"$set": {"status": "leased", "leased_by": session_id, "lease_until": until,
                                               "served_token": extra.get("token_after") or d.get("token_after")}})
    out = _as_decision(d)
    out.not_restored = extra.get("not_restored")
    return out


def record_conflict(name: str, session_id: str, sample_id: str, user: str, mine: dict[str, Any],
                    theirs: dict[str, Any], resolution: str) -> str:
    """Log how an operator resolved a :class:`LabelConflict` ("kept_theirs" / "kept_mine"), so
    discarded values stay on record. When theirs is kept, this session's lease is dropped."""
    if resolution == "kept_theirs":
        _close_item(name, sample_id, session_id, "done")
    return _log({"dataset": name, "sample_id": sample_id, "kind": "conflict", "user": user,
                 "session_id": session_id, "at": _now(), "before": theirs, "after": mine,
                 "resolution": resolution})


def decisions(name: str, session_id: str | None = None, limit: int = 100, items: bool = False) -> list[Decision]:
    """The newest decisions (all kinds), newest first. ``items``: also the per-sample entries of
    bulk decisions ("bulk_item"; by default only their one "bulk" entry)."""
    f: dict[str, Any] = {"dataset": name}
    if not items:
        f["kind"] = {"$ne": "bulk_item"}
    if session_id:
        f["session_id"] = session_id
    return [_as_decision(d) for d in _coll(DECISIONS).find(f, sort=[("seq", -1)], limit=limit)]


# --------------------------------------------------------------------------------------------
# identities, flags
# --------------------------------------------------------------------------------------------

def identities(name: str) -> list[str]:
    return sorted(str(i) for i in store.get_dataset(name).distinct("identity") if i)


def new_identity(name: str, prefix: str = "id") -> str:
    """A fresh identity name, unique in the dataset (atomic counter, safe across sessions)."""
    have = set(identities(name))
    while True:
        c = _coll(COUNTERS).find_one_and_update({"_id": f"{name}|identity"}, {"$inc": {"n": 1}},
                                                upsert=True, return_document=True)
        ident = f"{prefix}-{int(c['n']):04d}"
        if ident not in have:
            return ident


def merge_identities(name: str, a: str, b: str, user: str, session_id: str | None = None) -> Decision:
    """Every sample of identity ``b`` becomes ``a`` (logged; undoable by this session with
    :func:`undo`). ``labelled_by`` is left as it was: a merge renames, it verifies nothing."""
    if not a or not b or a == b:
        raise LabelingError("choose two different identities to merge")
    coll, _ = _samples(name)
    docs = list(coll.find({"identity": b}, {"label_version": 1}))
    if not docs:
        raise LabelingError(f"no sample has identity {b!r}")
    versions = {str(d["_id"]): int(d.get("label_version") or 0) for d in docs}
    now = _now()
    moved = []
    for sid, v in versions.items():
        r = coll.update_one({"_id": _oid(sid), "identity": b, "label_version": _version_filter(v)},
                            {"$set": {"identity": a, "label_version": v + 1, "last_modified_at": now.replace(tzinfo=None)}})
        if r.matched_count:
            moved.append(sid)
    did = _log({"dataset": name, "sample_id": None, "kind": "merge", "user": user, "session_id": session_id or user,
                "at": now, "before": {"identity": b}, "after": {"identity": a}, "sample_ids": moved,
                "versions": {s: versions[s] for s in moved}})
    log.info("%s: merged identity %s into %s (%d samples) by %s", name, b, a, len(moved), user)
    return Decision(did, None, "merge", user, session_id or user, now, {"identity": b}, {"identity": a})


def _version_filter(v: int) -> Any:
    """label_version 0 is stored as missing / null on never-labelled samples."""
    return {"$in": [None, 0]} if v == 0 else v


def flag(name: str, ids: Sequence[str], reason: str, user: str, flagged: bool = True) -> int:
    """Mark samples as misclustered (``flagged`` True and ``flag_reason``) or clear the flag;
    logged. Flags are not labels: ``labelled_by`` is not touched."""
    coll, _ = _samples(name)
    ids = list(ids)
    if not ids:
        return 0
    now = _now()
    r = coll.update_many({"_id": {"$in": [_oid(i) for i in ids]}},
                         {"$set": {"flagged": bool(flagged), "flag_reason": reason if flagged else None,
                                   "last_modified_at": now.replace(tzinfo=None)}})
    _log({"dataset": name, "sample_id": None, "kind": "flag" if flagged else "unflag", "user": user,
          "session_id": user, "at": now, "sample_ids": ids, "before": {}, "after": {"reason": reason}})
    return r.modified_count


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------

def progress(name: str) -> dict[str, Any]:
    """Labelled counts over samples with a human decision (``labelled_by`` set):
    {labelled, total, per_class, per_identity, per_condition, per_user, agreement}; agreement
    is :func:`agreement_series`."""
    ds = _ensure(name)
    view = ds.exists("labelled_by")
    n = view.count()
    out: dict[str, Any] = {"labelled": n, "total": len(ds), "per_class": {}, "per_identity": {},
                           "per_condition": {}, "per_user": {}}
    if n:
        out["per_class"] = {str(k): v for k, v in view.count_values("label").items() if k is not None}
        out["per_identity"] = {str(k): v for k, v in view.count_values("identity").items() if k is not None}
        out["per_user"] = {str(k): v for k, v in view.count_values("labelled_by").items() if k is not None}
        tags = view.count_sample_tags()
        cond = {t: int(tags.get(t, 0)) for t in CONDITION_TAGS}
        if "low_light" in ds.get_field_schema():
            cond["low light (measured)"] = int(view.count_values("low_light").get(True, 0))
        out["per_condition"] = cond
    out["agreement"] = agreement_series(name)
    return out


def agreement_series(name: str, window: int = 20) -> list[dict[str, Any]]:
    """The model's agreement with new labels over time: one row per label decision that had a
    prediction (not undone), oldest first: {at, n, agreed, rolling, cumulative, round, target}
    (``rolling``: share over the last ``window`` decisions)."""
    rows = []
    hits: list[int] = []
    for d in _coll(DECISIONS).find({"dataset": name, "kind": "label", "undone": False,
                                    "model_agreed": {"$ne": None}}, sort=[("seq", 1)]):
        hits.append(int(bool(d["model_agreed"])))
        last = hits[-window:]
        rows.append({"at": _aware(d["at"]), "n": len(hits), "agreed": bool(d["model_agreed"]),
                     "rolling": sum(last) / len(last), "cumulative": sum(hits) / len(hits),
                     "round": d.get("round", 0), "target": d.get("target")})
    return rows


# --------------------------------------------------------------------------------------------
# tracklet context
# --------------------------------------------------------------------------------------------

def _tracklet_boxes(name: str, tracklet: str) -> tuple[np.ndarray, np.ndarray]:
    """(frames int [M], boxes float [M, 4] x, y, w, h) of the tracklet's crops, by frame."""
    from fiftyone import ViewField as F

    view = store.get_dataset(name).match(F("tracklet") == tracklet).exists("bbox").exists("frame")
    frames, boxes = view.values(["frame", "bbox"]) if view.count() else ([], [])
    if not frames:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float64)
    order = np.argsort(frames, kind="stable")
    return np.asarray(frames, np.int64)[order], np.asarray(boxes, np.float64)[order]


def tracklet_path(name: str, tracklet: str) -> list[tuple[int, float, float]]:
    """Movement path of a tracklet: (frame, cx, cy) of its crops' box centres (bottom-centre is
    where the feet are; the centre is what the box plot shows), sorted by frame."""
    frames, boxes = _tracklet_boxes(name, tracklet)
    return [(int(f), float(b[0] + b[2] / 2), float(b[1] + b[3] / 2)) for f, b in zip(frames, boxes)]


def tracklet_strip(name: str, sample_id: str, n: int = 8) -> list[tuple[int, np.ndarray]]:
    """Up to ``n`` frames spanning the crop's tracklet (``frame_first``..``frame_last``), each an
    RGB uint8 [H, W, 3] with the box drawn (interpolated between the tracklet's crops; the
    crop's own frame in a thicker box). [] for samples without a tracklet or video (re-ID)."""
    import cv2

    from core import media

    ds = store.get_dataset(name)
    doc = store.db()[ds._sample_collection_name].find_one(
        {"_id": _oid(sample_id)}, {"tracklet": 1, "video_path": 1, "frame_first": 1, "frame_last": 1, "frame": 1})
    if not doc or not doc.get("tracklet") or not doc.get("video_path"):
        return []
    first, last = doc.get("frame_first"), doc.get("frame_last")
    frames, boxes = _tracklet_boxes(name, doc["tracklet"])
    if first is None or last is None:
        if not len(frames):
            return []
        first, last = int(frames[0]), int(frames[-1])
    wanted = sorted({int(round(v)) for v in np.linspace(first, last, max(1, n))})
    own = doc.get("frame")
    if own is not None and own not in wanted and len(wanted):
        wanted[int(np.argmin([abs(w - own) for w in wanted]))] = int(own)
        wanted = sorted(set(wanted))
    try:
        got = media.read_frames(doc["video_path"], wanted)
    except Exception as exc:  # noqa: BLE001 - a missing clip only costs the strip
        log.warning("no frame strip for %s: %s", sample_id, exc)
        return []
    out = []
    for fn in wanted:
        img = got.get(fn)
        if img is None:
            continue
        img = img.copy()
        if len(frames):
            b = [np.interp(fn, frames, boxes[:, c]) for c in range(4)]
            x0, y0 = int(round(b[0])), int(round(b[1]))
            x1, y1 = int(round(b[0] + b[2])), int(round(b[1] + b[3]))
            thick = 3 if fn == own else 2
            colour = (0, 0, 255) if fn == own else (0, 220, 255)
            cv2.rectangle(img, (x0, y0), (x1, y1), colour, thick)
        out.append((fn, np.ascontiguousarray(img[:, :, ::-1])))
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def cmd_query(a) -> int:
    """``python -m core query --dataset NAME --strategy margin --k 50``: print the batch."""
    import sys

    try:
        spec = QueueSpec(strategy=a.strategy, k=a.k, target=a.target,
                         mode=a.mode or label_schema(a.dataset).mode, boost_conditions=not a.no_boost, seed=a.seed)
        if a.store:
            build_queue(a.dataset, spec=spec)
        batch = compute_batch(a.dataset, spec)
    except (LabelingError, store.StoreError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# {a.dataset}: {len(batch.rows)} samples by {batch.strategy} (model {batch.version}, "
          f"{batch.n_labelled} labelled, {batch.n_candidates} candidates, target {spec.target}, mode {spec.mode})")
    print(f"{'rank':>4}  {'sample id':<24}  {'score':>7}  {'identity':<18}  {'camera':<12}  path")
    for r in batch.rows:
        print(f"{r.rank + 1:>4}  {r.sample_id:<24}  {r.score:>7.4f}  {str(r.identity or '-'):<18}  "
              f"{str(r.camera or '-'):<12}  {r.filepath}")
        if a.reasons and r.reason:
            print(f"      {r.reason}")
    return 0


def add_commands(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``query`` on the ``python -m core`` subparsers."""
    s = subparsers.add_parser("query", help="print the next labelling batch of a strategy")
    s.add_argument("--dataset", required=True)
    s.add_argument("--strategy", default=strategies.DEFAULT_STRATEGY, choices=sorted(strategies.STRATEGIES))
    s.add_argument("--k", type=int, default=50)
    s.add_argument("--target", default="identity", choices=TARGETS)
    s.add_argument("--mode", choices=MODES, default=None,
                   help="verify: ingested identities are unverified (queued); trust: they count as labels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-boost", action="store_true", help="do not raise night / shadow / flagged samples")
    s.add_argument("--reasons", action="store_true", help="print why each sample was chosen")
    s.add_argument("--store", action="store_true", help="also append the batch to the shared queue")
    s.set_defaults(fn=cmd_query)
