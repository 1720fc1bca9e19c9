"""The identity graph as pure data: who is who, from must-links and cannot-links.

Nodes are tracklets (every crop of one track) and single crops, named by strings. A
*must-link* says two nodes are one person (the same tracklet, an operator's "same", an
identity that came with the data); a *cannot-link* says they are two (two tracklets seen in
the same frame of one sequence, an operator's "different"). Identities are the connected
components of the must-links (union-find). A link that contradicts the graph (a "same" across
a cannot-link, a "different" inside one component) is never applied: it is kept as a
:class:`Conflict` naming both sides and the links in the way.

The graph is always *derived*: :func:`build` replays the links in a fixed order (free
constraints, trusted data, the operator's log), so undoing a decision is replaying without it.
No fiftyone, no streamlit, no database: :mod:`core.services.labeling.identity` feeds it from MongoDB.
"""
from __future__ import annotations

import hashlib
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple, Sequence

SOURCES = ("tracklet", "frame", "ingested", "operator")


@dataclass(frozen=True)
class Link:
    """``same``: a must-link (True) or a cannot-link (False). ``ref``: the decision it came from
    (a log entry id), None for free constraints."""

    a: str
    b: str
    same: bool
    source: str = "operator"
    ref: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown link source {self.source!r}; use one of {SOURCES}")


@dataclass
class Conflict:
    """A link that was not applied. ``blocking``: the links it contradicts (the cannot-link
    between the two components, or a chain of must-links joining them); ``a_side`` /
    ``b_side``: the members of both components when it was refused."""

    link: Link
    blocking: list[Link]
    a_side: list[str]
    b_side: list[str]

    def describe(self) -> str:
        why = ", ".join(f"{b.a} {'=' if b.same else '≠'} {b.b} ({b.source})" for b in self.blocking[:3])
        verb = "same" if self.link.same else "different"
        return (f"'{verb}' for {self.link.a} / {self.link.b} contradicts {why or 'the graph'}: "
                f"{len(self.a_side)} and {len(self.b_side)} tracklets on the two sides")


