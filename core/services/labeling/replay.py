"""The identity graph of a dataset replayed from MongoDB: the person crops' columns and the
decision log's pair answers in, a :class:`GraphState` out (:func:`replay`); and the same state
moved on by the answers logged since, without a replay, where that gives what a replay would
(:func:`advance`). Reading only: :mod:`core.services.labeling.identity` keeps the state per
process, writes the sample identities from it and logs the answers (the graph's rules are in
its docstring and in :mod:`core.math.graph`)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from core.data import store
from core.math.graph import (Claim, IdentityGraph, Link, assign_names, build, name_claims, name_closure, name_links,
                             overlapping)
from core.services.labeling.base import DECISIONS, _coll
from core.services.labeling.schema import label_schema

COLUMNS = ["identity", "identity_base", "graph_identity", "labelled_by", "labelled_at", "tracklet", "sequence", "frame",
           "frame_first", "frame_last", "camera", "label", "kind", "filepath", "low_light", "tags", "flagged"]


def node_of(tracklet: str | None, sample_id: str) -> str:
    return f"t:{tracklet}" if tracklet else f"s:{sample_id}"


def is_person(label: Any, kind: Any) -> bool:
    return kind != "image" and label in (None, "person")


@dataclass
class GraphState:
    """The graph of a dataset as the log stood when it was loaded. ``rows``: node -> row
    indices into ``cols`` (the person crops' columns); ``names``: node -> identity written
    from the graph (None: a lone node nobody named); ``pairs``: the applied pair entries.
    ``confirmed``: the graph the operator is asked about and answers are checked against: the
    same graph when ingested identities are trusted, else the graph without them (free
    constraints, typed identities and answers only), so the queue asks to confirm what the
    data says and a "different" overrides it. ``top``, ``typed`` and ``claims``: the naming's
    inputs and each component's claim (:func:`core.math.graph.name_claims`), kept so that an
    answer renames only the components it changed (:func:`advance`)."""

    graph: IdentityGraph
    cols: dict[str, list]
    rows: dict[str, list[int]]
    names: dict[str, str | None]
    pairs: list[dict[str, Any]] = field(default_factory=list)
    trust_ingested: bool = True
    confirmed: IdentityGraph | None = None  # without ingested links when they are to be verified
    top: dict[str, str] = field(default_factory=dict)  # node -> the name most of its crops came with
    typed: dict[str, str] = field(default_factory=dict)  # node -> the latest name an operator typed on it
    claims: dict[str, Claim] = field(default_factory=dict)  # component root -> its naming claim

    def __post_init__(self) -> None:
        if self.confirmed is None:
            self.confirmed = self.graph

    def node_of_row(self, k: int) -> str:
        return node_of(self.cols["tracklet"][k], self.cols["id"][k])

    def crops(self, node: str) -> int:
        return len(self.rows.get(node, ()))

    def component_crops(self, node: str) -> int:
        return sum(self.crops(n) for n in self.graph.component(node))


def _input_name(cols: dict[str, list], k: int) -> str | None:
    """A sample's own identity: what it had before the graph renamed it, unless someone wrote
    another value since."""
    ident, written = cols["identity"][k], cols["graph_identity"][k]
    if written is not None and ident == written:
        return cols["identity_base"][k]
    return ident


def pair_entries(name: str) -> list[dict[str, Any]]:
    """The pair answers of the log that stand (not undone), in log order."""
    return list(_coll(DECISIONS).find({"dataset": name, "kind": "pair", "undone": False}, sort=[("seq", 1)]))


def _answer_links(entries: list[dict[str, Any]], rows: dict[str, list[int]]) -> list[Link]:
    """The graph links of pair answers ("same" / "different"; "unsure" links nothing) between
    nodes of ``rows`` (an answer on a node since deleted or relabelled is left out)."""
    return [Link(e["a"], e["b"], e["answer"] == "same", "operator", e["_id"]) for e in entries
            if e.get("answer") in ("same", "different") and e["a"] in rows and e["b"] in rows]


def _most_common(names: list[str]) -> str:
    """The name most of ``names`` are (ties: the first in sort order); most nodes have one crop
    or one name, and a Counter for each of 100k nodes cost 0.7 s of a replay."""
    if len(names) == 1 or len(set(names)) == 1:
        return names[0]
    return min(Counter(names).items(), key=lambda kv: (-kv[1], kv[0]))[0]


def _written(cols: dict[str, list], rows: dict[str, list[int]], nodes) -> dict[str, str]:
    """Node -> the name the graph wrote on most of its crops (nodes with none left out)."""
    out = {}
    for n in nodes:
        names = [cols["graph_identity"][k] for k in rows[n] if cols["graph_identity"][k]]
        if names:
            out[n] = _most_common(names)
    return out


def claims_of(state: GraphState, nodes) -> dict[str, Claim]:
    """The naming claims of the components of ``nodes`` in ``state.graph``, from its columns."""
    g = state.graph
    roots = {g.find(n) for n in nodes}
    members = [n for r in roots for n in g.members(r)]
    return name_claims(g, state.top, {n: len(state.rows[n]) for n in members}, strong=state.typed,
                       current=_written(state.cols, state.rows, members), roots=roots)


def advance(name: str, state: GraphState) -> GraphState | None:
    """``state`` with the pair answers logged since it was replayed, when that is what a replay
    would give (the samples and the mode unchanged, checked by the caller); None: replay.

    Answers come last in the replay of ``confirmed``, so they are applied to a copy of it (an
    undo, or an answer that conflicts there, needs the replay). With ingested identities
    trusted that is the whole graph; to be verified, they are applied after the answers, so the
    identities the answers touch, with every identity that shares an ingested name with them
    (:func:`core.math.graph.name_closure`), are replayed alone (:meth:`IdentityGraph.resettle`): a "different"
    inside an identity the data gave splits it. Only the components that changed are named
    again.

    At 100k crops a replay takes 0.8-2.5 s on 2 cores, and this 0.1-0.2 s (issue 17)."""
    entries = pair_entries(name)
    old = state.pairs
    if len(entries) < len(old) or any(e["_id"] != o["_id"] for e, o in zip(entries, old)):
        return None  # an answer was undone
    links = _answer_links(entries[len(old):], state.rows)
    if not links:
        return replace(state, pairs=entries)
    before = state.graph
    stale = {before.find(n) for ln in links for n in (ln.a, ln.b)}
    with store.no_gc():  # 100k lists copied: see store.no_gc
        confirmed = state.confirmed.copy()
        if any(confirmed.link(ln) is not None for ln in links):
            return None
        if state.confirmed is before:
            g = confirmed
        else:
            stale = name_closure(before, state.top, stale)
            part = {n for r in stale for n in before.members(r)}
            g = before.copy()
            if not g.resettle(part, confirmed.applied, name_links({n: state.top[n] for n in part if n in state.top},
                                                                  "ingested")):
                return None
    out = replace(state, graph=g, confirmed=confirmed, pairs=entries)
    out.claims = {**{r: c for r, c in state.claims.items() if r not in stale},
                  **claims_of(out, [n for r in stale for n in before.members(r)])}
    out.names = assign_names(g, out.claims)
    return out


def replay(name: str, cols: dict[str, list] | None = None) -> GraphState:
    cols = cols if cols is not None else store.view_columns(name, COLUMNS)
    with store.no_gc():  # two graphs of every node: see store.no_gc
        return _replay_cols(name, cols)


def _replay_cols(name: str, cols: dict[str, list]) -> GraphState:
    rows: dict[str, list[int]] = {}
    ingested: dict[str, list[str]] = {}  # node -> the names its crops came with
    written: dict[str, list[str]] = {}  # node -> the names the graph wrote on its crops (kept where still right)
    typed: dict[str, tuple] = {}  # node -> (labelled_at, name): the latest typed name wins
    spans: dict[str, tuple] = {}
    for k, sid in enumerate(cols["id"]):
        if not is_person(cols["label"][k], cols["kind"][k]):
            continue
        tr = cols["tracklet"][k]
        node = node_of(tr, sid)
        rows.setdefault(node, []).append(k)
        if cols["graph_identity"][k]:
            written.setdefault(node, []).append(cols["graph_identity"][k])
        nm = _input_name(cols, k)
        if nm and cols["labelled_by"][k]:
            mark = (str(cols["labelled_at"][k] or ""), nm)
            typed[node] = max(typed.get(node, mark), mark)
        elif nm:
            ingested.setdefault(node, []).append(nm)
        if tr and cols["sequence"][k] is not None:
            f0 = cols["frame_first"][k] if cols["frame_first"][k] is not None else cols["frame"][k]
            f1 = cols["frame_last"][k] if cols["frame_last"][k] is not None else cols["frame"][k]
            if f0 is not None and f1 is not None:
                seq, a, b = spans.get(node, (cols["sequence"][k], f0, f1))
                spans[node] = (seq, min(a, f0), max(b, f1))
    top = {n: _most_common(v) for n, v in ingested.items()}
    mine = {n: mark[1] for n, mark in typed.items()}
    entries = pair_entries(name)
    links = _answer_links(entries, rows)
    trust = label_schema(name).mode == "trust"
    free = overlapping(spans)
    g = build(rows, free=free, operator_names=mine, ingested_names=top, decisions=links, trust_ingested=trust)
    now = {n: _most_common(v) for n, v in written.items()}
    claims = name_claims(g, top, {n: len(r) for n, r in rows.items()}, strong=mine, current=now)
    confirmed = g if trust or not top else build(rows, free=free, operator_names=mine, decisions=links)
    return GraphState(g, cols, rows, assign_names(g, claims), entries, trust, confirmed, top, mine, claims)
