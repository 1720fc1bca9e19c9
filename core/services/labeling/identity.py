"""Who is who: the identity graph of a dataset, fed from MongoDB, and the pair decisions.

Nodes are tracklets (``t:<tracklet>``: every crop of one MOT track or linked video track) and
single crops (``s:<sample id>``: re-ID folders, image folders) of the person crops; vehicle,
shadow and other non-person crops and whole images are not nodes. Links:

- must: same tracklet (a node is one tracklet), identities that came with the data
  ("ingested": trusted or to be verified as the schema's mode says, see
  :func:`core.math.graph.build`), identities an operator typed on a crop (the latest
  typed on a tracklet names it, and outvotes names that came with the data), an operator's
  "same" for a pair;
- cannot: two tracklets seen in the same frame of one sequence (free), an operator's "different".

The pair answers are entries of the append-only decision log (``vigil_decisions``, kind
"pair": who, when, the two nodes, the answer, the model version that asked and its P(same));
undo is an "undo" entry. The graph is replayed from the log (:func:`load`) and the sample
field ``identity`` is written from it (:func:`sync`) under a per-dataset lock, compare-and-set
on ``label_version``, so two operators answering at once end in the state of the whole log.
A sample the graph renamed keeps what it had before in ``identity_base`` and the name written
in ``graph_identity``: a value anyone else writes later is respected as a new input.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Sequence

from core.data import store
from core.math.graph import Conflict, Link
from core.services.labeling.base import (DECISIONS, LEASES, PAIRS, LabelingError, _coll, _log, _now, _oid, _samples)
from core.services.labeling.leases import _claim_sample
from core.services.labeling.replay import (GraphState, advance, claims_of, is_person, node_of, pair_entries,  # noqa: F401
                                           replay)
from core.services.labeling.schema import label_schema

log = logging.getLogger(__name__)

ANSWERS = ("same", "different", "unsure")
LOCKS = "vigil_locks"


class PairConflict(LabelingError):
    """A pair answer that contradicts the graph; ``conflict`` names both sides and the links in
    the way. Nothing was applied (the attempt is logged as kind "pair_conflict")."""

    def __init__(self, conflict: Conflict):
        self.conflict = conflict
        super().__init__(f"not applied: {conflict.describe()}. Undo the answer in the way, or answer "
                         "'different' / 'not sure'")


_LOADED: dict[str, tuple[tuple, GraphState]] = {}  # dataset -> (stamp, state): this process's last replay
_LOADED_LOCK = threading.Lock()


def _stamp(name: str) -> tuple:
    """What a replay reads, as of now: the samples (:func:`core.data.store.last_modified`), the
    log's newest entry (an answer, an undo) and the schema's trust mode."""
    newest = _coll(DECISIONS).find_one({"dataset": name}, {"seq": 1}, sort=[("seq", -1)])
    return store.last_modified(name), newest and newest["seq"], label_schema(name).mode


def load(name: str) -> GraphState:
    """The graph replayed from the samples and the decision log (see the module docstring).

    A page run asks for it several times (is there a pair, the next pair, the conflicts, the
    answer's check): the replay is kept per process and given again while nothing it reads has
    changed (:func:`_stamp`, three indexed lookups), since a replay reads every person crop's
    columns (0.3 s at 10k crops, seconds at 100k). The state is shared: callers only read it."""
    return _load(name)[1]


def _load(name: str) -> tuple[tuple, GraphState]:
    """:func:`load` and the stamp its state answers to."""
    _samples(name)  # the graph's fields declared
    stamp = _stamp(name)  # before the read: a write after it changes the next stamp
    with _LOADED_LOCK:
        hit = _LOADED.get(name)
    if hit is not None and hit[0] == stamp:
        return hit
    state = None
    if hit is not None and hit[0][0] == stamp[0] and hit[0][2] == stamp[2]:
        state = advance(name, hit[1])  # only the log moved (answers): apply them to a copy
    if state is None:  # the samples' columns are still those read when only the log or the mode moved
        state = replay(name, hit[1].cols if hit is not None and hit[0][0] == stamp[0] else None)
    with _LOADED_LOCK:
        _LOADED[name] = (stamp, state)
    return stamp, state


def _keep_synced(name: str, before: tuple, state: GraphState, written: dict[int, dict[str, Any]], at) -> None:
    """After :func:`sync` wrote ``written`` (row -> fields set, all stamped ``at``): keep ``state``
    with those values as the replay of the new stamp, when nobody else wrote meanwhile (every
    sample newer than the stamp ``before`` is one of ours, as many samples, no new log entry).
    The graph itself is what a replay would build: its inputs (the crops' own identities,
    ``core.services.labeling.replay._input_name``) read through the fields a sync writes; the
    claims of the components written are named again from the new written names. Otherwise the next :func:`load` replays."""
    after = _stamp(name)
    (newest, count), seq, mode = before
    if newest is None or after[0][1] != count or after[1:] != (seq, mode) or after[0][0] != at:
        return
    coll, _ = _samples(name)
    if coll.count_documents({"last_modified_at": {"$gt": newest}}) != len(written):
        return
    cols = dict(state.cols)
    for f in ("identity", "graph_identity", "identity_base"):
        cols[f] = list(cols[f])
        for k, sets in written.items():
            cols[f][k] = sets[f]
    kept = replace(state, cols=cols)
    # their written names are the naming's "current" input: as a replay would now see them
    kept.claims = {**state.claims, **claims_of(kept, {state.node_of_row(k) for k in written})}
    with _LOADED_LOCK:
        _LOADED[name] = (after, kept)


# --------------------------------------------------------------------------------------------
# writing the sample fields from the graph
# --------------------------------------------------------------------------------------------

def _lock(name: str, owner: str, hold_s: float = 60.0, wait_s: float = 60.0) -> None:
    deadline = time.time() + wait_s
    while True:
        now = _now()
        if store.upsert_if(_coll(LOCKS), {"_id": f"{name}|graph", "until": {"$lt": now}},
                           {"$set": {"owner": owner, "until": now + timedelta(seconds=hold_s)}}):
            return
        if time.time() > deadline:
            raise LabelingError("the identity graph is being written by another session for over a "
                                "minute; try again")
        time.sleep(0.05)


def _unlock(name: str, owner: str) -> None:
    _coll(LOCKS).delete_one({"_id": f"{name}|graph", "owner": owner})


def sync(name: str) -> tuple[GraphState, list[str]]:
    """Write ``identity`` of every person crop from the graph as the whole log stands now
    (under the dataset's graph lock); returns the state and the ids of the samples changed."""
    owner = uuid.uuid4().hex
    _lock(name, owner)
    try:
        stamp, state = _load(name)
        coll, _ = _samples(name)
        cols = state.cols
        t = _now()
        now = t.replace(tzinfo=None, microsecond=t.microsecond // 1000 * 1000)  # as MongoDB keeps it
        todo: dict[int, tuple[dict, dict]] = {}  # row -> (compare-and-set filter, fields to set)
        for node, ks in state.rows.items():
            want = state.names.get(node)
            for k in ks:
                ident, written, base = cols["identity"][k], cols["graph_identity"][k], cols["identity_base"][k]
                managed = written is not None and ident == written
                if managed:
                    target = want if want is not None else base
                    sets = {"identity": target, "graph_identity": want, "identity_base": base if want else None}
                elif want is not None and want != ident:
                    target = want
                    sets = {"identity": want, "graph_identity": want, "identity_base": ident}
                else:
                    continue
                if target == ident and sets["graph_identity"] == written:
                    continue
                todo[k] = ({"_id": _oid(cols["id"][k]), "identity": ident, "graph_identity": written}, sets)
        matched = store.update_each_if(coll, [(f, {"$set": {**sets, "last_modified_at": now},
                                                   "$inc": {"label_version": 1}}) for f, sets in todo.values()])
        landed = set(todo)
        if matched < len(todo):  # someone wrote some of them since they were read: their value is the next input
            now_at = {d["_id"]: (d.get("identity"), d.get("graph_identity"))
                      for d in coll.find({"_id": {"$in": [f["_id"] for f, _s in todo.values()]}},
                                         {"identity": 1, "graph_identity": 1})}
            landed = {k for k, (f, sets) in todo.items()
                      if now_at.get(f["_id"]) == (sets["identity"], sets["graph_identity"])}
            log.info("%s: %d samples changed during a graph sync; left as they are", name, len(todo) - len(landed))
        wrote = {k: todo[k][1] for k in sorted(landed)}
        changed = [cols["id"][k] for k, sets in wrote.items() if sets["identity"] != cols["identity"][k]]
        if wrote:
            log.info("%s: identity graph wrote %d samples", name, len(wrote))
            _keep_synced(name, stamp, state, wrote, now)
        return state, changed
    finally:
        _unlock(name, owner)


# --------------------------------------------------------------------------------------------
# pair decisions
# --------------------------------------------------------------------------------------------

@dataclass
class PairResult:
    """What one answer did. ``identity``: the merged identity's name ("same"); ``labelled``:
    crops whose identity the answer changed; ``component_crops``: crops of the resulting
    identity (of ``a``)."""

    id: str
    a: str
    b: str
    answer: str
    identity: str | None
    labelled: int
    component_crops: int


def _check_nodes(state: GraphState, nodes: Sequence[str]) -> None:
    missing = [n for n in nodes if n not in state.rows]
    if missing:
        raise LabelingError(f"{missing} are not tracklets or person crops of this dataset (deleted or "
                            "relabelled as not a person?): ask for the next pair")


def decide_pair(name: str, session_id: str, a: str, b: str, answer: str, user: str,
                model_version: str | None = None, p_same: float | None = None,
                cosine: float | None = None) -> PairResult:
    """Log one operator answer on the pair of nodes (``same`` / ``different`` / ``unsure``) and
    write the sample identities from the graph. A ``same`` across a cannot-link or a
    ``different`` inside one identity raises :class:`PairConflict` and changes nothing."""
    if answer not in ANSWERS:
        raise LabelingError(f"answer must be one of {ANSWERS}, not {answer!r}")
    if a == b:
        raise LabelingError("a pair needs two different tracklets")
    state = load(name)
    _check_nodes(state, (a, b))
    doc = {"dataset": name, "sample_id": None, "kind": "pair", "a": a, "b": b, "answer": answer, "user": user,
           "session_id": session_id, "at": _now(), "model_version": model_version,
           "p_same": None if p_same is None else float(p_same), "cosine": None if cosine is None else float(cosine),
           "before": {"a": state.names.get(a), "b": state.names.get(b)}, "after": {"answer": answer}}
    if answer != "unsure":
        conflict = state.confirmed.check(Link(a, b, answer == "same", "operator"))
        if conflict is not None:
            _log({**doc, "kind": "pair_conflict", "blocking": [vars(x) for x in conflict.blocking]})
            close_pair(name, session_id, a, b, "conflict")
            raise PairConflict(conflict)
    did = _log(doc)
    close_pair(name, session_id, a, b, answer)
    after, changed = sync(name)
    ident = after.names.get(a) if answer == "same" else None
    log.info("%s: pair %s / %s answered %s by %s (%d crops labelled)", name, a, b, answer, user, len(changed))
    return PairResult(did, a, b, answer, ident, len(changed), after.component_crops(a))


def undo_pair(name: str, session_id: str, user: str | None = None) -> dict[str, Any] | None:
    """Take back this session's last pair answer (an "undo" log entry; the graph is replayed
    without it and the identities rewritten). Returns the undone entry, None when there is none."""
    d = _coll(DECISIONS).find_one({"dataset": name, "session_id": session_id, "kind": "pair", "undone": False},
                                  sort=[("seq", -1)])
    if d is None:
        return None
    who = user or d.get("user")
    res = _coll(DECISIONS).update_one({"_id": d["_id"], "undone": False},
                                      {"$set": {"undone": True, "undone_at": _now(), "undone_by": who}})
    if res.modified_count == 0:
        return None
    _log({"dataset": name, "sample_id": None, "kind": "undo", "user": who, "session_id": session_id, "at": _now(),
          "undoes": d["_id"], "before": d.get("after"), "after": d.get("before")})
    reopen_pair(name, session_id, d["a"], d["b"])
    sync(name)
    return d


def conflicts(name: str) -> list[Conflict]:
    """Operator answers the graph could not apply as the log stands (two operators answering at
    once can make one), newest last: shown to the operator, never applied silently."""
    return load(name).confirmed.conflicts


def cannot_identities(state: GraphState) -> list[tuple[str, str]]:
    """The graph's cannot-links as pairs of training identities (see :func:`training_identity`;
    components that do not train, lone crops nobody named, are left out)."""
    def train_name(root: str) -> str | None:
        nm = state.names.get(root)
        if nm is None and root.startswith("t:") and len(state.graph.component(root)) == 1:
            return training_identity(None, root[len("t:"):])
        return nm

    out = []
    for ra, rb in state.graph.cannot_pairs():
        a, b = train_name(ra), train_name(rb)
        if a and b and a != b:
            out.append((a, b))
    return out


LONE = "~"  # training identities of lone tracklets: "~<tracklet>"


def training_identity(identity: str | None, tracklet: str | None) -> str | None:
    """The identity a crop trains as: its (graph-written) identity, else its own tracklet (a
    lone tracklet is one person), else none (a lone crop nobody named teaches nothing)."""
    return identity or (f"{LONE}{tracklet}" if tracklet else None)


def is_lone(training_name: str) -> bool:
    """True for the training identity of a lone tracklet nobody has named or joined."""
    return training_name.startswith(LONE)


# --------------------------------------------------------------------------------------------
# the pair queue's items, closed and reopened by answers (the queue itself: core.services.labeling.pairs)
# --------------------------------------------------------------------------------------------

def pair_key(a: str, b: str) -> str:
    return "|".join(sorted((a, b)))


def close_pair(name: str, session_id: str, a: str, b: str, status: str) -> None:
    """The pair was answered: its items are done and the session's lease goes."""
    key = pair_key(a, b)
    _coll(PAIRS).update_many({"dataset": name, "key": key, "status": {"$in": ["pending", "leased"]}},
                             {"$set": {"status": "done", "answer": status, "closed_by": session_id}})
    _coll(LEASES).delete_one({"_id": f"{name}|pair:{key}", "session": session_id})


def reopen_pair(name: str, session_id: str, a: str, b: str) -> None:
    """An undone answer: the pair goes back to this session first."""
    key = pair_key(a, b)
    until = _now() + timedelta(seconds=120)
    if _claim_sample(name, "pair:" + key, session_id, until):
        _coll(PAIRS).update_many({"dataset": name, "key": key, "closed_by": session_id},
                                 {"$set": {"status": "leased", "leased_by": session_id, "lease_until": until,
                                           "rank": -1}})
