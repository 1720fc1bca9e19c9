"""A round's report: its one-line summaries (pseudo-identities, person-ness head), its merge
proposals as identity-graph nodes, and ``report.json`` / ``report.md`` in the version folder.
Pure formatting of what :func:`core.services.rounds.run_round` gathered."""
from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from core.math import personness
from core.services.labeling import identity as graph_identity

log = logging.getLogger(__name__)


def person_summary(person: dict[str, Any] | None) -> str:
    """One line on a round's person-ness head (``train_round``'s ``person``)."""
    if not person:
        return (f"no person-ness head: class at least {personness.MIN_PER_CLASS} crops as person and "
                f"{personness.MIN_PER_CLASS} as a false positive (shadow, vehicle, animal, other) first")
    return (f"person-ness head on {person['n_person']} person / {person['n_other']} false-positive crops: "
            f"cross-validated ROC AUC {person['cv_auc']:.3f}; dropping crops under {person['threshold']:.3f} kept "
            f"99 % of persons and removed {100 * person['fp_removed']:.0f} % of the false positives (out of fold)")


def plain(x: Any) -> Any:
    """JSON/BSON-safe copy (numpy scalars and arrays to Python)."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def pseudo_summary(pseudo: dict[str, Any] | None) -> str | None:
    """One line on a round's pseudo-identities (``train_round``'s ``pseudo``): its last
    re-clustering, e.g. ``"last re-clustering (step 400): 120 tracklets -> 45 pseudo-identities,
    80 merged"``; None for a round trained on labels alone."""
    if not pseudo:
        return None
    runs = pseudo.get("reclusters") or []
    if not runs:
        return "no re-clustering ran (the round ended before its first)"
    r = runs[-1]
    n, merged, clusters = int(r.get("nodes") or 0), int(r.get("merged_nodes") or 0), int(r.get("clusters") or 0)
    return (f"last re-clustering (step {r.get('step')}): {n} tracklets -> {n - merged + clusters} "
            f"pseudo-identities ({merged} tracklets joined into {clusters})")


def proposal_nodes(state: graph_identity.GraphState, proposals: Any) -> list[dict[str, Any]]:
    """A round's proposed merges (``[[identity_a, identity_b, distance], ...]`` of training
    identities, most confident first) as ``{"a": node, "b": node, "distance": d}`` of the identity
    graph in ``state``: a lone tracklet's ``"~<tracklet>"`` is its node, a named identity the
    node of its component with most crops. Pairs the graph already joins or keeps apart, and
    names it no longer has, are left out."""
    by_name: dict[str, str] = {}
    for node, nm in sorted(state.names.items()):
        if nm is not None and (nm not in by_name or state.crops(node) > state.crops(by_name[nm])):
            by_name[nm] = node

    def node(ident: str) -> str | None:
        if graph_identity.is_lone(ident):
            n = graph_identity.node_of(ident[len(graph_identity.LONE):], "")
            return n if n in state.graph else None
        return by_name.get(ident)

    out, seen = [], set()
    for item in proposals or ():
        try:
            ia, ib, dist = item
            dist = float(dist)
        except (TypeError, ValueError):
            dist = float("nan")
        if not np.isfinite(dist):
            log.warning("ignoring a malformed merge proposal %r", item)
            continue
        a, b = node(str(ia)), node(str(ib))
        if a is None or b is None or state.graph.same(a, b) or state.graph.separated(a, b):
            continue
        key = graph_identity.pair_key(a, b)
        if key not in seen:
            seen.add(key)
            out.append({"a": a, "b": b, "distance": dist})
    return out


def write_report(version_dir, report: dict[str, Any]) -> None:
    from core.math import evaluate

    (version_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    rows = evaluate.compare(report["before"], report["after"])
    lines = [f"# Round report: {report['version']}", "",
             f"Trained from **{report['parent']}** on {report['train']['n_train']} crops in "
             f"{report['train']['seconds']:.0f} s ({report['train']['steps_run']} steps, best step "
             f"{report['train']['best_step']}). Evaluation: {report['after']['protocol']}.", "",
             f"Device: {report['train'].get('device') or 'unknown'}. Identities: "
             + (f"pseudo-identities, {report['train'].get('pseudo_summary')}; "
                f"{len(report.get('proposals') or [])} proposed merges go to the pair queue."
                if report["train"].get("unsupervised") else "labels (no pseudo-identities)."), "",
             f"False positives: {report['train'].get('person_summary') or person_summary(None)}.", "",
             "| metric | before | after | change |", "|---|---|---|---|"]
    for r in rows:
        b, a = r.get("before"), r.get("after")
        if isinstance(b, float) or isinstance(a, float):
            d = r.get("delta")
            lines.append(f"| {r['metric']} | {b if b is None else f'{b:.3f}'} | {a if a is None else f'{a:.3f}'} | "
                         f"{'' if d is None else f'{d:+.3f}'} |")
    (version_dir / "report.md").write_text("\n".join(lines) + "\n")
