"""Command line: ``python -m core <command>``; every command prints what it did."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from core.cli.bars import Bar


def cmd_ingest(a) -> int:
    from core.services.ingest import Detection, IngestError, ingest

    bar = Bar(f"ingest {a.kind}")
    try:
        report = ingest(a.path, a.kind, a.dataset, every_n=a.every, pattern=a.pattern, progress=bar,
                        detection=Detection(a.detector, a.person_class, a.det_conf, a.tracker, a.det_layout))
    except IngestError as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar.close()
    print(report.summary())
    for note in report.notes:
        print(f"  note: {note}")
    for where, why in report.problems:
        print(f"  skipped {where}: {why}")
    return 0


def cmd_datasets(a) -> int:
    from core.data import store

    names = store.dataset_names()
    if not names:
        print("no datasets yet: python -m core ingest PATH --kind mot|reid|images|videos --dataset NAME")
    for n in names:
        s = store.dataset_summary(n)
        print(f"{n}: {s['samples']} samples, {s['identities']} identities, {s['cameras']} cameras, "
              f"{s['videos']} videos, active model {s['active_model'] or '-'}")
    return 0


def cmd_demo(a) -> int:
    from core.cli import demo
    from core.jobs import tasks

    bar = Bar("demo dataset")
    report = demo.ensure_demo(a.dataset, progress=bar, embed=False)
    bar.close()
    print(report.summary() if report else f"dataset {a.dataset!r} already present")
    job = tasks.submit_embedding(a.dataset)  # the worker of `make run` embeds it
    if job:
        print(f"queued its embedding as job {job}: the worker embeds it and lays out the map "
              "(follow it with `python -m core jobs`)")
    return 0


def _spread_embed(a) -> int:
    """``embed --shards N``: queue the shards, then follow them until the run is finished."""
    from core.data import jobs
    from core.jobs import tasks

    run = tasks.spread_embedding(a.dataset, a.shards, version=a.model)
    rec = jobs.run_status(run)
    print(f"{a.dataset}: {rec['n']} shards queued as run {run}; the running workers embed them")
    bar = Bar(f"embed {a.dataset} (shards)")
    try:
        while not rec["finished"]:
            bar(len(rec["done"]), rec["n"])
            time.sleep(1.0)
            jobs.reconcile()  # a dead worker's shard goes back to the queue
            rec = jobs.run_status(run)
            lost = [i for i, k in rec["attempts"].items() if k >= jobs.SHARD_ATTEMPTS and int(i) not in rec["done"]]
            if lost and not any(j["state"] in ("queued", "running")
                                for j in jobs.list_jobs(a.dataset, kind="embed_shard", limit=4 * rec["n"])):
                print(f"error: shards {', '.join(lost)} failed {jobs.SHARD_ATTEMPTS} times; their job logs say why",
                      file=sys.stderr)
                return 1
        bar(rec["n"], rec["n"])
    finally:
        bar.close()
    print(f"{a.dataset}: {rec['n']} shards embedded; map, scores and similarity index refreshed by the last one")
    return 0


def cmd_embed(a) -> int:
    from core.jobs import tasks, worker

    if a.shards:
        return _spread_embed(a)
    rep = worker.LocalReporter(f"embed {a.dataset}")
    try:
        res = tasks.embed_task(a.dataset, {"version": a.model}, rep)
    finally:
        rep.close()
    print(f"{a.dataset}: {res['embedded']} embedded with {res['version']}, {res['failed']} failed in "
          f"{res['seconds']:.1f} s; map of {res['map_points']} points; {res['candidates']} misclustered candidates")
    for sid, why in list(res["errors"].items())[:10]:
        print(f"  failed {sid}: {why}")
    return 0


def cmd_worker(a) -> int:
    from core.jobs import worker

    worker.launch_worker()
    return 0


def cmd_jobs(a) -> int:
    from core.data import jobs

    for j in jobs.list_jobs(a.dataset, limit=a.limit):
        pct = f"{100 * j['progress']:.0f}%" if j["progress"] is not None else "-"
        print(f"{j['id']} {j['kind']:<7} {j['state']:<10} {pct:>5} {j['dataset']} {j['label'] or ''}"
              + (f"  error: {j['error']}" if j["error"] else ""))
    return 0


def train_config_args(a) -> dict:
    """The job config of ``train``'s flags: the preset's fields, then --steps / --frozen /
    --device / --unsupervised / --supervised (unset flags: TrainConfig's defaults, the mode auto)."""
    from core.model import train

    over = {k: v for k, v in (("steps", a.steps), ("frozen_blocks", a.frozen), ("device", a.device),
                              ("unsupervised", a.unsupervised)) if v is not None}
    return train.preset_job_config(a.preset or "default", **over)


def cmd_train(a) -> int:
    from core.data import jobs
    from core.jobs import worker
    from core.model import device, train
    from core.services import registry, rounds

    if a.resume:
        given = [f for f, v in (("--steps", a.steps), ("--frozen", a.frozen), ("--device", a.device),
                                ("--preset", a.preset),
                                ("--unsupervised" if a.unsupervised else "--supervised", a.unsupervised))
                 if v is not None]
        if given:
            print(f"error: a resumed round keeps the config it started with: drop {'/'.join(given)}", file=sys.stderr)
            return 2
        registry.resumable(a.dataset, a.resume)  # refused here, before queuing, when it cannot be
        args = {"resume_version": a.resume}
    else:
        where = device.select(None if a.device in (None, "auto") else a.device)
        if (a.preset or "default") not in train.presets_for(where):
            print(f"error: the {a.preset} preset needs a GPU (CUDA): rounds here run on {where}, where one of "
                  f"its steps costs several default steps; use --preset default, or run it on a machine "
                  f"with a GPU", file=sys.stderr)
            return 2
        args = {"config": train_config_args(a)}
    if a.background:
        job = jobs.submit(a.dataset, "train", args)
        print(f"queued {'resumed ' if a.resume else ''}round as job {job}; follow it with `python -m core jobs`")
        return 0
    rep = worker.LocalReporter(f"round {a.resume}" if a.resume else "round")
    try:
        res = rounds.run_round(a.dataset, args, rep)
    except train.TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        rep.close()
    if res.get("resumed_from"):
        print(f"{res['version']}: resumed from step {res['resumed_from']}")
    print(f"{res['version']}: rank-1 {res['rank1_before']:.3f} -> {res['rank1_after']:.3f}, "
          f"mAP {res['mAP_before']:.3f} -> {res['mAP_after']:.3f} in {res['seconds']:.0f} s (not activated: "
          "python -m core models --dataset NAME --activate VERSION)")
    mode = (f"unsupervised (pseudo-identities: {res.get('pseudo') or 'no re-clustering'}; "
            f"{res.get('proposals', 0)} proposed merges for the pair queue)" if res.get("unsupervised")
            else "supervised (labels)")
    print(f"  device {res.get('device') or '?'}, {mode}")
    return 0


def cmd_evaluate(a) -> int:
    from core.services import rounds
    from core.data import store

    version = a.version or store.active_model(a.dataset)
    cols = rounds.round_columns(a.dataset)
    split = rounds.eval_split(cols)
    if split.problem:
        print(f"error: nothing to evaluate on: {split.problem}", file=sys.stderr)
        return 2
    res = rounds.evaluate_version(a.dataset, version, split, cols)
    print(f"{a.dataset} / {version}: {res['protocol']}")
    for group, m in [("all", res["all"]), *res["by_condition"].items(), *res["by_camera"].items()]:
        print(f"  {group:<12} rank-1 {m['rank1']:.3f}  rank-5 {m['rank5']:.3f}  mAP {m['mAP']:.3f}  "
              f"({m['n_queries']} queries)")
    if res.get("reranked"):
        m = res["reranked"]
        print(f"  {'re-ranked':<12} rank-1 {m['rank1']:.3f}  rank-5 {m['rank5']:.3f}  mAP {m['mAP']:.3f}  "
              "(k-reciprocal re-ranking over queries and gallery)")
    t = res["at_threshold"]
    print(f"  at threshold {t['threshold']:.3f}: false match rate {t['fmr']:.4f}, true match rate {t['tmr']:.3f}")
    return 0


def cmd_models(a) -> int:
    from core.services import registry
    from core.data import store

    if a.activate:
        registry.activate(a.dataset, a.activate)
    if a.rollback:
        print(f"rolled back to {registry.rollback(a.dataset)}")
    active = store.active_model(a.dataset)
    for v in registry.list_versions(a.dataset):
        m = (v.get("metrics") or {}).get("all", {})
        perf = f"rank-1 {m['rank1']:.3f} mAP {m['mAP']:.3f}" if m.get("mAP") is not None else ""
        print(f"{'*' if v['version'] == active else ' '} {v['version']:<20} round {v.get('round', 0):<3} "
              f"{v['status']:<10} from {v.get('parent') or '-':<16} {perf}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m core", description="Vigil command line")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("ingest", help="import footage into a dataset")
    s.add_argument("path")
    s.add_argument("--kind", required=True, choices=["mot", "reid", "images", "videos"])
    s.add_argument("--dataset", required=True)
    s.add_argument("--every", type=int, default=5, help="keep every Nth frame of each track (mot, videos)")
    s.add_argument("--pattern", default="campus62",
                   help="re-ID file-name pattern: campus62, market1501, folder, or a regex with "
                        "named groups identity/camera/view")
    g = s.add_argument_group("raw footage (videos; MOT folders with det/det.txt and no gt)",
                             "boxes come from a detection file beside each clip (<clip>.det.txt, <clip>.csv, "
                             "det/<clip>.txt, det/det.txt), else --detector, else OpenCV's HOG (weak)")
    g.add_argument("--detector", metavar="MODEL.onnx",
                   help="the site's ONNX person detector (Ultralytics YOLOv5/v8/v11, YOLOX, end-to-end exports)")
    g.add_argument("--person-class", default="person", help="the detector's person class, by name or index")
    g.add_argument("--det-conf", type=float, default=0.25, help="lowest detector score kept")
    g.add_argument("--det-layout", default="auto", choices=["auto", "yolov8", "yolov5", "yolox", "e2e"],
                   help="the detector's output layout, where its shape fits several")
    g.add_argument("--tracker", choices=["bytetrack", "iou"], default="bytetrack",
                   help="ByteTrack (default) or the old greedy overlap linker")
    s.set_defaults(fn=cmd_ingest)

    s = sub.add_parser("datasets", help="list datasets with counts")
    s.set_defaults(fn=cmd_datasets)

    s = sub.add_parser("demo", help="generate and import the synthetic default dataset")
    s.add_argument("--dataset", default="demo")
    s.set_defaults(fn=cmd_demo)

    from core.cli import export as cli_export
    from core.cli import labeling as cli_labeling
    from core.data import store

    cli_labeling.add_commands(sub)  # query
    cli_export.add_commands(sub)  # export-dataset, export-model

    s = sub.add_parser("embed", help="embed every sample, lay out the map and score the samples")
    s.add_argument("--dataset", required=True)
    s.add_argument("--model", help="model version (default: the active one, else base)")
    s.add_argument("--shards", type=int, default=0,
                   help="split the work into this many jobs that every running worker (python -m core "
                        "worker, here or on another machine on the same MongoDB) takes from, and wait")
    s.set_defaults(fn=cmd_embed)

    s = sub.add_parser("train", help="run a fine-tuning round (foreground with progress, or --background)")
    s.add_argument("--dataset", required=True)
    s.add_argument("--steps", type=int)
    s.add_argument("--frozen", type=int, help="early MobileNetV2 blocks kept frozen")
    s.add_argument("--background", action="store_true", help="queue it for the worker instead")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="where it trains (default auto: CUDA when torch sees a GPU, else the CPU; VIGIL_DEVICE)")
    s.add_argument("--preset", choices=["default", "quality"],
                   help="starting config: default, or quality (256x128 crops, more steps; needs a GPU)")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--unsupervised", dest="unsupervised", action="store_const", const=True,
                      help="learn from unlabelled footage: cluster tracklets across cameras into "
                           "pseudo-identities (default: on when no identity is verified)")
    mode.add_argument("--supervised", dest="unsupervised", action="store_const", const=False,
                      help="train on the identity graph's identities only (no pseudo-identities)")
    s.add_argument("--resume", metavar="VERSION", help="continue a failed or cancelled round from its last "
                   "evaluation, in its own version and with its own config")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("evaluate", help="retrieval metrics of a model version on the held-out split")
    s.add_argument("--dataset", required=True)
    s.add_argument("--version")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("models", help="list model versions; activate or roll back")
    s.add_argument("--dataset", required=True)
    s.add_argument("--activate", metavar="VERSION")
    s.add_argument("--rollback", action="store_true")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("worker", help="run background jobs (FiftyOne delegated operations)")
    s.set_defaults(fn=cmd_worker)

    s = sub.add_parser("jobs", help="list background jobs")
    s.add_argument("--dataset")
    s.add_argument("--limit", type=int, default=20)
    s.set_defaults(fn=cmd_jobs)

    a = p.parse_args(argv)
    from core.services.export import ExportError
    from core.services.ingest import IngestError
    from core.data.jobs import JobError
    from core.services.registry import RegistryError
    from core.model.train import TrainingError

    try:
        return a.fn(a)
    except (store.StoreError, IngestError, JobError, RegistryError, ExportError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
