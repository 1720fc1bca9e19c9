"""The work behind each background job kind (:data:`TASKS`, one per kind of :data:`core.data.jobs.KINDS`), and the functions
that validate and queue the ingest and export jobs.

Each task: ``fn(dataset, args, reporter) -> dict`` (JSON-safe summary). They run inside the
worker's child process, report progress through the :class:`core.data.jobs.Reporter` and stop when
it says so. ``submit_*`` check what can be checked at once (a missing folder, a bad export name)
and raise the core error, so the operator sees it before anything is queued.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from core.services import analysis
from core.data import jobs
from core.data.jobs import Reporter

log = logging.getLogger(__name__)

PROBLEMS_KEPT = 500  # an ingest job's result lists this many skipped files; its log has them all


def submit_embedding(dataset: str) -> str | None:
    """Queue an ``embed`` job with the packaged model unless ``dataset`` has an active model or
    an embedding job is already queued or running; returns the job id, or None when nothing was
    queued (so a second click or a second ``make run`` does not embed twice)."""
    from core.data import store

    if store.active_model(dataset) or embedding_pending(dataset):
        return None
    return jobs.submit(dataset, "embed", {})


def embedding_pending(dataset: str) -> bool:
    """Whether an ``embed`` job (or a shard of a spread one) of ``dataset`` is queued or running."""
    return any(j["state"] in ("queued", "running")
               for j in jobs.list_jobs(dataset, kind=("embed", "embed_shard"), limit=20))


def embed_task(dataset: str, args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Embed every sample with model ``args['version']`` (default: the active one), then lay out
    its map, score the samples and queue the first pair questions, so the Map and Annotate
    pages are ready when the job ends."""
    from core.services import embedding
    from core.data import store

    report = embedding.embed_dataset(dataset, version=args.get("version"), progress=reporter.span(0.0, 0.6, "embedding"))
    version = args.get("version") or store.active_model(dataset)
    report.update(analysis.refresh_map(dataset, version, reporter, 0.6, 0.95))
    report.update(_first_pairs(dataset, reporter))
    return report


def _first_pairs(dataset: str, reporter: Reporter) -> dict[str, Any]:
    """After a dataset's embedding: its first pair questions, so the Annotate page has them at
    once (:func:`core.services.labeling.pairs.prepare`). A failure here leaves the embedding
    done: the page computes the batch itself, as before."""
    from core.services.labeling import pairs

    reporter.progress(0.95, "first pair questions", force=True)
    try:
        return {"pairs_queued": pairs.prepare(dataset)}
    except Exception as exc:  # noqa: BLE001 - the embedding and the map are done and kept
        log.warning("%s: first pair batch not queued: %s", dataset, exc)
        return {"pairs_queued": 0, "pairs_error": str(exc)}


def spread_embedding(dataset: str, shards: int, version: str | None = None) -> str:
    """Embed ``dataset`` with ``version`` (default: the active model, else "base") as ``shards``
    ``embed_shard`` jobs that any running worker takes, on this machine or another against the
    same MongoDB; the last shard to finish lays out the map, scores the samples and brings the
    similarity index up to date, as one ``embed`` job would. Returns the run's id
    (:func:`core.data.jobs.run_status`)."""
    from core.data import store
    from core.model.embed import BASE

    if shards < 1:
        raise jobs.JobError(f"shards must be at least 1, not {shards}")
    version = version or store.active_model(dataset) or BASE
    ids = store.view_columns(dataset, [])["id"]
    if not ids:
        raise jobs.JobError(f"dataset {dataset!r} has no samples to embed")
    cuts = np.linspace(0, len(ids), min(shards, len(ids)) + 1).astype(int)
    return jobs.create_run(dataset, version, [ids[a:b] for a, b in zip(cuts[:-1], cuts[1:])])


