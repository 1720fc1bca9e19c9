"""The pair queue: "same person?" questions over the identity graph, with leases per tab.

A batch is computed from the graph as it stands (:func:`core.services.labeling.identity.load`) and the
active model's vectors: each identity (component) meets its nearest identities, never a pair
inside one identity, held apart by a cannot-link or already answered between the two
identities; the order is :func:`core.math.pair_select.order_pairs` (uncertainty x diversity x the night /
shadow / flagged boost by default, ``random`` the control). Items live in ``vigil_pairs``; a
served pair is leased to one session (``vigil_leases``, key ``pair:<a>|<b>``), so two operators
never get the same pair at once, whichever order they use. A pair that an answer elsewhere has
made implied meanwhile is dropped when its turn comes.

Merges a clustering round proposed (``proposals`` of its registry record,
:func:`round_proposals`) are asked first, closest first, ahead of every pending candidate:
:func:`next_pair` queues the ones still open in front of the queue when it finds any not yet
queued (not in the ``random`` order, the control).

Top-up (``next_pair(..., prefetch=True)``, what the Annotate page asks for): when fewer than
:data:`LOW_WATER` pairs are left pending, the next batch is computed in a child process at a
lower priority while the operator answers those, so nobody waits for a batch once the first is
there (a batch takes about 20 s with 100k unconfirmed crops, :func:`core.math.pair_select.plan_pairs`
and the child's start; answering 20 pairs takes longer). One top-up per dataset and order runs at
a time per app process; two processes topping up at once queue each pair once (the items' ids
are the pair's).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from core.config import settings
from core.services import registry
from core.data import store
import core.math.pair_select as pair_select
from core.services.labeling.base import LEASES, PAIRS, LabelingError, _coll, _now
import core.services.labeling.identity as identity
from core.services.labeling.identity import close_pair, pair_key, reopen_pair  # noqa: F401 (part of the queue's API)
from core.services.labeling.leases import _claim_sample

log = logging.getLogger(__name__)

SHOWN = 6  # crops shown per side
# Pending pairs under which the next batch is computed in the background: a batch (20 pairs) in the
# child process takes about 20 s at 100k crops (imports 2.5 s, graph 4.7 s, batch 11 s, 2 cores),
# about what an operator takes for 10 answers, so with 10 the queue could run dry first; with one
# batch's worth it is computed while the last batch is answered from its first pair on.
LOW_WATER = 20
TOP_UP_NICE = 10  # the background batch's process yields the CPU to the app
_TOPUPS: dict[tuple[str, str], "_TopUp"] = {}
_REPO = Path(__file__).resolve().parents[3]  # the child process imports ``core`` from here
_TOPUPS_LOCK = threading.Lock()


@dataclass
class Side:
    """One identity of a pair: its representative ``node`` (the one the answer links), its
    current ``identity`` name, and what the page shows."""

    node: str
    identity: str | None
    crops: int
    tracklets: int
    cameras: list[str]
    sequences: list[str]
    frames: tuple[int, int] | None
    low_light: float
    sample_ids: list[str] = field(default_factory=list)
    filepaths: list[str] = field(default_factory=list)


@dataclass
class PairItem:
    a: Side
    b: Side
    cosine: float
    p_same: float
    score: float
    reason: str
    order: str
    model_version: str | None
    lease_until: datetime
    rank: int
    proposed_by: str | None = None  # the round whose clustering proposed this pair

    @property
    def key(self) -> str:
        return pair_key(self.a.node, self.b.node)


def _doc_id(name: str, order: str, a: str, b: str) -> str:
    return f"{name}|{order}|{pair_key(a, b)}"


def _side(state, node: str) -> Side:
    g, cols = state.confirmed, state.cols
    members = g.component(node)
    ks = [k for n in members for k in state.rows.get(n, ())]
    cams = sorted({str(cols["camera"][k]) for k in ks if cols["camera"][k] is not None})
    seqs = sorted({str(cols["sequence"][k]) for k in ks if cols["sequence"][k] is not None})
    fr = [cols["frame"][k] for k in ks if cols["frame"][k] is not None]
    low = float(np.mean([bool(cols["low_light"][k]) for k in ks])) if ks else 0.0
    # a few crops spread over the identity's tracklets: the representative's first
    own = state.rows.get(node, [])
    mine = set(own)
    order = own + [k for k in ks if k not in mine]
    pick = [order[int(i)] for i in np.linspace(0, len(order) - 1, min(SHOWN, len(order)))] if order else []
    return Side(node, state.names.get(node), len(ks), len(members), cams, seqs,
                (int(min(fr)), int(max(fr))) if fr else None, low,
                [cols["id"][k] for k in pick], [cols["filepath"][k] for k in pick])


def _answered(state) -> set[tuple[str, str]]:
    """Component-root pairs (of the confirmed graph) an operator has answered."""
    g = state.confirmed
    out = set()
    for e in state.pairs:
        if e["a"] in g and e["b"] in g:
            ra, rb = g.find(e["a"]), g.find(e["b"])
            out.add((ra, rb) if ra < rb else (rb, ra))
    return out


def implied(state, a: str, b: str, answered: set | None = None) -> bool:
    """True when the graph already says whether ``a`` and ``b`` are one person, or an operator
    answered about their two identities (in the confirmed graph: with ingested identities to be
    verified, a pair the data joins is still asked)."""
    g = state.confirmed
    if a not in g or b not in g or g.same(a, b) or g.separated(a, b) is not None:
        return True
    ra, rb = g.find(a), g.find(b)
    return ((ra, rb) if ra < rb else (rb, ra)) in (answered if answered is not None else _answered(state))


def round_proposals(name: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(version, proposals) of the finished round whose proposed merges the queue asks first:
    the active version's when it has any, else the newest ready round's (``(None, [])``)."""
    rec = registry.proposals_record(name, store.active_model(name))
    return (rec["version"], list(rec["proposals"])) if rec else (None, [])