class IdentityGraph:
    """Union-find over nodes with cannot-links kept between components.

    >>> g = IdentityGraph(["a", "b", "c"])
    >>> g.link(Link("a", "b", False, "frame")) is None
    True
    >>> g.link(Link("b", "c", True)) is None
    True
    >>> g.link(Link("a", "c", True)).blocking[0].source
    'frame'
    """

    def __init__(self, nodes: Iterable[str] = ()) -> None:
        nodes = list(dict.fromkeys(nodes))  # (a replay builds 100k nodes twice: no call per node)
        self._parent: dict[str, str] = {n: n for n in nodes}
        self._members: dict[str, list[str]] = {n: [n] for n in nodes}
        self._cannot: dict[str, dict[str, Link]] = {}  # root -> other root -> one cannot-link
        self._must_adj: dict[str, list[Link]] = {}  # node -> applied must-links touching it
        self.conflicts: list[Conflict] = []
        self.applied: list[Link] = []

    # structure ------------------------------------------------------------------------------
    def add(self, node: str) -> None:
        if node not in self._parent:
            self._parent[node] = node
            self._members[node] = [node]

    def __contains__(self, node: str) -> bool:
        return node in self._parent

    def __len__(self) -> int:
        return len(self._parent)

    def find(self, node: str) -> str:
        root = node
        while self._parent[root] != root:
            root = self._parent[root]
        while self._parent[node] != root:  # path compression
            self._parent[node], node = root, self._parent[node]
        return root

    def same(self, a: str, b: str) -> bool:
        return self.find(a) == self.find(b)

    def separated(self, a: str, b: str) -> Link | None:
        """A cannot-link between the components of ``a`` and ``b`` (None: none)."""
        return self._cannot.get(self.find(a), {}).get(self.find(b))

    def component(self, node: str) -> list[str]:
        return sorted(self._members[self.find(node)])

    def roots(self) -> list[str]:
        """One root per component (in no particular order)."""
        return list(self._members)

    def members(self, node: str) -> list[str]:
        """The members of ``node``'s component, unsorted (the graph's own list: do not change it)."""
        return self._members[self.find(node)]

    def copy(self) -> "IdentityGraph":
        """An independent copy (the links applied and the conflicts are shared, being immutable)."""
        c = IdentityGraph()
        c._parent = dict(self._parent)
        c._members = {r: list(m) for r, m in self._members.items()}
        c._cannot = {r: dict(o) for r, o in self._cannot.items()}
        c._must_adj = {n: list(ls) for n, ls in self._must_adj.items()}
        c.conflicts = list(self.conflicts)
        c.applied = list(self.applied)
        return c

    def resettle(self, part: set[str], links: Iterable[Link], soft: Iterable[Link] = ()) -> bool:
        """Replay the components ``part`` (a union of whole components) alone: their nodes are
        cut loose, then ``links`` that touch them are applied, then ``soft`` links inside them
        without recording conflicts (as :func:`build` applies ingested names to be verified).
        The rest of the graph stays as it is; cannot-links from the part to the rest are taken
        from ``links``. False (the graph half done: drop it) when a link of ``links`` conflicts
        or a soft link leaves the part: then only a whole replay says what the graph is."""
        roots = {self.find(n) for n in part}
        if sum(len(self._members[r]) for r in roots) != len(part):
            raise ValueError("resettle: part must be whole components")
        for r in roots:
            del self._members[r]
            for other in self._cannot.pop(r, {}):
                if other not in roots:
                    back = self._cannot[other]
                    back.pop(r, None)
                    if not back:
                        del self._cannot[other]
        for n in part:
            self._parent[n] = n
            self._members[n] = [n]
            self._must_adj.pop(n, None)
        self.applied = [ln for ln in self.applied if ln.a not in part and ln.b not in part]
        for ln in links:
            if (ln.a in part or ln.b in part) and self.link(ln, record=False) is not None:
                return False
        for ln in soft:
            if (ln.a in part) != (ln.b in part):
                return False
            if ln.a in part:
                self.link(ln, record=False)
        return True

    def components(self) -> list[list[str]]:
        """Every component's members, sorted; components in order of their first member."""
        return sorted(sorted(m) for m in self._members.values())

    def cannot_pairs(self) -> list[tuple[str, str]]:
        """Pairs of component roots with a cannot-link between them (each pair once)."""
        return sorted({(a, b) if a < b else (b, a) for a, others in self._cannot.items() for b in others})

    # links ---------------------------------------------------------------------------------
    def _must_path(self, a: str, b: str) -> list[Link]:
        """The applied must-links joining ``a`` to ``b`` (breadth first; [] when not joined)."""
        prev: dict[str, Link | None] = {a: None}
        todo = deque([a])
        while todo:
            n = todo.popleft()
            if n == b:
                break
            for ln in self._must_adj.get(n, ()):
                m = ln.b if ln.a == n else ln.a
                if m not in prev:
                    prev[m] = ln
                    todo.append(m)
        if b not in prev:
            return []
        path, n = [], b
        while prev[n] is not None:
            ln = prev[n]
            path.append(ln)
            n = ln.a if ln.b == n else ln.b
        return path[::-1]

    def check(self, link: Link) -> Conflict | None:
        """The conflict ``link`` would make (None: it can be applied). Unknown nodes are new."""
        for n in (link.a, link.b):
            self.add(n)
        ra, rb = self.find(link.a), self.find(link.b)
        if link.same and ra != rb and (blocker := self._cannot.get(ra, {}).get(rb)) is not None:
            return Conflict(link, [blocker], self.component(link.a), self.component(link.b))
        if not link.same and ra == rb:
            members = self.component(link.a)
            return Conflict(link, self._must_path(link.a, link.b) or [], members, members)
        return None

    def link(self, link: Link, record: bool = True) -> Conflict | None:
        """Apply ``link`` unless it conflicts; a conflict is returned (and kept in
        :attr:`conflicts` when ``record``) and the graph is left as it was."""
        c = self.check(link)
        if c is not None:
            if record:
                self.conflicts.append(c)
            return c
        ra, rb = self.find(link.a), self.find(link.b)
        self.applied.append(link)
        if link.same:
            self._must_adj.setdefault(link.a, []).append(link)
            self._must_adj.setdefault(link.b, []).append(link)
            if ra != rb:
                self._union(ra, rb)
        else:
            self._cannot.setdefault(ra, {}).setdefault(rb, link)
            self._cannot.setdefault(rb, {}).setdefault(ra, link)
        return None

    def _union(self, ra: str, rb: str) -> None:
        if len(self._members[ra]) < len(self._members[rb]):
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._members[ra].extend(self._members.pop(rb))
        moved = self._cannot.pop(rb, {})
        mine = self._cannot.setdefault(ra, {})
        for other, ln in moved.items():
            mine.setdefault(other, ln)
            back = self._cannot[other]
            back.pop(rb, None)
            back.setdefault(ra, ln)
        if not mine:
            self._cannot.pop(ra)