def embed_shard_task(dataset: str, args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """One shard of :func:`spread_embedding`: embed its samples; the shard that completes the run
    then refreshes the similarity index, the map and the scores."""
    from core.services import embedding

    i, n, version = args["shard"], args["of"], args["version"]
    report = embedding.embed_dataset(dataset, version=version, ids=args["ids"], update_index=False,
                                     progress=reporter.span(0.0, 0.8, f"embedding shard {i + 1}/{n}"))
    report.update(shard=i, of=n, run=args["run"], finished_run=jobs.shard_done(args["run"], i))
    if report["finished_run"]:
        reporter.progress(0.8, "last shard: similarity index", force=True)
        embedding.refresh_index(dataset, version)
        report.update(analysis.refresh_map(dataset, version, reporter, 0.85, 0.95))
        report.update(_first_pairs(dataset, reporter))
        jobs.finish_run(args["run"])
    return report


def layout_task(dataset: str, args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Compute (or reuse) the map layout of a model version and rescore the samples."""
    from core.data import store

    return analysis.refresh_map(dataset, args.get("version") or store.active_model(dataset), reporter)


def train_task(dataset: str, args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """One fine-tuning round, then ONNX export, re-embedding, map, scores and evaluation."""
    from core.services import rounds

    return rounds.run_round(dataset, args, reporter)


# ------------------------------------------------------------------ ingest and export jobs

def _json_safe(obj: Any) -> Any:
    """``obj`` as plain JSON types (numpy scalars to numbers, paths and dates to strings)."""
    def default(o: Any) -> Any:
        return o.item() if hasattr(o, "item") else str(o)

    return json.loads(json.dumps(obj, default=default))


def submit_ingest(path: str | Path, kind: str, dataset: str, every_n: int = 5,
                  pattern: str = "campus62", detector: str | None = None, person_class: str | int = "person",
                  det_conf: float = 0.25, tracker: str = "bytetrack", det_layout: str = "auto") -> str:
    """Queue an ingest of ``path`` into ``dataset`` (created when missing); returns the job id.
    A missing, unreadable or wrongly laid out folder raises :class:`core.services.ingest.IngestError` and a
    bad dataset name :class:`core.data.store.StoreError` here, before anything is queued."""
    from core.services.ingest import Detection, check_source

    src = check_source(path, kind, int(every_n)).absolute()  # the worker may run elsewhere
    detection = Detection(str(Path(detector).expanduser().absolute()) if detector else None,
                          person_class, float(det_conf), tracker, det_layout)
    detection.open()  # a model that cannot be used (format, layout, class name) is refused at once
    return jobs.submit(dataset, "ingest", {"path": str(src), "kind": kind, "every_n": int(every_n),
                                           "pattern": pattern, "detection": asdict(detection)}, create=True)


def ingest_task(dataset: str, args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """Ingest ``args['path']`` as ``args['kind']``; the result is the ingest report with the
    first :data:`PROBLEMS_KEPT` skipped files. A cancelled ingest keeps what it added (ingesting
    the same folder again adds only what is missing)."""
    from core.services.ingest import Detection, ingest

    rep = ingest(args["path"], args["kind"], dataset, every_n=int(args.get("every_n", 5)),
                 pattern=args.get("pattern", "campus62"), progress=reporter.span(label="ingesting"),
                 detection=Detection(**(args.get("detection") or {})))
    return {"source": rep.source, "kind": rep.kind, "dataset": rep.dataset, "added": rep.added,
            "duplicates": rep.duplicates, "videos": rep.videos, "summary": rep.summary(), "notes": rep.notes,
            "problems": [list(p) for p in rep.problems[:PROBLEMS_KEPT]],
            "problems_total": len(rep.problems)}


def submit_export_dataset(dataset: str, fmt: str, out_name: str | None = None, **options: Any) -> str:
    """Queue :func:`core.services.export.export_dataset` of ``dataset`` (``options``: its keyword
    arguments but ``view``/``progress``); an unknown format, a folder name leading outside the
    export folder or an existing folder (without ``overwrite``) raise ExportError here."""
    from core.services import export

    if fmt not in export.FORMATS:
        raise export.ExportError(f"unknown format {fmt!r}: choose one of {', '.join(export.FORMATS)}")
    out_name = out_name or export.dataset_export_name(dataset, fmt)
    export.export_target(out_name, bool(options.get("overwrite")))
    return jobs.submit(dataset, "export_dataset", _json_safe({"fmt": fmt, "out_name": out_name, **options}))


def export_dataset_task(dataset: str, args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """A dataset export; cancelling removes its partly written folder. Class counts come back as
    ``class_counts`` pairs (class names are not safe as database keys)."""
    from core.services import export

    args = dict(args)
    rep = export.export_dataset(dataset, args.pop("fmt"), args.pop("out_name", None),
                                progress=reporter.span(label="exporting"), **args)
    if isinstance(rep.get("classes"), dict):
        rep["class_counts"] = sorted(rep.pop("classes").items())
    return _json_safe(rep)


def submit_export_model(dataset: str, version: str, out_name: str | None = None, int8: bool = False,
                        overwrite: bool = False) -> str:
    """Queue :func:`core.services.export.export_model` of ``version``, verified and evaluated on
    ``dataset``'s crops; a bad folder name raises ExportError here."""
    from core.services import export

    out_name = out_name or export.model_export_name(version)
    export.export_target(out_name, overwrite)
    return jobs.submit(dataset, "export_model", {"version": version, "out_name": out_name,
                                                 "int8": bool(int8), "overwrite": bool(overwrite)})


def export_model_task(dataset: str, args: dict[str, Any], reporter: Reporter) -> dict[str, Any]:
    """ONNX export (and int8) of a model version with its verification report."""
    from core.services import export

    rep = export.export_model(args["version"], args.get("out_name"), dataset=dataset,
                              int8=bool(args.get("int8")), overwrite=bool(args.get("overwrite")),
                              progress=reporter.span(label="exporting model"))
    return _json_safe(rep)


# kind -> the task a worker runs: fn(dataset, args, reporter) -> result dict
TASKS = {"embed": embed_task, "embed_shard": embed_shard_task, "layout": layout_task, "train": train_task, "ingest": ingest_task,
         "export_dataset": export_dataset_task, "export_model": export_model_task}
