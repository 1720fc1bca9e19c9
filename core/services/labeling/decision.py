"""Decisions: one sample (:func:`decide`, compare-and-set with conflicts), many at once
(:func:`bulk_decide`), undo, conflict resolutions and the decision log; identity names, merges
and operator flags, which are logged the same way."""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Iterable, Sequence

from core.data import store
from core.services.labeling.base import (CONDITION_TAGS, COUNTERS, DECISIONS, ITEMS, LABEL_FIELDS, TO_LABEL, LabelConflict, LabelingError, _aware, _cas_filter, _coll, _iso, _now, _oid, _log, _read, _samples, _seq, _state, _token)
import core.services.labeling.identity as graph_identity
from core.services.labeling.leases import _claim_sample, _close_item
from core.services.labeling.schema import current_round, label_schema
from core.services.labeling.suggestions import predict

log = logging.getLogger(__name__)


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
            if identity is not None and identity != before["identity"]:
                graph_identity.sync(name)  # the crop's tracklet (and whoever it is linked to) follows
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
    not_joined: list[str] = field(default_factory=list)  # identity graph conflicts the identity made


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
    if identity is not None and out.changed:
        # one identity on tracklets seen in one frame would put one person in two places: the
        # graph keeps them apart (the others get "<identity>~2"...) and says so
        state, _ = graph_identity.sync(name)
        changed = set(out.changed)
        nodes = {state.node_of_row(k) for k, sid in enumerate(state.cols["id"]) if sid in changed}
        out.not_joined = [c.describe() for c in state.confirmed.conflicts
                          if c.link.ref is None and c.link.source == "operator" and {c.link.a, c.link.b} & nodes]
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
    if d["kind"] in ("merge", "bulk") or (d["kind"] == "label" and d.get("target") == "identity"):
        graph_identity.sync(name)
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
    return [str(i) for i in store.distinct(name, "identity")]


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
    graph_identity.sync(name)
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
