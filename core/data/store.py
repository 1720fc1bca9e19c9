"""Every FiftyOne / MongoDB access of Vigil: datasets, fields, views, label writes.

Size: the one door to the database, on purpose: every dataset, field, view and raw-collection call
of Vigil is here, so a FiftyOne or MongoDB upgrade is checked in one file.

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

import gc
import logging
import re
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

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


# Sample fields with a database index: ``ingest_key`` (an ingest's idempotence), and what the
# pages count or look up on every run: ``identity`` and ``camera`` (their distinct values, an
# index scan), ``labelled_by`` (the labelled samples: a progress or queue count reads only
# those), ``tracklet`` (one tracklet's crops). Without them each was a scan of every sample:
# at 100k crops the Annotate page's progress took 0.5-0.7 s, distinct identities 0.1 s.
INDEXED = ("ingest_key", "identity", "camera", "labelled_by", "tracklet")


class StoreError(RuntimeError):
    """A database operation that cannot be done, with what the operator can do about it."""


def _ensure_schema(ds: fo.Dataset) -> fo.Dataset:
    schema = ds.get_field_schema()
    for name, ftype in SAMPLE_SCHEMA.items():
        if name not in schema:
            ds.add_sample_field(name, ftype)
    have = ds.list_indexes()
    missing = [f for f in INDEXED if f not in have]
    if missing:  # on the collection itself: labelling declares some of these fields later
        coll = sample_collection(ds.name)[0]
        for f in missing:
            coll.create_index(f)
    return ds


def declare_fields(ds: fo.Dataset, fields: dict[str, str]) -> None:
    """Declare sample fields ``{name: FiftyOne field class name, e.g. "StringField"}`` that ``ds``
    does not have yet; a field another process declared meanwhile is taken as it is."""
    schema = ds.get_field_schema()
    for f, ftype in fields.items():
        if f not in schema:
            try:
                ds.add_sample_field(f, getattr(fo, ftype))
            except ValueError:  # another process added it meanwhile
                ds.reload()


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


_OPEN: dict[str, tuple[tuple, fo.Dataset]] = {}  # name -> (its document's id and last change, dataset)


def _doc_key(name: str) -> tuple | None:
    doc = db()["datasets"].find_one({"name": name}, {"last_modified_at": 1})
    return None if doc is None else (doc["_id"], doc.get("last_modified_at"))


def get_dataset(name: str, create: bool = False) -> fo.Dataset:
    """The persistent image dataset ``name``; with ``create`` it is made when missing.

    FiftyOne keeps one ``fo.Dataset`` per process, and another process (a job, a second app)
    may change its schema, so the dataset is loaded and reloaded only when its document changed
    since this process last did (its ``_id`` and ``last_modified_at``, which every field, info
    or run change moves; samples are always read from the database): one indexed lookup instead
    of a load that writes ``last_loaded_at``, a reload and an index listing, 45 ms a call that
    a page run made a dozen times."""
    check_dataset_name(name)
    key = _doc_key(name)
    if key is not None:
        hit = _OPEN.get(name)
        if hit is not None and hit[0] == key and not hit[1].deleted:
            return hit[1]
        ds = fo.load_dataset(name)
        ds.reload()  # FiftyOne caches datasets per process; jobs write from another process
        ds = _ensure_schema(ds)
        _OPEN[name] = (_doc_key(name), ds)
        return ds
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
    """Delete ``name``, its companion videos, its brain runs with their external tables (the
    similarity indexes) and its records."""
    for n in (name, name + VIDEOS_SUFFIX):
        if fo.dataset_exists(n):
            ds = fo.load_dataset(n)
            for key in ds.list_brain_runs(type="similarity"):
                try:  # FiftyOne's run cleanup leaves a LanceDB table behind: the index drops its own
                    ds.load_brain_results(key, cache=False).cleanup()
                except Exception as exc:  # noqa: BLE001 - an unreachable index must not keep the dataset
                    log.warning("could not drop similarity index %s of %s: %s", key, n, exc)
            ds.delete_brain_runs()
            fo.delete_dataset(n)
        _OPEN.pop(n, None)
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
        "identities": len(distinct(name, "identity")),
        "cameras": len(distinct(name, "camera")),
        "videos": len(vids) if vids is not None else 0,
        "active_model": active_model(name),
    }


def distinct(name: str, field: str) -> list:
    """The distinct values (not None or empty) of the plain, indexed sample field ``field``
    (:data:`INDEXED`), sorted: read from its index (1 ms at 100k samples, against 0.2 s for
    FiftyOne's ``distinct()``, an aggregation over every sample)."""
    if field not in INDEXED:
        raise ValueError(f"distinct() reads an index; {field!r} has none (indexed: {INDEXED})")
    coll, _ = sample_collection(name)
    return sorted((v for v in coll.distinct(field) if v is not None and v != ""), key=str)


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
    set_columns(name, {field: values_by_id})


def set_columns(name: str, columns: dict[str, dict[str, Any]]) -> None:
    """Write several fields, each ``{sample id: value}``, resolving the dataset once (one bulk
    write per field). A new field whose values are all None is skipped: nothing to record, and
    FiftyOne cannot type a field from None alone."""
    columns = {f: v for f, v in columns.items() if v}
    if not columns:
        return
    ds = get_dataset(name)
    schema = ds.get_field_schema()
    for field, values_by_id in columns.items():
        if field in schema or any(v is not None for v in values_by_id.values()):
            ds.set_values(field, values_by_id, key_field="id")


def db():
    """The pymongo database (Vigil's own collections: jobs, model versions, leases, decisions)."""
    import fiftyone.core.odm as foo

    return foo.get_db_conn()


_probe = None


def check_db(timeout_ms: int = 2000) -> None:
    """Raise ``ConnectionError`` within ``timeout_ms`` when MongoDB does not answer.

    FiftyOne's client waits 30 s for a server before it fails; a page calls this first, so an
    outage shows at once. The probe is a second pymongo client to the same server (FiftyOne's
    ``database_uri``, else the address of its own client, read without waiting for a server) and,
    like any pymongo client, reconnects by itself when the server is back."""
    import fiftyone.core.odm as foo
    import pymongo

    global _probe
    if _probe is None:
        uri = fo.config.database_uri
        if not uri:  # FiftyOne's own mongod: connecting starts it and reports its own errors
            seeds = foo.get_db_client().topology_description.server_descriptions()
            host, port = next(iter(seeds))
            uri = f"mongodb://{host}:{port}"
        _probe = pymongo.MongoClient(uri, serverSelectionTimeoutMS=timeout_ms,
                                     connectTimeoutMS=timeout_ms, appname="vigil-probe")
    try:
        _probe.admin.command("ping")
    except pymongo.errors.PyMongoError as exc:
        where = ",".join(f"{h}:{p}" for h, p in _probe.topology_description.server_descriptions())
        raise ConnectionError(f"MongoDB at {where} does not answer ({type(exc).__name__})") from exc


def is_outage(exc: BaseException) -> bool:
    """True for errors that mean MongoDB does not answer (not for a bug or a bad request)."""
    import pymongo.errors as pe

    return isinstance(exc, (ConnectionError, pe.ConnectionFailure, pe.ServerSelectionTimeoutError))


def sample_collection(name: str):
    """The raw pymongo collection of dataset ``name``'s samples and the dataset document's id, for
    compare-and-set writes FiftyOne's API has no call for. Both come from FiftyOne's own
    ``datasets`` collection (its stored, migration-kept layout), not from private attributes of
    ``fo.Dataset``; :class:`StoreError` when there is no such dataset."""
    doc = db()["datasets"].find_one({"name": name}, {"sample_collection_name": 1})
    if doc is None:
        raise StoreError(f"no dataset named {name!r}")
    return db()[doc["sample_collection_name"]], str(doc["_id"])


def upsert_if(coll, filter: dict[str, Any], update: dict[str, Any]) -> bool:
    """Compare-and-set on a document with a known ``_id``: apply ``update`` where ``filter`` matches,
    insert it when no document has that ``_id``; False (nothing written) when the document exists
    but does not match, i.e. another session holds it (the upsert's duplicate key). The primitive
    behind per-sample leases, the identity graph's lock and pair questions."""
    from pymongo.errors import DuplicateKeyError

    try:
        coll.update_one(filter, update, upsert=True)
    except DuplicateKeyError:
        return False
    return True


def update_each_if(coll, updates: list[tuple[dict[str, Any], dict[str, Any]]]) -> int:
    """Compare-and-set on many documents in one round trip: each ``(filter, update)`` is applied
    where its filter matches (an unordered bulk write); returns how many matched."""
    from pymongo import UpdateOne

    if not updates:
        return 0
    return coll.bulk_write([UpdateOne(f, u) for f, u in updates], ordered=False).matched_count


def insert_missing(coll, docs: dict[str, dict[str, Any]]) -> None:
    """``docs`` ({_id: fields}) inserted in one unordered batch where no document has that ``_id``
    yet; existing ones are left as they are."""
    from pymongo import UpdateOne

    if docs:
        coll.bulk_write([UpdateOne({"_id": k}, {"$setOnInsert": v}, upsert=True) for k, v in docs.items()],
                        ordered=False)


def object_id(value: str):
    """``value`` (a sample or job id as text) as the database's id type; ``ValueError`` when it
    is not one."""
    from bson import ObjectId
    from bson.errors import InvalidId

    try:
        return ObjectId(value)
    except (InvalidId, TypeError) as exc:
        raise ValueError(f"{value!r} is not a database id") from exc


def is_object_id(value: Any) -> bool:
    from bson import ObjectId

    return ObjectId.is_valid(value)


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


def top_rows(name: str, field: str, fields: list[str], limit: int | None = None) -> list[dict[str, Any]]:
    """Rows (:func:`sample_rows`) of the samples whose ``field`` is above 0, highest first; [] when
    the dataset has no such field."""
    from fiftyone import ViewField as F

    ds = get_dataset(name)
    if field not in ds.get_field_schema():
        return []
    return sample_rows(ds.match(F(field) > 0).sort_by(field, reverse=True), [field, *fields], limit=limit)


def tracklet_values(name: str, tracklet: str, fields: list[str]) -> list[list]:
    """``fields`` of the crops of ``tracklet`` that have all of them, one list per field."""
    from fiftyone import ViewField as F

    view = get_dataset(name).match(F("tracklet") == tracklet)
    for f in fields:
        view = view.exists(f)
    return view.values(fields) if view.count() else [[] for _ in fields]


def embedded_columns(name: str, version: str, fields: list[str],
                     any_of: list[str] | None = None) -> dict[str, list] | None:
    """Columns ``id`` and ``fields`` of the samples holding an embedding of ``version`` (with
    ``any_of``: and at least one of those fields set) and their vectors as ``X`` float32 [N, D]
    ([0, 1] when none), read in one pass; None when the dataset has no embeddings of
    ``version``. Fields the dataset lacks are left out. The one loader of "ids + vectors" that
    analysis, labelling and "more like this" share."""
    import numpy as np

    from fiftyone import ViewField as F

    ds = get_dataset(name)
    ef = embedding_field(version)
    schema = ds.get_field_schema()
    if ef not in schema:
        return None
    fields = [f for f in dict.fromkeys(fields) if f in schema or f == "tags"]
    if type(schema[ef]) is fo.VectorField and all(f == "tags" or _plain(schema[f]) for f in fields):
        with no_gc():
            out = _raw_embedded(name, ef, fields, any_of)
    else:
        view = ds.exists(ef)
        if any_of:
            expr = F(any_of[0]) != None  # noqa: E711
            for f in any_of[1:]:
                expr = expr | (F(f) != None)  # noqa: E711
            view = view.match(expr)
        out = dict(zip(["id", "X", *fields], view.values(["id", ef, *fields])))
    vecs = out["X"]
    out["X"] = np.stack([np.asarray(v, np.float32) for v in vecs]) if vecs else np.zeros((0, 1), np.float32)
    return out


def _raw_embedded(name: str, ef: str, fields: list[str], any_of: list[str] | None) -> dict[str, list]:
    """:func:`embedded_columns` read with one projected ``find``, the vectors decoded here: a
    VectorField is stored as a zlib-compressed ``.npy`` per sample (fiftyone.core.utils
    ``serialize_numpy_array``); rows sharing the first row's header are read with
    ``np.frombuffer``, any other through ``np.load``, as FiftyOne would (10k x 256: 0.27 s
    against 0.86 s through ``values()``)."""
    import io
    import zlib

    import numpy as np

    coll, _ = sample_collection(name)
    query: dict[str, Any] = {ef: {"$ne": None}}
    if any_of:
        query = {"$and": [query, {"$or": [{f: {"$ne": None}} for f in any_of]}]}
    out: dict[str, list] = {"id": [], "X": [], **{f: [] for f in fields}}
    head: tuple[bytes, np.dtype] | None = None
    for d in coll.find(query, {ef: 1, **{f: 1 for f in fields}}, batch_size=10_000):
        raw = d[ef]
        if isinstance(raw, (bytes, bytearray)):
            buf = zlib.decompress(raw)
            if head is None:
                with io.BytesIO(buf) as f:
                    arr = np.load(f)
                if arr.ndim == 1:
                    n = arr.nbytes
                    head = (buf[: len(buf) - n], arr.dtype)
                vec = arr
            elif buf.startswith(head[0]):
                vec = np.frombuffer(buf, head[1], offset=len(head[0]))
            else:
                with io.BytesIO(buf) as f:
                    vec = np.load(f)
        else:  # a list (written without FiftyOne's VectorField serialization)
            vec = raw
        out["id"].append(str(d["_id"]))
        out["X"].append(vec)
        for f in fields:
            out[f].append(d.get(f))
    return out


def split_columns(name: str, split: str, fields: list[str]) -> list[list]:
    """``fields`` of the samples of ``split`` ("query", "gallery": the ``split`` field or a tag of
    that name) that have an identity, ordered by file path, one list per field."""
    from fiftyone import ViewField as F

    v = get_dataset(name).match(((F("split") == split) | F("tags").contains(split))
                                & (F("identity") != None)).sort_by("filepath")  # noqa: E711
    return list(v.values(fields))


def crop_paths(name: str, limit: int) -> list[str]:
    """File paths of the first ``limit`` crops (samples not of kind "image"), ordered by path."""
    from fiftyone import ViewField as F

    return list(get_dataset(name).match(F("kind") != "image").sort_by("filepath").limit(limit).values("filepath"))


def declare_point_field(ds: fo.Dataset, field: str) -> None:
    """Declare ``field`` as a list of floats (a map position) when ``ds`` lacks it."""
    if field not in ds.get_field_schema():
        ds.add_sample_field(field, fo.ListField, subfield=fo.FloatField)


def register_visualization(ds: fo.Dataset, key: str, ids: list[str], points, stale=frozenset()) -> None:
    """(Re)create FiftyOne brain visualization run ``key`` whose points field ``key`` holds
    ``points`` [N, 2] for samples ``ids`` and nothing for the others (``stale``: ids whose old
    position is cleared when the run did not exist yet)."""
    import fiftyone.brain as fob
    import numpy as np

    if key in ds.list_brain_runs():
        ds.delete_brain_run(key)  # its cleanup drops the points field (stale values with it)
    elif stale and key in ds.get_field_schema():
        set_values(ds.name, key, {i: None for i in stale})
    fob.compute_visualization(
        ds.select(ids),
        points={i: np.asarray(p, np.float64) for i, p in zip(ids, points)},
        brain_key=key,
        points_field=key,
        create_index=False,
        progress=False,
    )


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


_PLAIN = (fo.StringField, fo.IntField, fo.FloatField, fo.BooleanField)


def _plain(ftype) -> bool:
    """A field stored as the value Python reads (no conversion by FiftyOne): a string, number,
    boolean or a list of them (not vectors, dates, documents or ids, which FiftyOne converts)."""
    if type(ftype) is fo.ListField:
        return ftype.field is None or type(ftype.field) in _PLAIN
    return type(ftype) in _PLAIN


@contextmanager
def no_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused for a bulk read or rebuild: such code allocates
    millions of small objects that hold no cycles, and the collector's passes over a heap that
    already holds 100k samples' columns were most of the time (an identity-graph replay of 100k
    crops: 2.2-2.5 s with it, 0.7-0.9 s without; reading its 17 columns: 1.3-2.4 s against
    0.9-1.2 s). Reference counting frees as usual; the collector resumes afterwards (unless it
    was off already)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def view_columns(name: str, fields: list[str], ids: list[str] | None = None) -> dict[str, list]:
    """Columns (``id`` plus ``fields`` that exist, others as None) of the dataset or ``ids`` (in
    that order; ids that are not samples are left out).

    Plain fields (see :func:`_plain`) are read with one projected ``find`` on the samples
    collection: the same values and order as FiftyOne's ``values()``, which converts every
    value through its document layer (17 columns of 10k samples: 0.05 s against 0.45 s). Any
    other field goes through ``values()``."""
    ds = get_dataset(name)
    schema = ds.get_field_schema()
    have = [f for f in dict.fromkeys(fields) if (f in schema or f == "tags") and f != "id"]
    if all(f == "tags" or _plain(schema[f]) for f in have):
        with no_gc():
            out = _plain_columns(name, have, ids)
    else:
        view = ds.select(ids, ordered=True) if ids is not None else ds
        out = dict(zip(["id", *have], view.values(["id", *have])))
    n = len(out["id"])
    for f in fields:
        out.setdefault(f, [None] * n)
    return out


