"""Label efficiency: retrieval mAP after one training round, as a function of operator answers.

A simulated operator answers only what a queue asks, from the ground truth, and after a budget of
answers the identity graph becomes training samples for ONE round (the same round config for
every arm), whose model is scored by retrieval mAP on identities the round never saw.

Sets (../shared/data, real data only):

  campus62  ``reid/campus62/train/`` ingested (core.services.ingest, re-ID folders) as per-camera tracklets:
            one tracklet = one identity seen by one camera (124 tracklets, 991 crops: one of the 992
            files is a byte-identical copy, skipped by the ingest), identities
            hidden (moved to a ``true_identity`` field, ``identity`` None). No time stamps, so no
            free cannot-links. Evaluated cross-camera on ``val/``: val/query against val/gallery,
            same-identity same-camera gallery crops removed, a query never its own file (content
            hash keys), as benchmarks/retrain_quality.py ``cross-cam``.
  mot       PETS09-S2L1 + TUD-Campus + TUD-Stadtmitte (core.services.ingest, MOT, every 5th frame of each
            track) with tracklets as a tracker gives them. Cut rule: the MOT15 ground truth has no
            gaps (occluded people are interpolated), so tracks are cut at crossings / occlusions:
            a frame is "crossed" when its box overlaps another box of that frame with IoU >= 0.3,
            and a track is cut wherever that state changes (before | during | after each crossing,
            a tracker losing or swapping the person there); fragments under 2 crops are dropped.
            Each fragment's ``frame_first`` / ``frame_last`` is its span in the ground truth, so the
            free cannot-links come from core.math.graph.overlapping (fragments seen at once).
            25 % of the true identities (first by sha1 of the name) are held out of the pool
            entirely; their crops are the evaluation: one query per fragment (its middle crop), the
            other held-out crops the gallery, a query never matching its own fragment.

Arms (all rounds: the same TrainConfig, from the packaged base model, seed = the run's seed):

  default   the pair queue's default order (core.math.pair_select.plan_pairs, "likely"),
            batches of 20, re-planned on the current graph after each batch; a pair the answers
            before it made implied is dropped unanswered (as core.services.labeling.pairs.next_pair does)
  random    the same candidates in random order ("random")
  per_crop  today's per-crop identity labelling: core.math.strategies.DEFAULT_STRATEGY over the crop
            embeddings with the labels typed so far (k=20 per batch, "verify" mode: only typed crops
            count as labelled); each answer types ONE crop's true identity, i.e. an operator name
            on that crop's node (tracklet) in the graph
  full      every true link (all nodes of one true identity joined): one round per seed

The queue's model stays "base" (the packaged ImageNet MobileNetV2) for every arm and every answer:
the dataset is embedded once with core.services.embedding.embed_dataset. The operator simulation runs in memory
on the product's own code (core.services.labeling.identity.load once per set, then IdentityGraph.link,
plan_pairs, implied, name_links, component_names), because the database-backed queue costs about
0.5 s per answer. A budget's graph becomes training samples as core.services.rounds.training_samples does:
a crop trains as its component's name (component_names), else as its own tracklet "~<tracklet>"
(core.services.labeling.identity.training_identity), identities with under 2 crops skipped; weights are 1
(no crop is flagged or scored here); the graph's cannot-links and the lone tracklets reach
train_round as core.services.rounds.run_round passes them (guaranteed negatives; lone tracklets are
negatives only within a camera). Budget 0 (tracklets alone) is one round per seed shared by
every arm; a budget whose training samples equal an earlier round's (the same seed) reuses it.

``answers_to_90``: the fewest answers (of the budgets) whose mean mAP over seeds reaches 90 % of
the full-label mAP (null: not within the budgets). Targets: the default reaches it with at most
5 % of the pool's crops as answers, and with at least 40 % fewer answers than random order.

    .venv/bin/python benchmarks/label_efficiency.py            # both sets, seeds 0 1 (~40 min, 2 cores)
    .venv/bin/python benchmarks/label_efficiency.py --quick    # campus62, seed 0 (< 10 min)
      [--sets campus62 mot] [--seeds 0 1] [--steps N] [--budgets 0 25 50 100 200 400]

Writes benchmarks/out/label_efficiency.json and .png; everything else goes to a temporary data
root (benchmarks/_common.isolate).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from _common import REPO, isolate, peak_rss_mb

ROOT = isolate("labeleff")

from tqdm import tqdm  # noqa: E402

from core.math import evaluate as ev  # noqa: E402
from core.data import store  # noqa: E402
from core.math import strategies
from core.config import settings, shared_data  # noqa: E402
from core.services.embedding import embed_dataset  # noqa: E402
from core.services.ingest import IngestReport, ingest, parse_gt  # noqa: E402
from core.services.labeling import identity  # noqa: E402
from core.math.graph import Link, component_names, name_links  # noqa: E402
from core.math.pair_select import DEFAULT_PAIR_ORDER, PAIR_ORDERS, CropMeta, plan_pairs  # noqa: E402
from core.services.labeling.pairs import implied  # noqa: E402
from core.model.train import TrainConfig, TrainingError, load_crops, train_round  # noqa: E402
from retrain_quality import embed_arrays  # noqa: E402  (the same embedding of a round's model)

log = logging.getLogger("label_efficiency")

OUT = REPO / "benchmarks" / "out"
ARMS = ("default", "random", "per_crop")
PAIR_ORDER = {"default": DEFAULT_PAIR_ORDER, "random": "random"}
BUDGETS = (0, 25, 50, 100, 200, 400)
BATCH = 20  # questions per planned batch (pair queue and per-crop queue alike)
EVERY_N = 5  # MOT: every 5th frame of each track becomes a crop
CROSS_IOU = 0.3  # MOT cut rule: a box overlapping another with this IoU is in a crossing
HELD_OUT = 0.25  # MOT: share of true identities held out for the evaluation
# One round for every arm. A step of the default round (P=8 x K=8 crops of 128x64, 10 frozen
# blocks) takes about 0.24 s on 2 free cores (core.model.train.TrainConfig: 1000 steps in about 4 min);
# a round's fixed part (decoding ~1000 crops, validation at start and end, the evaluation) about
# 8-10 s. 100 steps: ~35 s a round. Rounds whose samples repeat are reused (pair answers that are
# all "different" leave the training samples as they were), so the full run trains about 50-60
# rounds (2 sets x 2 seeds x at most 17): about 35 min, and --quick (campus62, one seed, about 10
# rounds) about 6 min. On a loaded machine (load average 5 on the 2 cores) one step measured 2.2 s.
STEPS = 100


def round_config(steps: int, seed: int) -> TrainConfig:
    """The default round, shortened: ``steps`` steps, one validation at the end (the round keeps
    the better of its start and its end by its own validation mAP, as every round does)."""
    return TrainConfig(steps=steps, eval_every=steps, patience=0, warmup_steps=min(20, max(1, steps // 5)),
                       seed=seed)


# ------------------------------------------------------------------------------------------ sets


@dataclass
class PoolSet:
    """One set as the simulation needs it: the graph of the ingested pool (tracklets, free
    cannot-links, no identity), its crops' vectors (base model), the truth per node, and how a
    round's model is scored."""

    name: str
    title: str
    state: Any  # core.services.labeling.identity.GraphState
    vectors: list  # per row of state.cols: base-model vector or None
    meta: CropMeta
    truth: dict[str, str]  # node -> true identity
    evaluate: Callable[[str], float]  # model version -> mAP
    describe: str
    eval_note: str
    rows_truth: list = field(default_factory=list)  # per row of state.cols: true identity

    @property
    def crops(self) -> int:
        return sum(len(r) for r in self.state.rows.values())