def name_links(names: Mapping[str, str], source: str) -> list[Link]:
    """Must-links joining the nodes that carry one name (a star from each name's first node,
    in sorted order so the result is stable)."""
    by_name: dict[str, list[str]] = {}
    for node in sorted(names):
        if names[node]:
            by_name.setdefault(str(names[node]), []).append(node)
    return [Link(nodes[0], n, True, source) for _nm, nodes in sorted(by_name.items()) for n in nodes[1:]]


def name_closure(g: IdentityGraph, names: Mapping[str, str], roots: Iterable[str]) -> set[str]:
    """The roots of ``roots``' components and of every component holding a node that carries a
    name (``names``: node -> ingested name) a node of theirs carries, transitively: a part of the
    graph whose name links (:func:`name_links`) stay inside it, so it can be replayed alone
    (:meth:`IdentityGraph.resettle`)."""
    by_name: dict[str, list[str]] = {}
    for n, nm in names.items():
        if nm:
            by_name.setdefault(str(nm), []).append(n)
    out = {g.find(r) for r in roots}
    todo, seen = list(out), set()
    while todo:
        for n in g.members(todo.pop()):
            nm = names.get(n)
            if nm and str(nm) not in seen:
                seen.add(str(nm))
                for m in by_name[str(nm)]:
                    if (r := g.find(m)) not in out:
                        out.add(r)
                        todo.append(r)
    return out


def build(nodes: Iterable[str], free: Sequence[Link] = (), operator_names: Mapping[str, str] | None = None,
          ingested_names: Mapping[str, str] | None = None, decisions: Sequence[Link] = (),
          trust_ingested: bool = True) -> IdentityGraph:
    """The graph from its inputs, replayed in a fixed order.

    ``free``: the footage's constraints (cannot-links of tracklets seen in one frame); always
    applied first. ``ingested_names``: node -> identity that came with the data; with
    ``trust_ingested`` these are must-links applied before the operator, so an operator answer
    against them is a conflict; otherwise they are applied *after* the operator and only where
    nothing contradicts them (the operator's word beats the file). ``operator_names``: node ->
    identity an operator typed on a crop; ``decisions``: the operator's pair answers in log
    order. Operator links that conflict are kept in :attr:`IdentityGraph.conflicts`."""
    g = IdentityGraph(nodes)
    for ln in free:
        g.link(ln)
    soft = name_links(ingested_names or {}, "ingested")
    if trust_ingested:
        for ln in soft:
            g.link(ln)
    for ln in name_links(operator_names or {}, "operator"):
        g.link(ln)
    for ln in decisions:
        g.link(ln)
    if not trust_ingested:
        for ln in soft:  # a soft link the operator contradicted is simply not applied
            g.link(ln, record=False)
    return g


class Claim(NamedTuple):
    """What one component asks of the naming (:func:`name_claims`): its place in the order
    (heavier wanted names first), the name it wants (None: unnamed), the name it keeps if free
    (None: none), its first member, and whether it is a lone node nobody named. A tuple, not a
    dataclass: a replay makes one per component, 100k where nobody named the crops."""

    order: tuple
    wanted: str | None
    keep: str | None
    first: str
    lone: bool = False


def name_claims(g: IdentityGraph, names: Mapping[str, str], weights: Mapping[str, int] | None = None,
                prefix: str = "g-", strong: Mapping[str, str] | None = None,
                current: Mapping[str, str] | None = None, roots: Iterable[str] | None = None) -> dict[str, Claim]:
    """Root -> :class:`Claim` of each component (of ``roots`` only, when given): the first half of
    :func:`component_names`, per component, so a caller that changed a few components can keep
    the other components' claims and only :func:`assign_names` again."""
    weights, strong, current = weights or {}, strong or {}, current or {}

    def tally(members: list[str], tiers: tuple[Mapping[str, str], ...]) -> dict[str, list[int]]:
        votes: dict[str, list[int]] = {}
        for n in members:
            for tier, source in enumerate(tiers):
                nm = source.get(n)
                if nm:
                    votes.setdefault(str(nm), [0] * len(tiers))[tier] += int(weights.get(n, 1))
        return votes

    out: dict[str, Claim] = {}
    for root in (g.roots() if roots is None else dict.fromkeys(g.find(r) for r in roots)):
        members = g.members(root)
        first = min(members)
        votes = tally(members, (strong, names))
        nm = min(votes.items(), key=lambda kv: ([-x for x in kv[1]], kv[0])) if votes else None
        if nm is None and len(members) == 1:
            out[root] = Claim((2, first), None, None, first, lone=True)  # a lone node nobody named
            continue
        cur = tally(members, (current,))
        cur_nm = min(cur.items(), key=lambda kv: (-kv[1][0], kv[0]))[0] if cur else None
        if nm is not None:
            keep = cur_nm is not None and (cur_nm == nm[0] or (
                cur_nm.startswith(nm[0] + "~") and cur_nm[len(nm[0]) + 1:].isdigit()))
            out[root] = Claim((0, -nm[1][0], -nm[1][1], nm[0], first), nm[0], cur_nm if keep else None, first)
        else:
            keep = cur_nm is not None and cur_nm.startswith(prefix)
            out[root] = Claim((1, first), None, cur_nm if keep else None, first)
    return out