def compute_pairs(name: str, state=None, order: str = pair_select.DEFAULT_PAIR_ORDER, k: int = 20,
                  rng: np.random.Generator | int | None = None, exclude: set[str] = frozenset(),
                  boost: bool = True, proposals: bool = True) -> list[dict[str, Any]]:
    """The next ``k`` questions of the dataset (:func:`core.math.pair_select.plan_pairs` on its graph
    and the active model's vectors), the open proposals of :func:`round_proposals` first
    (``proposals=False``: without them). ``exclude``: pair keys not to ask (queued elsewhere)."""
    state = state or identity.load(name)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    version = store.active_model(name)
    by, props = round_proposals(name) if proposals and order != "random" else (None, [])
    if not version:
        raise LabelingError(f"dataset {name!r} has no embeddings yet: embed it first (Map or Annotate page)")
    vc = store.embedded_columns(name, version, []) or {"id": [], "X": []}
    by_id = dict(zip(vc["id"], vc["X"]))  # by id: a sample ingested since the graph was read is not in it
    vec_col = [by_id.get(sid) for sid in state.cols["id"]]
    if not any(vec_col[k_] is not None for ks in state.rows.values() for k_ in ks):
        raise LabelingError("no person crop has vectors of the active model yet: wait for the embedding job")
    cols = state.cols
    decided = [(float(e["cosine"]), e["answer"] == "same") for e in state.pairs
               if e.get("answer") in ("same", "different") and e.get("cosine") is not None
               and e.get("model_version") == version]  # cosines of this model only
    meta = pair_select.CropMeta(
        camera=cols["camera"], flagged=[bool(f) for f in cols["flagged"]],
        night=[bool(lo) or "night" in (t or ()) for lo, t in zip(cols["low_light"], cols["tags"])],
        shadow=["shadow" in (t or ()) for t in cols["tags"]])
    out = pair_select.plan_pairs(state.confirmed, state.rows, vec_col, meta, _answered(state), decided,
                                 order=order, k=k, rng=rng, exclude=exclude, boost=boost,
                                 proposals=props, proposed_by=by)
    for c in out:
        c["model_version"] = version
    return out


def _busy(coll, name: str) -> set[str]:
    return {d["key"] for d in coll.find({"dataset": name, "status": {"$in": ["pending", "leased"]}}, {"key": 1})}


def _put(coll, name: str, order: str, c: dict[str, Any], batch: int, rank: int, promote: bool = False) -> bool:
    """Queue question ``c`` as pending at ``rank``; False when it is queued already
    (``promote``: a pending item of the same pair that no round proposed is taken over)."""
    doc = {**c, "dataset": name, "order": order, "key": pair_key(c["a"], c["b"]), "status": "pending",
           "batch": batch, "rank": rank, "leased_by": None}
    free: dict[str, Any] = {"status": {"$nin": ["pending", "leased"]}}
    if promote:
        free = {"$or": [free, {"status": "pending", "proposed_by": None}]}
    # a closed item of the same pair is reused; a pending or leased one (queued meanwhile by
    # another session) is left alone
    return store.upsert_if(coll, {"_id": _doc_id(name, order, c["a"], c["b"]), **free}, {"$set": doc})