def _tag(*parts: Any) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:10]


def _finish_set(name: str, fields: dict[str, dict[str, Any]]) -> tuple[Any, list, CropMeta, dict, list]:
    """Write the pool's fields, embed it with the base model, load the graph once."""
    for f, vals in fields.items():
        store.set_values(name, f, vals)
    embed_dataset(name, version="base")
    state = identity.load(name)
    ef = store.embedding_field("base")
    vec_col = store.view_columns(name, [ef])[ef]
    assert vec_col is not None and len(vec_col) == len(state.cols["id"])
    cols = state.cols
    # exactly as core.services.labeling.pairs.compute_pairs builds it
    meta = CropMeta(camera=cols["camera"], flagged=[bool(f) for f in cols["flagged"]],
                    night=[bool(lo) or "night" in (t or ()) for lo, t in zip(cols["low_light"], cols["tags"])],
                    shadow=["shadow" in (t or ()) for t in cols["tags"]])
    true_col = store.view_columns(name, ["true_identity"])["true_identity"]
    truth: dict[str, str] = {}
    for node, ks in state.rows.items():
        ids = {true_col[k] for k in ks}
        assert len(ids) == 1, f"tracklet {node} holds several identities: {ids}"
        truth[node] = ids.pop()
    assert not any(cols["identity"]), "identities must be hidden"
    return state, vec_col, meta, truth, true_col


