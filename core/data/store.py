"""Every FiftyOne / MongoDB access of Vigil: datasets, fields, views, label writes.

A Vigil dataset ``NAME`` is a persistent FiftyOne image dataset holding the unit that is
embedded and labelled (person crops, images). Whole sequences live beside it as video samples in
``NAME__videos`` (FiftyOne datasets hold one media type). Both share the data root's MongoDB.

Sample fields every importer fills (``None`` where unknown):

=============  =====================================================================
kind           "crop" (cut from a frame/video) or "image" (a whole picture)
source_kind    "mot" | "reid" | "images" | "videos" | "synthetic"
source         sequence name or source folder
camera         camera / view id (str)
identity       person id (str), ``None`` when unlabelled
label          class ("person", "vehicle", ..., "shadow"); crops of tracks start as "person"
split          "train" | "query" | "gallery" | None (also added as a tag)
sequence       sequence / clip id, unique per source in the dataset (a safe form of the name;
               ``name~hash`` when another source has the name); track (int), frame (int),
               tracklet ("seq/track")
sequence_name  the sequence or clip name exactly as the source gave it (display only, never a path)
frame_first    first and last frame of the tracklet this crop belongs to (a tracklet is a clip)
frame_last
bbox           [x, y, w, h] in pixels of the frame the crop was cut from
video_path     the clip the crop was cut from (for frame strips)
brightness     mean luma 0..255; low_light (bool); blur (variance of Laplacian)
ingest_key     unique per source item: ingesting the same source twice adds nothing
=============  =====================================================================

Later steps add ``emb_<version>`` vectors, ``embed_error``, map coordinates, scores, flags and
who-labelled-what fields.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterable

from core.config import apply_fiftyone_env

apply_fiftyone_env()

import fiftyone as fo  # noqa: E402  (must follow apply_fiftyone_env)

log = logging.getLogger(__name__)

VIDEOS_SUFFIX = "__videos"

SAMPLE_SCHEMA: dict[str, Any] = {
    "kind": fo.StringField,
    "source_kind": fo.StringField,
    "source": fo.StringField,
    "camera": fo.StringField,
    "identity": fo.StringField,
    "label": fo.StringField,
    "split": fo.StringField,
    "sequence": fo.StringField,
    "sequence_name": fo.StringField,
    "track": fo.IntField,
    "frame": fo.IntField,
    "tracklet": fo.StringField,
    "frame_first": fo.IntField,
    "frame_last": fo.IntField,
    "bbox": fo.ListField,
    "video_path": fo.StringField,
    "brightness": fo.FloatField,
    "low_light": fo.BooleanField,
    "blur": fo.FloatField,
    "ingest_key": fo.StringField,
}


class StoreError(RuntimeError):
    """A database operation that cannot be done, with what the operator can do about it."""


def _ensure_schema(ds: fo.Dataset) -> fo.Dataset:
    schema = ds.get_field_schema()
    for name, ftype in SAMPLE_SCHEMA.items():
        if name not in schema:
            ds.add_sample_field(name, ftype)
    if "ingest_key" not in ds.list_indexes():
        ds.create_index("ingest_key")
    return ds


def dataset_names() -> list[str]:
    """Vigil datasets (companion video datasets are hidden)."""
    return [n for n in fo.list_datasets() if not n.endswith(VIDEOS_SUFFIX)]


MAX_NAME = 100


def check_dataset_name(name: str) -> str:
    """``name`` when it can name a Vigil dataset, else :class:`StoreError` saying why: it becomes
    a folder under ``media/`` (so never ``.``/``..`` or blank at either end) and must not end
    in ``__videos`` (that names the companion video dataset)."""
    if not name or not re.fullmatch(r"[A-Za-z0-9_.\- ]+", name):
        raise StoreError(f"invalid dataset name {name!r}: use letters, digits, '-', '_', '.' or spaces")
    if not name.strip(". "):
        raise StoreError(f"invalid dataset name {name!r}: it needs a letter or digit")
    if name != name.strip():
        raise StoreError(f"invalid dataset name {name!r}: no spaces at the start or end")
    if len(name) > MAX_NAME:
        raise StoreError(f"dataset name too long ({len(name)} characters, at most {MAX_NAME})")
    if name.endswith(VIDEOS_SUFFIX):
        raise StoreError(f"invalid dataset name {name!r}: names ending in {VIDEOS_SUFFIX!r} are kept for "
                         "the companion video datasets; choose another name")
    return name


def get_dataset(name: str, create: bool = False) -> fo.Dataset:
    """The persistent image dataset ``name``; with ``create`` it is made when missing."""
    check_dataset_name(name)
    if fo.dataset_exists(name):
        ds = fo.load_dataset(name)
        ds.reload()  # FiftyOne caches datasets per process; jobs write from another process
        return _ensure_schema(ds)
    if not create:
        raise StoreError(f"dataset {name!r} does not exist; ingest something into it first")
    ds = fo.Dataset(name)
    ds.persistent = True
    ds.save()
    db()[STATE].replace_one({"_id": name}, {"_id": name, "active_model": None}, upsert=True)
    return _ensure_schema(ds)


def get_videos(name: str, create: bool = False) -> fo.Dataset | None:
    """The companion video dataset of ``name`` (sequences with frame-level detections)."""
    vname = name + VIDEOS_SUFFIX
    if fo.dataset_exists(vname):
        return fo.load_dataset(vname)
    if not create:
        return None
    ds = fo.Dataset(vname)
    ds.persistent = True
    return ds


def delete_dataset(name: str) -> None:
    for n in (name, name + VIDEOS_SUFFIX):
        if fo.dataset_exists(n):
            fo.delete_dataset(n)
    db()[SEQUENCES].delete_many({"dataset": name})
    db()[STATE].delete_one({"_id": name})


SEQUENCES = "vigil_sequences"


def claim_sequence(name: str, wanted: str, source_id: str, original: str | None = None) -> str:
    """The sequence id of the source ``source_id`` in dataset ``name``: the one it already has,
    else ``wanted`` when no other source holds it, else ``wanted~<source hash>``. Two sites that
    both call a sequence "cam1" stay two sequences (their tracklets and identities apart). One
    document per claimed id (``_id`` "dataset|id"), so two concurrent ingests cannot both take
    a name."""
    import pymongo.errors

    coll = db()[SEQUENCES]
    have = coll.find_one({"dataset": name, "source_id": source_id})
    if have:
        return have["sequence"]
    for cand in (wanted, f"{wanted}~{source_id[:6]}", f"{wanted}~{source_id}"):
        try:
            coll.insert_one({"_id": f"{name}|{cand}", "dataset": name, "sequence": cand,
                             "source_id": source_id, "name": original if original is not None else wanted})
            return cand
        except pymongo.errors.DuplicateKeyError:
            doc = coll.find_one({"_id": f"{name}|{cand}"})
            if doc and doc.get("source_id") == source_id:  # a concurrent ingest of the same source
                return cand
    raise StoreError(f"no free sequence id for {wanted!r} in {name!r}")


def existing_keys(ds: fo.Dataset) -> set[str]:
    if len(ds) == 0:
        return set()
    return {k for k in ds.distinct("ingest_key") if k}


def add_samples(ds: fo.Dataset, samples: Iterable[fo.Sample]) -> list[str]:
    samples = list(samples)
    if not samples:
        return []
    return ds.add_samples(samples, progress=False)


def dataset_summary(name: str) -> dict[str, Any]:
    ds = get_dataset(name)
    vids = get_videos(name)
    return {
        "name": name,
        "samples": len(ds),
        "identities": len([i for i in ds.distinct("identity") if i]),
        "cameras": len([c for c in ds.distinct("camera") if c]),
        "videos": len(vids) if vids is not None else 0,
        "active_model": active_model(name),
    }


def counts(name: str, field: str, view: fo.DatasetView | None = None) -> dict[str, int]:
    """Counts of each value of ``field`` (``None`` counted as "(none)")."""
    coll = view if view is not None else get_dataset(name)
    return {("(none)" if k is None else str(k)): v for k, v in coll.count_values(field).items()}


def tag_counts(name: str) -> dict[str, int]:
    return get_dataset(name).count_sample_tags()


def filtered_view(name: str, filters: dict[str, Any] | None = None, tags: list[str] | None = None):
    """A view of ``name`` with equality filters per field and required tags."""
    from fiftyone import ViewField as F

    view = get_dataset(name).view()
    for field, value in (filters or {}).items():
        if value is None or value == "":
            continue
        view = view.match(F(field) == value)
    if tags:
        view = view.match_tags(tags, all=True)
    return view


# ---------------------------------------------------------------- per-dataset state

STATE = "vigil_state"
STATE_KEYS = ("active_model", "model_history", "label_schema", "condition_clusters", "maps")


def _state_coll():
    return db()[STATE]


def state(name: str) -> dict[str, Any]:
    """Vigil's state of dataset ``name`` (active model and its history, label schema, map and
    cluster records): one document of ``vigil_state`` per dataset, written one key at a time
    (:func:`set_state`), never read-modified-written whole, so a background job and an operator
    cannot undo each other's writes. Datasets made before it existed are seeded once from
    ``dataset.info``."""
    doc = _state_coll().find_one({"_id": name})
    if doc is None:
        info = get_dataset(name).info or {}  # (a clear error for a dataset that does not exist)
        seed = {k: info[k] for k in STATE_KEYS if k in info}
        _state_coll().update_one({"_id": name}, {"$setOnInsert": seed}, upsert=True)
        doc = _state_coll().find_one({"_id": name})
    return doc


def set_state(name: str, key: str, value: Any) -> None:
    """Set one key (dotted for a nested one, e.g. ``maps.map_base``) atomically (``$set``)."""
    state(name)
    _state_coll().update_one({"_id": name}, {"$set": {key: value}})


def update_state(name: str, expect: dict[str, Any], update: dict[str, Any]) -> bool:
    """Apply the MongoDB ``update`` only while the state still has the ``expect`` values
    (compare-and-set); False when another writer changed them first."""
    state(name)
    return _state_coll().update_one({"_id": name, **expect}, update).matched_count == 1


def active_model(name: str) -> str | None:
    return state(name).get("active_model")


def set_active_model(name: str, version: str | None, only_if_unset: bool = False) -> bool:
    """Make ``version`` the active model; with ``only_if_unset`` only while none is active (a
    job setting a default never overrides an operator's choice). Returns whether it was set."""
    if only_if_unset:
        return update_state(name, {"active_model": None}, {"$set": {"active_model": version}})
    set_state(name, "active_model", version)
    return True


def _version_slug(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", version)


def embedding_field(version: str) -> str:
    """Sample field that holds the vectors of model ``version``."""
    return "emb_" + _version_slug(version)


def person_field(version: str) -> str:
    """Sample field that holds model ``version``'s person-ness (0..1; core.math.personness)."""
    return "person_" + _version_slug(version)


def set_values(name: str, field: str, values_by_id: dict[str, Any]) -> None:
    """Write ``field`` for the samples whose ids are the keys (one bulk write)."""
    if not values_by_id:
        return
    ds = get_dataset(name)
    if field not in ds.get_field_schema() and all(v is None for v in values_by_id.values()):
        return  # nothing to record, and FiftyOne cannot type a new field from None alone
    ds.set_values(field, values_by_id, key_field="id")


def db():
    """The pymongo database (Vigil's own collections: jobs, model versions, leases, decisions)."""
    import fiftyone.core.odm as foo

    return foo.get_db_conn()


_probe = None


def check_db(timeout_ms: int = 2000) -> None:
    """Raise ``ConnectionError`` within ``timeout_ms`` when MongoDB does not answer.

    FiftyOne's client waits 30 s for a server before it fails; a page calls this first, so an
    outage shows at once. The probe shares FiftyOne's connection settings and, like any pymongo
    client, reconnects by itself when the server is back."""
    import fiftyone.core.odm.database as fod
    import pymongo

    global _probe
    if fod._client is None:  # not connected yet: connecting reports its own errors
        fod.get_db_conn()
    if _probe is None:
        _probe = pymongo.MongoClient(**fod._connection_kwargs, serverSelectionTimeoutMS=timeout_ms,
                                     connectTimeoutMS=timeout_ms, appname="vigil-probe")
    try:
        _probe.admin.command("ping")
    except pymongo.errors.PyMongoError as exc:
        where = fod._connection_kwargs.get("host") or f"127.0.0.1:{fod._connection_kwargs.get('port')}"
        raise ConnectionError(f"MongoDB at {where} does not answer ({type(exc).__name__})") from exc


def add_records(name: str, records: list[dict[str, Any]]) -> int:
    """Add image samples (dicts with ``filepath`` plus schema fields; ``tags`` optional).

    Records whose ``ingest_key`` is already in the dataset are skipped, so ingesting the same
    source twice adds nothing. Returns how many were added."""
    ds = get_dataset(name, create=True)
    have = existing_keys(ds)
    samples = []
    for rec in records:
        if rec.get("ingest_key") in have:
            continue
        have.add(rec.get("ingest_key"))
        rec = dict(rec)
        samples.append(fo.Sample(filepath=rec.pop("filepath"), tags=rec.pop("tags", []), **rec))
    add_samples(ds, samples)
    return len(samples)


def add_tags_by_key(name: str, tags_by_key: dict[str, list[str]]) -> None:
    """Add tags to existing samples found by ``ingest_key`` (an image seen in two split folders)."""
    ds = get_dataset(name)
    from fiftyone import ViewField as F

    for key, tags in tags_by_key.items():
        ds.match(F("ingest_key") == key).tag_samples(tags)


def has_video(name: str, key: str) -> bool:
    """Whether the companion video dataset holds the video sample ``key``."""
    from fiftyone import ViewField as F

    ds = get_videos(name)
    return ds is not None and len(ds) > 0 and ds.match(F("ingest_key") == key).count() > 0


def add_video(name: str, key: str, path: str, width: int, height: int, fps: float,
              frame_count: int, detections: dict[int, list[dict]], fields: dict[str, Any]) -> bool:
    """Add a video sample with frame-level person detections (once per ``key``).

    ``detections``: frame number (1-based) -> list of {"box": [x, y, w, h] in pixels,
    "track": int, "label": str, "confidence": float | None}."""
    ds = get_videos(name, create=True)
    if len(ds) and key in set(ds.distinct("ingest_key")):
        return False
    s = fo.Sample(filepath=path, ingest_key=key, **fields)
    s.metadata = fo.VideoMetadata(
        frame_width=width, frame_height=height, frame_rate=fps,
        total_frame_count=frame_count, duration=frame_count / fps if fps else None,
    )
    for fn, dets in detections.items():
        s.frames[fn]["detections"] = fo.Detections(detections=[
            fo.Detection(
                label=d.get("label", "person"),
                bounding_box=[d["box"][0] / width, d["box"][1] / height,
                              d["box"][2] / width, d["box"][3] / height],
                index=d.get("track"),
                confidence=d.get("confidence"),
            )
            for d in dets
        ])
    ds.add_sample(s)
    return True


def sample_rows(view, fields: list[str], limit: int | None = None) -> list[dict[str, Any]]:
    """Plain dicts (id, filepath and ``fields``) of the first ``limit`` samples of a view."""
    v = view.limit(limit) if limit else view
    cols = ["id", "filepath", *fields]
    vals = v.values(cols)
    return [dict(zip(cols, row)) for row in zip(*vals)]


def open_in_app(name: str, ids: list[str] | None = None, port: int = 5151) -> str:
    """Show ``name`` (or just ``ids``) in the FiftyOne App served on 127.0.0.1; returns its URL.

    One App server per process (the Streamlit process keeps it); later calls change its view."""
    global _SESSION
    ds = get_dataset(name)
    view = ds.select(ids) if ids else ds.view()
    if _SESSION is None:
        _SESSION = fo.launch_app(view, remote=True, address="127.0.0.1", port=port, auto=False)
    else:
        _SESSION.view = view
    return f"http://127.0.0.1:{port}/datasets/{name}"


_SESSION = None


def tag_samples(name: str, ids: list[str], tags: list[str]) -> int:
    """Add sample tags (condition tags such as night, shadow, occluded, blur) to ``ids``."""
    if not ids or not tags:
        return 0
    get_dataset(name).select(ids).tag_samples(tags)
    return len(ids)


def view_columns(name: str, fields: list[str], ids: list[str] | None = None) -> dict[str, list]:
    """Columns (``id`` plus ``fields`` that exist, others as None) of the dataset or ``ids``."""
    ds = get_dataset(name)
    view = ds.select(ids, ordered=True) if ids is not None else ds
    schema = ds.get_field_schema()
    have = [f for f in fields if f in schema or f == "tags"]
    vals = view.values(["id", *have])
    out = dict(zip(["id", *have], vals))
    n = len(out["id"])
    for f in fields:
        out.setdefault(f, [None] * n)
    return out


def last_modified(name: str):
    """When samples of ``name`` last changed (cache key for pages)."""
    ds = get_dataset(name)
    return ds.last_modified_at, len(ds)

