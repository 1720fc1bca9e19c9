"""One retraining round end to end, as the ``train`` background job runs it:

register a version → gather labelled crops (flagged and uncertain ones weighted up) → train
(:func:`core.model.train.train_round`) → export ONNX → re-embed the dataset → lay out its map aligned
to the active one → evaluate the previous and the new version on the same held-out split →
write the round report → mark the version ready. A failed or cancelled round is recorded as such
and never changes the active version: activating is the operator's decision.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.services import analysis, registry
from core.services.round_report import plain, person_summary, proposal_nodes, pseudo_summary, write_report
from core.model import device
from core.math import personness
from core.data import store
from core.services.labeling import identity as graph_identity

log = logging.getLogger(__name__)

HELD_OUT_SHARE = 0.2  # identities held out for evaluation when the dataset has no query/gallery tags
MIN_HELD_OUT = 3


@dataclass
class EvalSplit:
    """Query and gallery sample ids (disjoint identities from training).

    ``q_keys`` / ``g_keys`` align with ``query`` / ``gallery``: a crop's tracklet (its sample id
    when it has none). A query never finds a gallery crop with its own key, so neither itself
    (a file tagged both query and gallery) nor another crop of its own tracklet counts as a
    match. ``problem`` says why the split is empty (None when it has queries)."""

    query: list[str]
    gallery: list[str]
    identities: set[str]
    protocol: str
    q_keys: list[str] = field(default_factory=list)
    g_keys: list[str] = field(default_factory=list)
    problem: str | None = None


def _held_out(identity: str, share: float) -> bool:
    h = int(hashlib.sha1(identity.encode()).hexdigest()[:8], 16)
    return (h % 1000) / 1000 < share


def _scorable(query: list[int], gallery: list[int], ident: list, key: list) -> list[int]:
    """The queries whose identity has a gallery crop under another key (something to find)."""
    keys_of: dict[Any, set] = {}
    for k in gallery:
        keys_of.setdefault(ident[k], set()).add(key[k])
    return [k for k in query if keys_of.get(ident[k], set()) - {key[k]}]


def _identities(cols: dict[str, list]) -> list[str | None]:
    """Each sample's training identity from the identity graph: its identity, else its own
    tracklet (a lone tracklet is one person), else None; non-person crops and images: None."""
    return [graph_identity.training_identity(i, tr) if graph_identity.is_person(lb, kd) else None
            for i, tr, lb, kd in zip(cols["identity"], cols["tracklet"], cols["label"], cols["kind"])]


ROUND_FIELDS = ["filepath", "identity", "tags", "tracklet", "frame", "label", "kind", "camera", "flagged",
                "mis_score", "uncertainty", "embed_error", "low_light"]


def round_columns(name: str) -> dict[str, list]:
    """The columns a round reads (:data:`ROUND_FIELDS`, ``id``), in one pass: the split, the
    training crops, the classed crops and the evaluation's metadata all come from this one read,
    so they describe the same moment of a dataset operators keep labelling."""
    return store.view_columns(name, ROUND_FIELDS)


def eval_split(cols: dict[str, list]) -> EvalSplit:
    """query/gallery tags when the dataset has them (re-ID folders); otherwise identities held out
    by a stable hash, each tracklet's middle crop a query and the identity's other crops the
    gallery. Held out are identities seen in more than one tracklet (or crop) when at least
    MIN_HELD_OUT + 3 are, else any. When no held-out identity spans two tracklets (lone
    tracklets, before any pair answer), each held-out tracklet of 4+ crops is cut in two halves
    by frame that find each other ("within tracklet": tracklets alone make a round). Either way a query is scored only against crops outside its
    own tracklet (half), and only when its identity has such a crop (see :class:`EvalSplit`).
    ``cols``: :func:`round_columns`."""
    ids = cols["id"]
    ident = _identities(cols)
    key = [tr or sid for tr, sid in zip(cols["tracklet"], ids)]
    tags = [set(t or ()) for t in cols["tags"]]

    def split(query: list[int], gallery: list[int], held: set[str], protocol: str, problem: str) -> EvalSplit:
        query = _scorable(query, gallery, ident, key)
        return EvalSplit([ids[k] for k in query], [ids[k] for k in gallery], held, protocol,
                         [key[k] for k in query], [key[k] for k in gallery], None if query else problem)

    q = [k for k, t in enumerate(tags) if "query" in t and ident[k]]
    g = [k for k, t in enumerate(tags) if "gallery" in t and ident[k]]
    if q and g:
        held = {ident[k] for k in q + g}
        return split(q, g, held, "query/gallery tags",
                     "no query crop has a gallery crop of its identity outside its own tracklet: tag "
                     "gallery crops of the query identities (other files, other tracklets)")
    keys_of: dict[str, set] = {}
    for i, kk in zip(ident, key):
        if i:
            keys_of.setdefault(i, set()).add(kk)
    known = sorted(keys_of)
    multi = [i for i in known if len(keys_of[i]) > 1]
    pool = multi if len(multi) >= MIN_HELD_OUT + 3 else known
    held_list = [i for i in pool if _held_out(i, HELD_OUT_SHARE)]
    if len(held_list) < MIN_HELD_OUT:
        held_list = pool[:MIN_HELD_OUT] if len(pool) > MIN_HELD_OUT + 2 else []
    held = set(held_list)
    if not held:
        return EvalSplit([], [], held, "none", problem=(
            f"only {len(known)} identities are labelled: a round holds out {MIN_HELD_OUT} of them to "
            f"evaluate and trains on the rest; label at least {MIN_HELD_OUT + 3} people (Annotate page)"))
    by_track: dict[tuple, list[int]] = {}
    for k in range(len(ids)):
        if ident[k] in held:
            by_track.setdefault((ident[k], key[k]), []).append(k)
    halves = not any(len(keys_of[i]) > 1 for i in held)
    if halves:  # lone tracklets only: each held-out tracklet's two halves find each other
        for (i, kk), ks in list(by_track.items()):
            if len(ks) >= 4:
                ks.sort(key=lambda k: cols["frame"][k] or 0)
                del by_track[(i, kk)]
                for part, sub in (("#1", ks[:len(ks) // 2]), ("#2", ks[len(ks) // 2:])):
                    for k in sub:
                        key[k] = f"{kk}{part}"
                    by_track[(i, key[sub[0]])] = sub
    query, gallery = [], []
    for ks in by_track.values():
        ks.sort(key=lambda k: cols["frame"][k] or 0)
        qk = ks[len(ks) // 2]
        query.append(qk)
        gallery.extend(k for k in ks if k != qk)
    protocol = (f"{len(held)} tracklets held out by hash, within tracklet: each half finds the other (no "
                "held-out identity is seen in two tracklets yet)" if halves
                else f"{len(held)} identities held out by hash")
    return split(query, gallery, held, protocol,
                 f"none of the {len(held)} held-out identities ({', '.join(sorted(held)[:5])}) is seen in "
                 "more than one tracklet, and their tracklets are too short (under 4 crops) to split in "
                 "halves, so a query would have only its own tracklet to find: label the "
                 "same person in another tracklet or camera (Annotate page, pairs), or tag query and "
                 "gallery crops")


def training_samples(cols: dict[str, list], exclude_identities: set[str]) -> list[tuple[str, str, str | None, float]]:
    """(path, identity, camera, weight) of person crops outside the evaluation identities, one
    training identity per component of the identity graph with at least two crops (an unnamed
    lone tracklet trains as itself, see :func:`_identities`); flagged samples weigh 3x,
    misclustered/uncertain ones up to 2x more. ``cols``: :func:`round_columns`."""
    ident_of = _identities(cols)
    n_of = Counter(i for i in ident_of if i)
    out = []
    for k in range(len(cols["id"])):
        ident = ident_of[k]
        if not ident or ident in exclude_identities or cols["embed_error"][k] or n_of[ident] < 2:
            continue
        w = 1.0 + min(1.0, float(cols["mis_score"][k] or 0.0)) + 0.5 * float(cols["uncertainty"][k] or 0.0)
        if cols["flagged"][k]:
            w *= 3.0
        out.append((cols["filepath"][k], ident, cols["camera"][k], w))
    return out


@dataclass
class RoundPreview:
    """What a round would train on and hold out now (the Train page's summary): training
    identities and crops (``lone``: identities that are lone tracklets nobody joined), the
    held-out identities, the split's protocol and, when a round could not be judged, why."""

    identities: int
    crops: int
    lone: int
    held_out: int
    protocol: str
    problem: str | None


def preview(name: str) -> RoundPreview:
    """:class:`RoundPreview` from :func:`round_columns`, :func:`eval_split` and
    :func:`training_samples`, as a round would compute them; with Python's cyclic collector
    paused (:func:`core.data.store.no_gc`: at 100k crops 1.4 s against 2.6 s)."""
    with store.no_gc():
        cols = round_columns(name)
        split = eval_split(cols)
        samples = training_samples(cols, split.identities)
        ids = {s[1] for s in samples}
        return RoundPreview(len(ids), len(samples), sum(1 for i in ids if graph_identity.is_lone(i)),
                            len(split.identities), split.protocol, split.problem)


MAX_CLASS_CROPS = 2000  # per side: the head is small, more crops mostly cost feature time


def class_samples(cols: dict[str, list], seed: int = 0) -> list[tuple[str, bool, str]]:
    """(path, is person, tracklet or sample id) of the crops with a class: ``person``, or a false
    positive of the detector (any other class an operator gave: shadow, vehicle, animal, other).
    At most :data:`MAX_CLASS_CROPS` of each side, drawn at random (seeded) where there are more.
    ``cols``: :func:`round_columns`."""
    sides: dict[bool, list[tuple[str, str]]] = {True: [], False: []}
    for sid, path, lb, kd, err, tr in zip(cols["id"], cols["filepath"], cols["label"], cols["kind"],
                                          cols["embed_error"], cols["tracklet"]):
        y = personness.is_person_label(lb)
        if y is not None and kd != "image" and not err:
            sides[y].append((path, tr or sid))
    rng = np.random.default_rng(seed)
    out = []
    for y, rows in sides.items():
        if len(rows) > MAX_CLASS_CROPS:
            rows = [rows[i] for i in sorted(rng.choice(len(rows), MAX_CLASS_CROPS, replace=False))]
        out.extend((p, y, g) for p, g in rows)
    return out


def _vectors(name: str, version: str, ids: list[str]) -> np.ndarray:
    """Vectors of ``version`` for ``ids`` (an id may repeat: a crop in query and gallery), in one
    read; embedded afresh when the field is missing."""
    from core.model import embed

    unique = list(dict.fromkeys(ids))
    cols = store.view_columns(name, [store.embedding_field(version), "filepath"], unique)
    vecs = cols[store.embedding_field(version)]
    if len(vecs) != len(unique):
        raise store.StoreError(f"{len(unique) - len(vecs)} evaluation crops of {name!r} were removed during the "
                               "round: run the round again")
    if any(v is None for v in vecs):
        X, _errors = embed.embed_paths(cols["filepath"], version=version, kind="crop")
        X = np.asarray(X, np.float32)
    else:
        X = np.stack([np.asarray(v, np.float32) for v in vecs])
    row = {sid: k for k, sid in enumerate(cols["id"])}
    return X[[row[i] for i in ids]]


def evaluate_version(name: str, version: str, split: EvalSplit, cols: dict[str, list]) -> dict[str, Any]:
    """Retrieval (rank-1/5, mAP), per query camera, day vs low light vs shadow, and match rates
    at the operating threshold, for ``version`` on ``split``. ``cols``: the :func:`round_columns`
    the split was drawn from (the crops' metadata); only the vectors are read here."""
    from core.math import evaluate

    row = {sid: k for k, sid in enumerate(cols["id"])}

    def meta(ids: list[str], fields: list[str]) -> dict[str, list]:
        return {f: [cols[f][row[i]] for i in ids] for f in fields}

    qc, gc = meta(split.query, ["identity", "camera", "low_light", "tags"]), meta(split.gallery, ["identity", "camera"])
    X = _vectors(name, version, split.query + split.gallery)
    q, g = X[:len(split.query)], X[len(split.query):]
    cams_known = all(qc["camera"]) and all(gc["camera"])
    # across cameras only where identities are seen by several cameras (re-ID protocol)
    cross = cams_known and len(set(gc["camera"])) > 1 and any(
        len({c for c, i in zip(gc["camera"], gc["identity"]) if i == ident}) > 1 for ident in set(qc["identity"]))
    low = np.array([bool(v) or "night" in (t or ()) for v, t in zip(qc["low_light"], qc["tags"])])
    shadow = np.array(["shadow" in (t or ()) for t in qc["tags"]])
    conditions = {"day": ~low}
    if low.any():
        conditions["low light"] = low
    if shadow.any():
        conditions["shadow"] = shadow
    res = evaluate.evaluate(q, qc["identity"], g, gc["identity"],
                            q_cams=qc["camera"] if cross else None, g_cams=gc["camera"] if cross else None,
                            conditions=conditions, q_keys=split.q_keys, g_keys=split.g_keys)
    res["protocol"] = {"split": split.protocol, "queries": len(split.query), "gallery": len(split.gallery),
                       "cross_camera": bool(cross)}
    return res


def resumable_round(name: str, job_id: str) -> str | None:
    """The version of round job ``job_id`` when it failed or was cancelled with work saved to go
    on from (a resume point of an evaluation, or finished training), else None."""
    from core.model import embed, train

    for rec in registry.list_versions(name):
        if rec.get("job_id") == job_id and rec["status"] in ("failed", "cancelled"):
            d = embed.version_dir(rec["version"])
            if (d / train.RESUME).exists() or (d / train.CHECKPOINT).exists():
                return rec["version"]
    return None


def run_round(name: str, args: dict[str, Any], reporter) -> dict[str, Any]:
    """The ``train`` job: see the module docstring. ``args``: ``config`` (TrainConfig fields) and
    optionally ``init_version``; or ``resume_version``: a failed or cancelled round, continued in
    its own version record and folder with its own config and parent, from its last evaluation
    (``resume.pt``, see :mod:`core.model.train`), or straight to export when its training had finished."""
    from core.model import embed, train
    from core.services import embedding
    from core.services import export
    from core.data.jobs import JobCancelled

    t0 = time.time()
    resume = args.get("resume_version")
    if resume:
        rec = registry.resume(name, resume, job_id=reporter.job_id)
        version, parent = resume, rec.get("parent") or registry.BASE
        cfg = train.TrainConfig.from_dict(rec.get("config") or {})
    else:
        cfg = train.TrainConfig.from_dict(args.get("config") or {})
        parent = args.get("init_version") or store.active_model(name) or registry.BASE
        version = registry.new_version(name, parent, cfg.to_dict(), job_id=reporter.job_id)
    reporter.progress(0.0, f"round {version}: {'resuming' if resume else 'preparing'}", force=True, version=version)
    try:
        cols = round_columns(name)
        split = eval_split(cols)
        if split.problem:  # found before any training: nothing could judge the round
            raise train.TrainingError(f"no evaluation split: {split.problem}")
        samples = training_samples(cols, split.identities)
        if len({s[1] for s in samples}) < cfg.min_val_ids + 2:
            raise train.TrainingError(f"only {len({s[1] for s in samples})} labelled identities to train on: "
                                      "label more identities first")

        def on_step(step: int, total: int, loss: float, metrics: dict | None) -> None:
            details = {"step": step, "total": total, "loss": round(float(loss), 5), "phase": "train"}
            if metrics:
                details["val_mAP"] = round(float(metrics.get("mAP", 0.0)), 4)
                details["val_rank1"] = round(float(metrics.get("rank1", 0.0)), 4)
            reporter.progress(0.7 * step / total, f"training step {step}/{total}, loss {loss:.3f}", **details)

        out_dir = embed.version_dir(version)
        cannot = graph_identity.cannot_identities(graph_identity.load(name))  # guaranteed negatives
        result = train.train_round(samples, cfg, init_version=parent, out_dir=out_dir, progress=on_step,
                                   should_stop=reporter.should_stop, resume=bool(resume), cannot=cannot,
                                   open_identities=[s[1] for s in samples if graph_identity.is_lone(s[1])],
                                   classes=class_samples(cols, cfg.seed))
        reporter.check()
        reporter.progress(0.7, "exporting ONNX", force=True)
        embed.onnx_path(version)
        try:  # the file every embedding job runs must be the model: else the round fails here
            onnx_check = export.verify_onnx(version, [s[0] for s in samples])
        except export.ExportError:
            (out_dir / "model.onnx").unlink(missing_ok=True)  # a resumed round exports it afresh
            raise

        embedding.embed_dataset(name, version=version, progress=reporter.span(0.7, 0.85, "re-embedding"))
        refresh = analysis.refresh_map(name, version, reporter, 0.85, 0.95)
        reporter.progress(0.95, "evaluating before and after", force=True)
        before = evaluate_version(name, parent, split, cols)
        after = evaluate_version(name, version, split, cols)
        train_summary = {k: result.get(k) for k in ("best_step", "steps_run", "stopped_early", "n_train", "n_val",
                                                   "seconds", "init_metrics", "best_metrics", "resumed_from")}
        used = result.get("device") or device.select(cfg.device)  # a round from before devices were kept: where it ran now
        pseudo = result.get("pseudo") if result.get("unsupervised") else None
        train_summary.update(device=device.describe(used), device_kind=used,
                             unsupervised=bool(result.get("unsupervised")), pseudo_summary=pseudo_summary(pseudo),
                             reclusters=(pseudo or {}).get("reclusters"), person=result.get("person"),
                             person_summary=person_summary(result.get("person")))
        # the graph as it stands now (the operator kept answering while the round trained)
        proposals = proposal_nodes(graph_identity.load(name), (pseudo or {}).get("proposals")) if pseudo else []
        report = plain({"version": version, "parent": parent, "dataset": name, "before": before, "after": after,
                         "train": train_summary, "config": cfg.to_dict(), "map": refresh, "onnx_check": onnx_check,
                         "proposals": proposals, "seconds": time.time() - t0})
        write_report(out_dir, report)
        registry.finish(name, version, report["after"], before=report["before"], train=report["train"],
                        report=str(out_dir / "report.md"), checkpoint=str(embed.checkpoint_path(version)),
                        onnx=str(embed.onnx_path(version)), onnx_check=report["onnx_check"],
                        proposals=report["proposals"])
        a, b = report["after"]["all"], report["before"]["all"]
        return {"version": version, "rank1_before": b.get("rank1"), "rank1_after": a.get("rank1"),
                "mAP_before": b.get("mAP"), "mAP_after": a.get("mAP"), "seconds": round(time.time() - t0, 1),
                "resumed_from": result.get("resumed_from"), "device": train_summary["device"],
                "unsupervised": train_summary["unsupervised"], "pseudo": train_summary["pseudo_summary"],
                "proposals": len(proposals)}
    except (JobCancelled, train.TrainingCancelled) as exc:
        registry.fail(name, version, "cancelled by operator", cancelled=True)
        raise JobCancelled(str(exc)) from exc
    except BaseException as exc:
        registry.fail(name, version, f"{type(exc).__name__}: {exc}")
        raise