def _queue(name: str, order: str, k: int, rng, state, boost: bool = True) -> int:
    """Append a batch to the queue of ``order``; returns how many pairs it added."""
    coll = _coll(PAIRS)
    coll.create_index([("dataset", 1), ("order", 1), ("status", 1), ("rank", 1)])
    busy = _busy(coll, name)
    last = coll.find_one({"dataset": name, "order": order}, sort=[("batch", -1)])
    batch = int(last["batch"]) + 1 if last else 0
    return sum(_put(coll, name, order, c, batch, batch * 10_000 + i)
               for i, c in enumerate(compute_pairs(name, state, order, k, rng, exclude=busy, boost=boost)))


def _queue_proposals(name: str, order: str, k: int, rng, state, boost: bool = True) -> int:
    """Put the open proposals not queued yet in front of the queue of ``order`` (ranks below
    every item's), closest first; returns how many. Cheap when there are none: the graph
    check runs before any vector is read."""
    if order == "random":
        return 0
    by, props = round_proposals(name)
    if not props:
        return 0
    coll = _coll(PAIRS)
    # a pending candidate of this queue that a round now proposes moves to the front with it
    busy = {d["key"] for d in coll.find({"dataset": name, "status": {"$in": ["pending", "leased"]}},
                                        {"key": 1, "order": 1, "status": 1, "proposed_by": 1})
            if not (d.get("order") == order and d["status"] == "pending" and d.get("proposed_by") is None)}
    if not pair_select.open_proposals(state.confirmed, state.rows, props, _answered(state), busy):
        return 0
    try:
        items = [c for c in compute_pairs(name, state, order, k, rng, exclude=busy, boost=boost)
                 if c.get("proposed_by") is not None]
    except LabelingError as e:  # no vectors yet: _queue says so when the queue runs dry
        log.warning("%s: proposals of %s not queued: %s", name, by, e)
        return 0
    low = coll.find_one({"dataset": name, "order": order}, sort=[("rank", 1)])
    last = coll.find_one({"dataset": name, "order": order}, sort=[("batch", -1)])
    start = min(0, int(low["rank"]) if low else 0) - len(items)
    batch = int(last["batch"]) if last else 0
    return sum(_put(coll, name, order, c, batch, start + i, promote=True) for i, c in enumerate(items))


class _TopUp:
    """A top-up running in a child process, seen through a thread's interface."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


def _running_top_up(name: str, order: str) -> _TopUp | None:
    """This process's top-up of the queue of ``order``, while it runs."""
    with _TOPUPS_LOCK:
        t = _TOPUPS.get((name, order))
    return t if t is not None and t.is_alive() else None


def _top_up(name: str, order: str, k: int, boost: bool) -> _TopUp | None:
    """Start computing the next batch in the background when fewer than :data:`LOW_WATER` pairs
    are pending and no top-up of this queue started by this process runs; returns it (None: not
    needed, or one runs already).

    The batch is computed in a child process (:func:`top_up_main`) at nice :data:`TOP_UP_NICE`,
    not in a thread of the app: a thread shares the app's interpreter lock, so its seconds of
    Python (reading 100k vectors, replaying the graph) stalled the operator's page runs (answers
    at 100k took 1.8-4 s while one ran); a process at a lower priority only takes the CPU the
    app leaves. Its log: ``<data root>/jobs/pairs-top-up.log``."""
    if _coll(PAIRS).count_documents({"dataset": name, "order": order, "status": "pending"}) >= LOW_WATER:
        return None
    with _TOPUPS_LOCK:  # held from the check to the start: two page runs never start two
        running = _TOPUPS.get((name, order))
        if running is not None and running.is_alive():
            return None
        logs = settings().data_root / "jobs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "pairs-top-up.log", "ab") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from core.services.labeling.pairs import top_up_main; "
                 "sys.exit(top_up_main(sys.argv[1:]))", name, order, str(int(k)), "1" if boost else "0"],
                cwd=_REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        t = _TOPUPS[(name, order)] = _TopUp(proc)
    return t


