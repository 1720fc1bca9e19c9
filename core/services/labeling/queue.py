"""The queue: how it is computed (:class:`QueueSpec`, :func:`compute_batch` with a strategy of
:mod:`core.math.strategies`), stored, counted and cleared, and refilled in the background when few
unserved items are left."""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, Iterable, Sequence

import numpy as np

from core.data import store
from core.math import strategies
from core.services.labeling.base import ITEMS, QUEUES, TO_LABEL, LabelingError, _aware, _coll, _ensure, _now
from core.services.labeling.schema import MODES, label_schema
from core.services.labeling.vectors import _load

log = logging.getLogger(__name__)

TARGETS = ("identity", "label")


@dataclass(frozen=True)
class QueueSpec:
    """How a queue is computed. ``target``: the field labelled ("identity" or "label");
    ``mode``: "verify" | "trust" (see :mod:`core.services.labeling`); ``view_ids``: restrict candidates to
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


def _decided(mode: str, target_value: Any, labelled_by: Any) -> bool:
    return labelled_by is not None or (mode == "trust" and target_value is not None)


def person_threshold(name: str, version: str) -> float | None:
    """The operating threshold of ``version``'s person-ness head (the score that kept 99 % of the
    round's persons), from its registry record, else its checkpoint; None without a head."""
    from core.services import registry

    try:
        head = ((registry.get(name, version).get("train") or {}).get("person")) or None
    except registry.RegistryError:
        head = None
    if head is None:
        from core.model import embed

        try:
            head = embed.person_head(version)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint: the queue uses 0.5 and says so
            log.warning("%s: cannot read the person-ness threshold of %s", name, version, exc_info=True)
    thr = (head or {}).get("threshold")
    return float(thr) if thr is not None and np.isfinite(thr) else None


def sample_scores(name: str, data: dict[str, Any], keep: np.ndarray) -> dict[str, Any]:
    """Options for a strategy in :data:`strategies.NEEDS_SAMPLE_SCORES`, from the loaded
    ``data`` (rows ``keep``): ``person`` (the active version's person-ness, None where missing;
    None when no sample has one), ``person_threshold`` and ``det_score`` (the strategy turns the
    missing ones into NaN)."""
    rows = lambda f: None if data.get(f) is None else [data[f][i] for i in keep]  # noqa: E731
    person, det = rows(store.person_field(data["version"])), rows("det_score")
    has_head = person is not None and any(v is not None for v in person)
    return {"person": person if has_head else None, "det_score": det,
            "person_threshold": person_threshold(name, data["version"]) if has_head else None}


def compute_batch(name: str, spec: QueueSpec, exclude: Iterable[str] = ()) -> Batch:
    """The next ``spec.k`` samples to label (nothing stored).

    Arrays handed to the strategy: labelled samples with a target value (its labels) plus the
    candidates (embedded, in the view, not decided, not in ``exclude``); decided samples without
    a target value (e.g. "shadow/noise" with no identity) and excluded ones are left out.
    The condition boost adds 1 for each of low light / night, shadow and operator flag. A
    strategy that reads per-sample scores (``personness``) gets them from :func:`sample_scores`."""
    spec.validate()
    fields = [spec.target, "labelled_by", "low_light", "tags", "flagged", "identity", "label", "camera", "filepath"]
    scored = spec.strategy in strategies.NEEDS_SAMPLE_SCORES
    if scored and store.active_model(name):
        fields += [store.person_field(store.active_model(name)), "det_score"]
    data = _load(name, fields)
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
    options = sample_scores(name, data, keep) if scored else {}
    sel = strategies.select(spec.strategy, X[keep], labelled, labels, spec.k, rng, boost=boost, **options)
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
    store.insert_missing(_coll(ITEMS), {
        f"{name}|{spec.key}|{r.sample_id}": {
            "dataset": name, "queue": spec.key, "sample_id": r.sample_id, "batch": batch_no, "rank": r.rank,
            "score": r.score, "reason": r.reason, "strategy": batch.strategy, "model": batch.version,
            "status": "pending", "leased_by": None, "lease_until": None, "served_to": [], "created_at": now}
        for r in batch.rows})
    log.info("%s: queue %s batch %d: %d items (%s, %d labelled, %d candidates)", name, spec.key,
             batch_no, len(batch.rows), batch.strategy, batch.n_labelled, batch.n_candidates)
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