def _plain_columns(name: str, fields: list[str], ids: list[str] | None) -> dict[str, list]:
    coll, _ = sample_collection(name)
    query = {} if ids is None else {"_id": {"$in": [object_id(i) for i in ids]}}
    docs = coll.find(query, {f: 1 for f in fields}, batch_size=10_000)
    if ids is None:
        rows = [(str(d.pop("_id")), d) for d in docs]
    else:
        found = {str(d.pop("_id")): d for d in docs}
        rows = [(i, found[i]) for i in dict.fromkeys(ids) if i in found]
    out = {"id": [i for i, _d in rows]}
    for f in fields:
        out[f] = [d.get(f) for _i, d in rows]
    return out


def last_modified(name: str) -> tuple:
    """A stamp that changes whenever a sample of ``name`` is written, added or deleted (the cache
    key of the pages' maps and counts and of the identity graph): the newest sample
    ``last_modified_at`` (FiftyOne indexes it and sets it on its own writes; Vigil's
    compare-and-set writes set it too) and the sample count. Two indexed lookups, no scan. (The
    dataset document's ``last_modified_at`` is no such stamp: sample edits leave it as it was.)"""
    coll, _ = sample_collection(name)
    newest = coll.find_one({}, {"last_modified_at": 1}, sort=[("last_modified_at", -1)])
    return (newest or {}).get("last_modified_at"), coll.estimated_document_count()

