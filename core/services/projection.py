"""Embedding map of a dataset: the layout of :mod:`core.math.layout` cached per model version in
the dataset (a map field per version, its record in the dataset's state) and registered as a
FiftyOne brain visualization run so the App's embeddings panel shows the same map:
:func:`compute_layout`, :func:`cached_layout`, :func:`register_brain_run`.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from core.math.layout import Progress, _report, layout

log = logging.getLogger(__name__)


MAPS_INFO_KEY = "maps"  # store.state(name)["maps"][<map field>] = record of the cached layout

# Layouts actually computed by compute_layout in this process (a cache hit adds nothing).
LAYOUTS_COMPUTED = 0


@dataclass
class MapLayout:
    """A cached or fresh map: ``coords`` float32 [N, 2] row i belongs to sample ``ids[i]``."""

    ids: list[str]
    coords: np.ndarray
    field: str
    computed: bool
    record: dict = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # requested ids without an embedding


def map_field(version: str) -> str:
    """Sample field (and brain key) holding the [x, y] map position under model ``version``."""
    from core.data import store

    return "map_" + store.embedding_field(version)[len("emb_") :]


def _ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()


def _coords_of(coll, field_name: str) -> tuple[list[str], np.ndarray]:
    """(ids, float32 [N, 2]) of ``coll`` for map field ``field_name``, NaN where unset."""
    ids, pts = coll.values(["id", field_name])
    out = np.full((len(ids), 2), np.nan, dtype=np.float32)
    for i, p in enumerate(pts):
        if p is not None and len(p) == 2:
            out[i] = p
    return list(ids), out


def _previous_field(ds, version: str, own: str) -> str | None:
    """Map field to start from: the active model's map when it is another version, else the
    most recently computed map of another version."""
    from core.data import store

    maps = store.state(ds.name).get(MAPS_INFO_KEY) or {}
    schema = ds.get_field_schema()
    active = store.active_model(ds.name)
    if active and active != version and map_field(active) in schema:
        return map_field(active)
    others = [(r.get("created", 0), f) for f, r in maps.items() if f != own and f in schema]
    return max(others)[1] if others else None


def compute_layout(
    name: str,
    version: str,
    view_ids: Sequence[str] | None = None,
    progress: Progress | None = None,
    *,
    seed: int = 0,
    force: bool = False,
    register: bool = True,
    **layout_kwargs,
) -> MapLayout:
    """The map of dataset ``name`` under model ``version`` for ``view_ids`` (all samples when
    None), computed only when some requested sample with an embedding has no position yet.

    One layout per version covers every sample laid out so far (field ``map_<version>``, a
    list [x, y]; record in the dataset's state, ``maps``); a view is a subset of it, so filtering the
    page never recomputes. A recompute covers the requested samples plus those already covered
    and starts from this version's own positions, else from the previous (active) version's map.
    Samples without an ``emb_<version>`` vector are returned in ``missing``. Vectors of a model
    version are taken as immutable (re-embedding under the same version needs ``force=True``).
    Progress stages: load, pca, neighbors, umap, place, done, save.
    """
    global LAYOUTS_COMPUTED

    from core.data import store

    ds = store.get_dataset(name)
    efield, mfield = store.embedding_field(version), map_field(version)
    if efield not in ds.get_field_schema():
        raise store.StoreError(f"no embeddings for model {version!r} in {name!r}: run embed first")
    schema = ds.get_field_schema()
    embedded = ds.exists(efield)
    req = embedded.select(list(view_ids)) if view_ids is not None else embedded
    record = (store.state(name).get(MAPS_INFO_KEY) or {}).get(mfield)

    need = force or record is None or mfield not in schema or len(req.exists(mfield, False)) > 0
    if not need:
        ids, coords = _coords_of(req, mfield)
        return _ordered(MapLayout(ids, coords, mfield, False, record), view_ids)

    t0 = time.time()
    covered = set(embedded.exists(mfield).values("id")) if mfield in schema else set()
    if view_ids is None:
        target = embedded
    else:
        target = embedded.select(sorted(covered | set(req.values("id"))))
    _report(progress, "load", 0.0)
    ids, vecs = target.values(["id", efield])
    X = np.stack([np.asarray(v, dtype=np.float32).ravel() for v in vecs])
    _report(progress, "load", 1.0)

    init, init_from = None, None
    if mfield in schema and covered:
        _, init = _coords_of(target, mfield)
        init_from = mfield
    else:
        prev = _previous_field(ds, version, mfield)
        if prev is not None:
            _, init = _coords_of(target, prev)
            init_from = prev
    if init is not None and np.isfinite(init).all(1).mean() < layout_kwargs.get("min_init_share", 0.2):
        init, init_from = None, None

    log.info("laying out %d samples of %s (%s), init from %s", len(ids), name, version, init_from)
    t1 = time.time()
    Y = layout(X, init=init, seed=seed, progress=progress, **layout_kwargs)
    LAYOUTS_COMPUTED += 1

    t2 = time.time()
    _report(progress, "save", 0.0)
    stale = set(covered) - set(ids)
    if register:  # the brain run writes the points field itself: one bulk write, not two
        store.register_visualization(ds, mfield, list(ids), Y, stale)
    else:
        store.declare_point_field(ds, mfield)
        values = {i: [float(x), float(y)] for i, (x, y) in zip(ids, Y)}
        values.update({i: None for i in stale})
        store.set_values(name, mfield, values)
    _report(progress, "save", 1.0)

    record = {
        "version": version,
        "embedding_field": efield,
        "n": len(ids),
        "ids_sha1": _ids_digest(ids),
        "seed": seed,
        "init_from": init_from,
        "seconds": {"load": round(t1 - t0, 2), "layout": round(t2 - t1, 2), "save": round(time.time() - t2, 2)},
        "created": time.time(),
        "brain_key": mfield if register else None,
    }
    store.set_state(name, f"{MAPS_INFO_KEY}.{mfield}", record)  # this map's record alone
    return _ordered(MapLayout(list(ids), Y, mfield, True, record), view_ids)


def _ordered(m: MapLayout, view_ids: Sequence[str] | None) -> MapLayout:
    """Rows in the order of ``view_ids``; requested ids without a position go to ``missing``."""
    if view_ids is None:
        return m
    pos = {i: k for k, i in enumerate(m.ids)}
    want = [i for i in view_ids if i in pos]
    m.missing = [i for i in view_ids if i not in pos]
    m.coords = m.coords[[pos[i] for i in want]] if want else np.zeros((0, 2), np.float32)
    m.ids = want
    return m


def cached_layout(name: str, version: str) -> dict | None:
    """The record of the cached layout of ``version`` (None when never computed)."""
    from core.data import store

    return (store.state(name).get(MAPS_INFO_KEY) or {}).get(map_field(version))


def register_brain_run(name: str, version: str) -> str:
    """Register the cached map of ``version`` as a FiftyOne brain visualization run (brain key
    and points field ``map_<version>``), so the App's Embeddings panel shows the same map and
    lassoes through the points field. Replaces an earlier run of that key. Returns the key."""
    from core.data import store

    ds = store.get_dataset(name)
    key = map_field(version)
    if key not in ds.get_field_schema():
        raise store.StoreError(f"no map for model {version!r} in {name!r}: compute the layout first")
    ids, pts = _coords_of(ds.exists(key), key)
    store.register_visualization(ds, key, ids, pts)
    return key