def top_up_main(argv: list[str]) -> int:
    """The child process of :func:`_top_up`: ``dataset order k boost(0/1)``; queues one batch."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    name, order, k, boost = argv[0], argv[1], int(argv[2]), argv[3] == "1"
    try:  # behind the operator's own page runs on a small machine
        os.nice(TOP_UP_NICE)
    except OSError:
        pass
    log.info("%s: computing the next pair batch in the background (%s order)", name, order)
    try:
        added = _queue(name, order, k, None, identity.load(name), boost)
    except Exception:  # noqa: BLE001 - the next next_pair computes a batch itself
        log.exception("%s: background pair batch failed", name)
        return 1
    log.info("%s: %d pairs queued in the background (%s order)", name, added, order)
    return 0


def prepare(name: str, order: str = pair_select.DEFAULT_PAIR_ORDER, k: int = 20) -> int:
    """Queue a first batch of pair questions of ``order`` when none is pending and the graph has
    two identities to compare; returns the pairs queued. The embedding job calls it after the
    map, so the Annotate page shows its first pair at once: computed there, the first batch kept
    the operator waiting about 12 s with 100k unconfirmed crops."""
    if _coll(PAIRS).count_documents({"dataset": name, "order": order, "status": "pending"}, limit=1):
        return 0
    state = identity.load(name)
    if len(state.confirmed.roots()) < 2:
        return 0
    return _queue(name, order, k, None, state)


def next_pair(name: str, session_id: str, order: str = pair_select.DEFAULT_PAIR_ORDER, lease_s: float = 120,
              k: int = 20, rng: np.random.Generator | int | None = None, boost: bool = True,
              prefetch: bool = False) -> PairItem | None:
    """Lease the next pair question to ``session_id`` (its own leased pair first); None when the
    graph leaves nothing to ask. Recomputes a batch when the queue runs dry; ``prefetch``: also
    tops the queue up in the background once it runs low (see the module docstring)."""
    if order not in pair_select.PAIR_ORDERS:
        raise LabelingError(f"unknown pair order {order!r}; use one of {pair_select.PAIR_ORDERS}")
    coll = _coll(PAIRS)
    state = identity.load(name)
    _queue_proposals(name, order, k, rng, state, boost)
    for attempt in range(2):
        answered = _answered(state)
        now = _now()
        mine = list(coll.find({"dataset": name, "order": order, "status": "leased", "leased_by": session_id},
                              sort=[("rank", 1)]))
        rest = coll.find({"dataset": name, "order": order, "$or": [
            {"status": "pending"}, {"status": "leased", "lease_until": {"$lt": now}}]}, sort=[("rank", 1)])
        for d in [*mine, *rest]:
            if implied(state, d["a"], d["b"], answered):
                coll.update_one({"_id": d["_id"], "status": d["status"]}, {"$set": {"status": "implied"}})
                continue
            until = _now() + timedelta(seconds=lease_s)
            if not _claim_sample(name, "pair:" + d["key"], session_id, until):
                continue  # another tab holds this pair (from another order's queue)
            res = coll.update_one({"_id": d["_id"], "$or": [
                {"status": "pending"}, {"status": "leased", "leased_by": session_id},
                {"status": "leased", "lease_until": {"$lt": now}}]},
                {"$set": {"status": "leased", "leased_by": session_id, "lease_until": until}})
            if res.matched_count == 0:
                _coll(LEASES).delete_one({"_id": f"{name}|pair:{d['key']}", "session": session_id})
                continue
            if prefetch:
                _top_up(name, order, k, boost)
            return PairItem(_side(state, d["a"]), _side(state, d["b"]), d["cosine"], d["p_same"], d["score"],
                            d["reason"], order, d.get("model_version"), until, d["rank"], d.get("proposed_by"))
        if attempt == 0:
            running = _running_top_up(name, order)
            if running is not None:
                running.join()  # the batch the background is computing: wait for it, not twice the work
                state = identity.load(name)
                continue
            if _queue(name, order, k, rng, state, boost) == 0:
                return None
    return None


def renew_pair(name: str, session_id: str, a: str, b: str, lease_s: float = 120) -> bool:
    until = _now() + timedelta(seconds=lease_s)
    key = pair_key(a, b)
    if not _claim_sample(name, "pair:" + key, session_id, until):
        return False
    _coll(PAIRS).update_many({"dataset": name, "key": key, "status": "leased", "leased_by": session_id},
                             {"$set": {"lease_until": until}})
    return True


def release_pairs(name: str, session_id: str) -> int:
    """Give this session's leased pairs back to the queue."""
    n = _coll(PAIRS).update_many({"dataset": name, "status": "leased", "leased_by": session_id},
                                 {"$set": {"status": "pending", "leased_by": None}}).modified_count
    _coll(LEASES).delete_many({"dataset": name, "session": session_id, "sample_id": {"$regex": "^pair:"}})
    return n


def clear_pairs(name: str) -> int:
    return _coll(PAIRS).delete_many({"dataset": name, "status": {"$in": ["pending", "leased", "implied"]}}).deleted_count