def assign_names(g: IdentityGraph, claims: Mapping[str, Claim], prefix: str = "g-") -> dict[str, str | None]:
    """Node -> name from every component's claim (the second half of :func:`component_names`):
    the names kept go first, to the heaviest component keeping each; then, in order, each other
    component takes its wanted name or the first free ``~k`` of it (unnamed: ``prefix`` + a hash)."""
    comps = sorted(claims.items(), key=lambda rc: rc[1].order)
    taken: set[str] = set()
    final_of: dict[str, str] = {}
    for root, c in comps:  # first, the names kept
        if c.keep is not None and c.keep not in taken:
            taken.add(c.keep)
            final_of[root] = c.keep
    out: dict[str, str | None] = {}
    for root, c in comps:
        if c.lone:
            out[c.first] = None
            continue
        if root not in final_of:
            if c.wanted is not None:
                final, k = c.wanted, 2
                while final in taken:
                    final, k = f"{c.wanted}~{k}", k + 1
            else:
                final = prefix + hashlib.sha1(c.first.encode()).hexdigest()[:8]
                while final in taken:
                    final += "~"
            taken.add(final)
            final_of[root] = final
        out.update(dict.fromkeys(g.members(root), final_of[root]))
    return out


def component_names(g: IdentityGraph, names: Mapping[str, str], weights: Mapping[str, int] | None = None,
                    prefix: str = "g-", strong: Mapping[str, str] | None = None,
                    current: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Node -> the identity name of its component.

    A component takes the name most of its crops carry (``names``: node -> name, e.g. what came
    with the data; ``strong``: node -> name that outvotes any number of ``names``, e.g. what an
    operator typed; ``weights``: node -> crops, default 1); a name wanted by several
    components goes to the one with most crops of it, the others get ``<name>~2``, ``~3`` ... A
    component without names gets ``<prefix><hash of its first member>`` when it joins several
    nodes, and None when it is a lone node (nobody said who it is).

    Names are stable (``current``: node -> the name this function gave it last, as written on its
    crops): a component keeps the name most of its crops carry now while that name is still its
    wanted name or one of its ``~k`` variants (or, unnamed, a ``prefix`` name) and no heavier
    component keeps it too. So an answer renames only the crops whose component changed: without
    this, a split renumbered every ``~k`` of its name after it (one "different" on a 10k-crop
    dataset renamed 783 crops of other people), and the result is a fixpoint: naming the written
    names again gives the same names.

    :func:`name_claims` then :func:`assign_names`; a caller that changed a few components
    recomputes only their claims."""
    return assign_names(g, name_claims(g, names, weights, prefix, strong, current), prefix)


def overlapping(spans: Mapping[str, tuple[str, int, int]]) -> list[Link]:
    """Cannot-links between nodes seen at the same time in the same sequence.

    ``spans``: node -> (sequence, first frame, last frame). Two tracklets of one sequence whose
    frame ranges overlap are two people (one person is not in two places at once). Sorted
    sweep per sequence: O(n log n + links)."""
    by_seq: dict[str, list[tuple[int, int, str]]] = {}
    for node, (seq, f0, f1) in spans.items():
        if seq is not None and f0 is not None and f1 is not None:
            by_seq.setdefault(str(seq), []).append((int(f0), int(f1), node))
    out = []
    for seq in sorted(by_seq):
        items = sorted(by_seq[seq])
        active: list[tuple[int, str]] = []
        for f0, f1, node in items:
            active = [(e, n) for e, n in active if e >= f0]
            out.extend(Link(*sorted((n, node)), False, "frame") for _e, n in active)
            active.append((f1, node))
    return out


@dataclass
class Tally:
    """What a graph says, in numbers (for the page and the log)."""

    nodes: int
    components: int
    merged: int  # components of more than one node
    cannot: int
    conflicts: int
    sizes: dict[int, int] = field(default_factory=dict)  # component size -> how many


def tally(g: IdentityGraph) -> Tally:
    comps = g.components()
    sizes = Counter(len(c) for c in comps)
    return Tally(len(g), len(comps), sum(1 for c in comps if len(c) > 1), len(g.cannot_pairs()),
                 len(g.conflicts), dict(sorted(sizes.items())))