def build_campus62() -> PoolSet:
    root = shared_data() / "reid" / "campus62"
    name = "le_campus62"
    ingest(root / "train", "reid", name, pattern="campus62")
    cols = store.view_columns(name, ["identity", "camera"])
    fields: dict[str, dict[str, Any]] = {"true_identity": {}, "identity": {}, "tracklet": {}}
    for sid, ident, cam in zip(cols["id"], cols["identity"], cols["camera"]):
        fields["true_identity"][sid] = ident
        fields["identity"][sid] = None
        fields["tracklet"][sid] = f"c62/{_tag(ident, cam)}"  # opaque: names carry no identity
    state, vec, meta, truth, true_col = _finish_set(name, fields)

    def listing(d: Path):
        ps = sorted(d.glob("*/*.png"))
        keys = [hashlib.sha1(p.read_bytes()).hexdigest() for p in ps]
        return [str(p) for p in ps], [p.parent.name for p in ps], [p.stem[:2] for p in ps], keys

    q_p, q_i, q_c, q_s = listing(root / "val" / "query")
    g_p, g_i, g_c, g_s = listing(root / "val" / "gallery")

    def evaluate(version: str) -> float:
        e, _size = embed_arrays(version, lambda s: load_crops(q_p + g_p, s))
        m = ev.retrieval_metrics(e[: len(q_p)], q_i, e[len(q_p):], g_i, q_c, g_c, q_keys=q_s, g_keys=g_s)
        return float(m["mAP"])

    n_ids = len(set(truth.values()))
    return PoolSet(name, "campus62 train/ (per-camera tracklets) -> val/ cross-camera", state, vec, meta, truth,
                   evaluate, f"{state_crops(state)} crops, {len(state.rows)} tracklets, {n_ids} identities",
                   f"val/query {len(q_p)} vs val/gallery {len(g_p)} (12 other identities), cross-camera",
                   list(true_col))


def state_crops(state) -> int:
    return sum(len(r) for r in state.rows.values())


def _iou(a, b) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def cut_tracks(seq: Path) -> tuple[dict[tuple[int, int], int], dict[tuple[int, int], tuple[int, int]]]:
    """The tracker's fragments of one sequence: (track, frame) -> fragment index, and
    (track, fragment) -> (first, last) frame (see the module docstring for the rule)."""
    boxes = parse_gt(seq / "gt" / "gt.txt", IngestReport(str(seq), "mot", "bench"))
    by_frame: dict[int, list] = {}
    by_track: dict[int, list] = {}
    for b in boxes:
        by_frame.setdefault(b.frame, []).append(b)
        by_track.setdefault(b.track, []).append(b)
    frag_of, span = {}, {}
    for t, bs in by_track.items():
        bs.sort(key=lambda b: b.frame)
        k, prev = 0, None
        for b in bs:
            crossed = any(o.track != t and _iou(b.box, o.box) >= CROSS_IOU for o in by_frame[b.frame])
            if prev is not None and crossed != prev:
                k += 1
            prev = crossed
            frag_of[(t, b.frame)] = k
            f0, f1 = span.get((t, k), (b.frame, b.frame))
            span[(t, k)] = (min(f0, b.frame), max(f1, b.frame))
    return frag_of, span


def build_mot() -> PoolSet:
    base = shared_data() / "mot"
    name = "le_mot"
    seqs = [base / s for s in ("PETS09-S2L1", "TUD-Campus", "TUD-Stadtmitte")]
    for seq in seqs:
        ingest(seq, "mot", name, every_n=EVERY_N)
    cols = store.view_columns(name, ["identity", "source", "sequence", "track", "frame", "filepath"])
    cuts = {str(seq): cut_tracks(seq) for seq in seqs}
    frag = []
    for src, seqname, t, f in zip(cols["source"], cols["sequence"], cols["track"], cols["frame"]):
        frag_of, _span = cuts[src]
        frag.append((seqname, t, frag_of[(t, f)]))
    sizes: dict[tuple, int] = {}
    for fr in frag:
        sizes[fr] = sizes.get(fr, 0) + 1
    ids = sorted(set(cols["identity"]), key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    held = set(ids[: int(round(HELD_OUT * len(ids)))])
    n_frags_all = sum(len(span) for _frag_of, span in cuts.values())
    drop, q_rows, g_rows = [], [], []
    fields: dict[str, dict[str, Any]] = {"true_identity": {}, "identity": {}, "tracklet": {}, "frame_first": {},
                                         "frame_last": {}}
    held_by_frag: dict[tuple, list[int]] = {}
    for k, sid in enumerate(cols["id"]):
        if sizes[frag[k]] < 2:
            drop.append(sid)
            continue
        if cols["identity"][k] in held:
            held_by_frag.setdefault(frag[k], []).append(k)
            drop.append(sid)
            continue
        seqname, t, fk = frag[k]
        f0, f1 = cuts[cols["source"][k]][1][(t, fk)]
        fields["true_identity"][sid] = cols["identity"][k]
        fields["identity"][sid] = None
        fields["tracklet"][sid] = f"{seqname}/{_tag(seqname, t, fk)}"  # opaque, like a tracker's ids
        fields["frame_first"][sid], fields["frame_last"][sid] = f0, f1
    for fr, ks in held_by_frag.items():
        ks.sort(key=lambda k: cols["frame"][k])
        qk = ks[len(ks) // 2]
        q_rows.append(qk)
        g_rows.extend(k for k in ks if k != qk)
    ds = store.get_dataset(name)
    ds.delete_samples(drop)  # held-out identities and 1-crop fragments are not in the pool at all
    state, vec, meta, truth, true_col = _finish_set(name, fields)
    q_p, g_p = [cols["filepath"][k] for k in q_rows], [cols["filepath"][k] for k in g_rows]
    q_i, g_i = [cols["identity"][k] for k in q_rows], [cols["identity"][k] for k in g_rows]
    q_s, g_s = [str(frag[k]) for k in q_rows], [str(frag[k]) for k in g_rows]

    def evaluate(version: str) -> float:
        e, _size = embed_arrays(version, lambda s: load_crops(q_p + g_p, s))
        m = ev.retrieval_metrics(e[: len(q_p)], q_i, e[len(q_p):], g_i, q_keys=q_s, g_keys=g_s)
        return float(m["mAP"])

    scored = sum(1 for i, s in zip(q_i, q_s) if any(gi == i and gs != s for gi, gs in zip(g_i, g_s)))
    n_ids = len(set(truth.values()))
    kept_frags = {fr for fr, n in sizes.items() if n >= 2}
    return PoolSet(
        name, "PETS09-S2L1 + TUD (tracks cut at crossings) -> held-out identities", state, vec, meta, truth,
        evaluate, f"{state_crops(state)} crops, {len(state.rows)} fragments, {n_ids} identities "
                  f"({len(cols['id'])} crops ingested, {n_frags_all} fragments cut at IoU >= {CROSS_IOU}, "
                  f"{len(kept_frags)} of 2+ crops; {len(state.graph.cannot_pairs())} free cannot-links)",
        f"{len(held)} held-out identities: {len(q_p)} queries (one per fragment, {scored} with another "
        f"fragment to find) vs {len(g_p)} gallery crops", list(true_col))


# ------------------------------------------------------------------------------------ simulation


def training_samples(S: PoolSet, g, names_in: dict[str, str]) -> tuple[list, list]:
    """What core.services.rounds makes of graph ``g``: (path, identity, camera, 1.0) per crop as
    training_samples does, and the cannot-linked identity pairs (identity.cannot_identities)."""
    cols = S.state.cols
    comp = component_names(g, {}, {n: len(r) for n, r in S.state.rows.items()}, strong=names_in)
    ident = [None] * len(cols["id"])
    for node, ks in S.state.rows.items():
        for k in ks:
            ident[k] = identity.training_identity(comp.get(node), cols["tracklet"][k])
    n_of: dict[str, int] = {}
    for i in ident:
        if i:
            n_of[i] = n_of.get(i, 0) + 1
    samples = [(cols["filepath"][k], ident[k], cols["camera"][k], 1.0) for k in range(len(ident))
               if ident[k] and n_of[ident[k]] >= 2]
    return samples, identity.cannot_identities(SimpleNamespace(graph=g, names=comp))


def full_graph(S: PoolSet):
    g = copy.deepcopy(S.state.graph)
    by_id: dict[str, list[str]] = {}
    for node in sorted(S.truth):
        by_id.setdefault(S.truth[node], []).append(node)
    for nodes in by_id.values():
        for n in nodes[1:]:
            assert g.link(Link(nodes[0], n, True, "operator")) is None
    return g


def n_true(S: PoolSet) -> int:
    return len(set(S.truth.values()))


def simulate_pairs(S: PoolSet, arm: str, seed: int, budgets: list[int]):
    """Yield (budget, answers given, graph snapshot, names) for the pair queue in ``arm``'s order."""
    g = copy.deepcopy(S.state.graph)
    rng = np.random.default_rng(1000 + seed)
    answered_log: list[tuple[str, str]] = []
    decided: list[tuple[float, bool]] = []
    pending: list[dict] = []
    view = SimpleNamespace(graph=g, confirmed=g)
    n, exhausted = 0, False

    def answered() -> set:  # as core.services.labeling.pairs._answered: current roots of each answered pair
        out = set()
        for a, b in answered_log:
            ra, rb = g.find(a), g.find(b)
            out.add((ra, rb) if ra < rb else (rb, ra))
        return out

    for budget in budgets:
        while n < budget and not exhausted:
            if not pending:
                pending = plan_pairs(g, S.state.rows, S.vectors, S.meta, answered(), decided,
                                     order=PAIR_ORDER[arm], k=BATCH, rng=rng)
                if not pending:
                    exhausted = True
                    break
            c = pending.pop(0)
            if implied(view, c["a"], c["b"], answered()):
                continue  # made implied by an earlier answer: dropped, as next_pair does
            same = S.truth[c["a"]] == S.truth[c["b"]]
            conflict = g.link(Link(c["a"], c["b"], same, "operator"))
            assert conflict is None, conflict.describe()
            answered_log.append((c["a"], c["b"]))
            decided.append((float(c["cosine"]), same))
            n += 1
            if len(g.components()) == n_true(S):
                exhausted = True  # every true link is in: nothing left to learn
        yield budget, n, copy.deepcopy(g), {}


def simulate_per_crop(S: PoolSet, seed: int, budgets: list[int]):
    """Yield (budget, answers, graph, names) for per-crop identity labelling (the old queue)."""
    cols = S.state.cols
    rows = sorted(k for ks in S.state.rows.values() for k in ks if S.vectors[k] is not None)
    X = np.stack([np.asarray(S.vectors[k], np.float32) for k in rows])
    tags = [set(cols["tags"][k] or ()) for k in rows]
    # the condition boost exactly as core.services.labeling.queue.compute_batch builds it
    boost = (np.array([bool(cols["low_light"][k]) for k in rows]) | np.array(["night" in t for t in tags])).astype(float)
    boost += np.array(["shadow" in t for t in tags], float)
    boost += np.array([bool(cols["flagged"][k]) for k in rows], float)
    labelled = np.zeros(len(rows), bool)
    labels = np.array([None] * len(rows), dtype=object)
    typed: dict[str, str] = {}  # node -> the name typed on one of its crops
    pending: list[int] = []
    n, batch_no = 0, 0
    for budget in budgets:
        while n < budget and (pending or not labelled.all()):
            if not pending:
                batch_no += 1
                sel = strategies.select(strategies.DEFAULT_STRATEGY, X, labelled, labels, BATCH,
                                        rng=np.random.default_rng(seed * 1_000_003 + batch_no), boost=boost)
                pending = [int(j) for j in sel.indices]
                if not pending:
                    break
            j = pending.pop(0)
            k = rows[j]
            labelled[j], labels[j] = True, S.rows_truth[k]  # the operator types the true identity
            typed[S.state.node_of_row(k)] = S.rows_truth[k]
            n += 1
        g = copy.deepcopy(S.state.graph)
        for ln in name_links(typed, "operator"):  # as core.math.graph.build applies typed names
            assert g.link(ln) is None
        yield budget, n, g, dict(typed)


# ------------------------------------------------------------------------------------------ rounds


class Rounds:
    """Trains and scores rounds; the same training samples at the same seed reuse a result."""

    def __init__(self, S: PoolSet, steps: int, bar):
        self.S, self.steps, self.bar = S, steps, bar
        self.cache: dict[str, float | None] = {}
        self.seconds: list[float] = []
        self.n = 0

    def map_of(self, trained, seed: int, label: str) -> float | None:
        samples, cannot = trained
        key = _tag(seed, json.dumps(sorted((p, i) for p, i, _c, _w in samples)), json.dumps(sorted(cannot)))
        if key not in self.cache:
            t0 = time.perf_counter()
            self.n += 1
            version = f"le-{self.S.name}-{self.n}"
            out_dir = settings().models_dir / version
            self.bar.set_postfix_str(f"{label}: {len({s[1] for s in samples})} ids")
            try:
                train_round(samples, round_config(self.steps, seed), init_version="base", out_dir=out_dir,
                            cannot=cannot, open_identities=[i for _p, i, _c, _w in samples if identity.is_lone(i)])
                self.cache[key] = self.S.evaluate(version)
            except TrainingError as exc:
                log.warning("%s: no round (%s)", label, exc)
                self.cache[key] = None
            shutil.rmtree(out_dir, ignore_errors=True)
            self.seconds.append(time.perf_counter() - t0)
        self.bar.update(1)
        return self.cache[key]


def merge_curves(S: PoolSet, seeds: list[int], budgets: list[int]) -> dict[str, dict[str, list]]:
    """Share of the pool's true merges found after each budget, per pair order (every order of
    core.math.pair_select, not only the trained arms) and per-crop labelling: simulation
    only, no round (the evidence for the default order, from the training pool's truth)."""
    start, n_ids = len(S.state.graph.components()), n_true(S)
    out: dict[str, dict[str, list]] = {}
    for order in (*PAIR_ORDERS, "per_crop"):
        PAIR_ORDER.setdefault(order, order)
        out[order] = {str(b): [] for b in budgets}
        for seed in seeds:
            gen = simulate_per_crop(S, seed, budgets) if order == "per_crop" else simulate_pairs(S, order, seed, budgets)
            for budget, _n, g, _names in gen:
                out[order][str(budget)].append((start - len(g.components())) / max(1, start - n_ids))
    return out


def run_set(S: PoolSet, seeds: list[int], budgets: list[int], steps: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    base_map = S.evaluate("base")
    positive = [b for b in budgets if b > 0]
    total = len(seeds) * (2 + len(ARMS) * len(positive))
    curves: dict[str, dict[str, list]] = {a: {str(b): [] for b in budgets} for a in ARMS}
    answers: dict[str, dict[str, list]] = {a: {str(b): [] for b in positive} for a in ARMS}
    fulls: list[float | None] = []
    sim_s = 0.0
    with tqdm(total=total, desc=S.name, unit="round", dynamic_ncols=True) as bar:
        R = Rounds(S, steps, bar)
        for seed in seeds:
            zero = R.map_of(training_samples(S, S.state.graph, {}), seed, f"seed {seed} budget 0")
            fulls.append(R.map_of(training_samples(S, full_graph(S), {}), seed, f"seed {seed} full"))
            for arm in ARMS:
                if 0 in budgets:
                    curves[arm]["0"].append(zero)
                ts = time.perf_counter()
                gen = simulate_per_crop(S, seed, positive) if arm == "per_crop" else simulate_pairs(S, arm, seed, positive)
                for budget, n, g, names in gen:
                    sim_s += time.perf_counter() - ts
                    curves[arm][str(budget)].append(R.map_of(training_samples(S, g, names), seed,
                                                             f"seed {seed} {arm} {budget}"))
                    answers[arm][str(budget)].append(n)
                    ts = time.perf_counter()
    full_map = float(np.mean([f for f in fulls if f is not None])) if any(f is not None for f in fulls) else None
    need = {}
    for arm in ARMS:
        need[arm] = None
        if full_map is None:
            continue
        for b in budgets:
            vals = [v for v in curves[arm][str(b)] if v is not None]
            if vals and len(vals) == len(curves[arm][str(b)]) and np.mean(vals) >= 0.9 * full_map:
                need[arm] = int(b)
                break
    merges = merge_curves(S, seeds, positive)
    return {"merges_found": merges, "title": S.title, "pool": S.describe, "evaluation": S.eval_note, "crops": S.crops,
            "tracklets": len(S.state.rows), "identities": n_true(S), "base_map": base_map,
            "full_map": full_map, "full_map_per_seed": fulls, "answers_to_90": need, "curves": curves,
            "answers_given": answers, "rounds_trained": R.n, "round_seconds_mean": float(np.mean(R.seconds)) if R.seconds else None,
            "simulation_seconds": sim_s, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ report


def targets(res: dict[str, Any], max_budget: int) -> dict[str, Any]:
    """The issue's two targets for the default order (see the module docstring)."""
    d, r = res["answers_to_90"]["default"], res["answers_to_90"]["random"]
    cap = 0.05 * res["crops"]
    out: dict[str, Any] = {"five_percent_of_crops": cap, "default_within_5_percent": d is not None and d <= cap,
                           "fewer_than_random": None, "default_40_percent_fewer_than_random": False, "note": ""}
    if d is None:
        out["note"] = "default does not reach 90 % within the budgets"
    elif r is None:  # random needs more than the largest budget
        out["fewer_than_random"] = 1 - d / max_budget
        out["default_40_percent_fewer_than_random"] = d <= 0.6 * max_budget
        out["note"] = f"random not within {max_budget} answers: default needs at least {1 - d / max_budget:.0%} fewer"
    elif r == 0:
        out["note"] = "tracklets alone (0 answers) already reach 90 %: no order can do better"
    else:
        out["fewer_than_random"] = 1 - d / r
        out["default_40_percent_fewer_than_random"] = d <= 0.6 * r
    return out


def print_set(name: str, res: dict[str, Any], budgets: list[int]) -> None:
    fm = res["full_map"]
    print(f"\n== {name}: {res['title']}")
    print(f"   pool: {res['pool']}")
    print(f"   evaluation: {res['evaluation']}")
    print(f"   mAP: base model (no round) {100 * res['base_map']:.1f} %; full labels "
          + (f"{100 * fm:.1f} % (seeds {', '.join(f'{100 * f:.1f}' if f is not None else '-' for f in res['full_map_per_seed'])}); "
             f"90 % of it: {90 * fm:.1f} %" if fm is not None else "-"))
    print(f"   mean mAP (%) over {len(res['full_map_per_seed'])} seed(s) after one round; answers actually given "
          "in brackets where the queue stopped short (graph complete or nothing left to ask)")
    print(f"   {'answers':>8s}" + "".join(f"{a:>16s}" for a in ARMS))
    for b in budgets:
        cells = []
        for a in ARMS:
            vals = res["curves"][a][str(b)]
            ok = [v for v in vals if v is not None]
            cell = "-" if not ok else f"{100 * np.mean(ok):.1f}"
            if len(ok) > 1:
                cell += f"±{100 * np.std(ok):.1f}"
            given = res["answers_given"].get(a, {}).get(str(b))
            if given and min(given) < b:
                cell += f" [{min(given)}]"
            cells.append(cell)
        print(f"   {b:>8d}" + "".join(f"{c:>16s}" for c in cells))
    if fm is not None:
        print(f"   {'full':>8s}{100 * fm:>16.1f}  (every true link, all arms)")
    need = res["answers_to_90"]
    print("   answers to reach 90 % of full-label mAP: " + ", ".join(
        f"{a} {need[a] if need[a] is not None else '> ' + str(max(budgets))}" for a in ARMS))
    t = res["targets"]
    d, r = need["default"], need["random"]
    print(f"   target 1 (default <= 5 % of the pool's {res['crops']} crops = {t['five_percent_of_crops']:.0f} answers): "
          f"{'MET' if t['default_within_5_percent'] else 'NOT MET'} (default {d if d is not None else 'not reached'})")
    rel = ("-" if t["fewer_than_random"] is None else f"{100 * t['fewer_than_random']:.0f} % fewer"
           + (" at least" if r is None else ""))
    print(f"   target 2 (default >= 40 % fewer answers than random): "
          f"{'MET' if t['default_40_percent_fewer_than_random'] else 'NOT MET'} (default {d}, random {r}: {rel})"
          + (f"; {t['note']}" if t["note"] else ""))
    mc = res["merges_found"]
    print("   true merges found (share of the pool's; simulation only, no round), per order:")
    print(f"   {'answers':>8s}" + "".join(f"{o:>13s}" for o in mc))
    for b in [b for b in budgets if b > 0]:
        print(f"   {b:>8d}" + "".join(f"{100 * np.mean(mc[o][str(b)]):>12.0f}%" for o in mc))
    print(f"   {res['rounds_trained']} rounds trained (others reused: same samples, same seed), "
          f"{res['round_seconds_mean']:.0f} s per round with its evaluation; simulation "
          f"{res['simulation_seconds']:.1f} s; set total {res['seconds']:.0f} s")


def plot(results: dict[str, Any], budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    style = {"default": dict(lw=2.4, marker="o"), "random": dict(lw=1.6, ls="--", marker="s"),
             "per_crop": dict(lw=1.6, ls="-.", marker="^")}
    for ax, (name, res) in zip(axes[0], results.items()):
        for a in ARMS:
            xs, ys = [], []
            for b in budgets:
                ok = [v for v in res["curves"][a][str(b)] if v is not None]
                if ok:
                    xs.append(b)
                    ys.append(100 * np.mean(ok))
            ax.plot(xs, ys, label=a, **style[a])
        if res["full_map"] is not None:
            ax.axhline(100 * res["full_map"], color="k", lw=1, label="full labels")
            ax.axhline(90 * res["full_map"], color="grey", lw=0.8, ls=":", label="90 % of full")
        ax.axvline(0.05 * res["crops"], color="tab:red", lw=0.8, ls=":", label="5 % of pool crops")
        ax.axhline(100 * res["base_map"], color="tab:brown", lw=0.8, ls="--", label="base model, no round")
        ax.set_xscale("symlog", linthresh=25)
        ax.set_xticks(budgets)
        ax.set_xticklabels([str(b) for b in budgets])
        ax.set_xlabel("operator answers")
        ax.set_ylabel("retrieval mAP after one round (%)")
        ax.set_title(f"{name} ({len(res['full_map_per_seed'])} seed(s), {res['crops']} crops)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="campus62, seed 0 (under 10 minutes)")
    ap.add_argument("--sets", nargs="+", choices=["campus62", "mot"], default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--steps", type=int, default=STEPS, help="training steps of every round")
    ap.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not (shared_data() / "reid" / "campus62").is_dir() or not (shared_data() / "mot").is_dir():
        sys.exit(f"real data not available: {shared_data()} (needs reid/campus62 and mot/; see ../shared/data/README.md)")
    sets = a.sets or (["campus62"] if a.quick else ["campus62", "mot"])
    seeds = a.seeds or ([0] if a.quick else [0, 1])
    budgets = sorted(set(a.budgets) | {0})
    cfg = round_config(a.steps, seeds[0])
    print(f"round (every arm, every budget): {cfg.steps} steps, P={cfg.ids_per_batch} x K={cfg.samples_per_id}, "
          f"{cfg.crop_size[0]}x{cfg.crop_size[1]}, {cfg.frozen_blocks} frozen blocks, lr {cfg.lr}, validation every "
          f"{cfg.eval_every} steps (the better of start and end kept), from 'base', seed = the run's seed")
    print(f"queue model: 'base' for every arm; batches of {BATCH}; arms {', '.join(ARMS)} + full labels; "
          f"budgets {budgets}; seeds {seeds}; sets {sets}")
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for name in sets:
        ts = time.perf_counter()
        S = build_campus62() if name == "campus62" else build_mot()
        print(f"{name}: pool ready in {time.perf_counter() - ts:.0f} s (ingest, base embedding, graph): {S.describe}",
              flush=True)
        setup_s = time.perf_counter() - ts
        res = run_set(S, seeds, budgets, a.steps)
        res["setup_seconds"] = setup_s
        res["targets"] = targets(res, max(budgets))
        results[name] = res
        print_set(name, res, budgets)
    OUT.mkdir(parents=True, exist_ok=True)
    png = OUT / "label_efficiency.png"
    plot(results, budgets, png)
    doc = {"sets": results, "config": {"train": cfg.to_dict(), "batch": BATCH, "budgets": budgets, "seeds": seeds,
                                       "arms": list(ARMS), "queue_model": "base", "mot_every_n": EVERY_N,
                                       "mot_cut_iou": CROSS_IOU, "mot_held_out": HELD_OUT, "quick": a.quick},
           "seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb()}
    js = OUT / "label_efficiency.json"
    js.write_text(json.dumps(doc, indent=2, default=float))
    print(f"\nplot: {png.relative_to(REPO)}; results: {js.relative_to(REPO)}")
    print(f"total wall time {time.perf_counter() - t0:.0f} s, peak memory {peak_rss_mb():.0f} MB "
          "(2 shared cores: times are noisy)")
    for name in list(results):
        store.delete_dataset(f"le_{name}")
    for d in ("media", "models"):  # the database folder stays with its server (temporary root)
        shutil.rmtree(ROOT / d, ignore_errors=True)


if __name__ == "__main__":
    main()
