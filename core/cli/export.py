"""The ``export-dataset`` and ``export-model`` commands of ``python -m core`` (core.services.export)."""
from __future__ import annotations

import sys

from core.cli.bars import Bar
from core.data import store
from core.services.export import FORMATS, TREE_FIELDS, ExportError, export_dataset, export_model


def add_commands(subparsers) -> None:
    """Register ``export-dataset`` and ``export-model`` on the ``python -m core`` parser."""
    s = subparsers.add_parser("export-dataset", help="export a dataset view (FiftyOne, class "
                              "tree, COCO, manifest) under the data root's exports folder")
    s.add_argument("--dataset", required=True)
    s.add_argument("--format", default="fiftyone", choices=FORMATS)
    s.add_argument("--out", help="folder name inside the exports folder (default: generated)")
    s.add_argument("--by", default="identity", choices=TREE_FIELDS,
                   help="class field of a classification tree")
    s.add_argument("--tag", action="append", default=[], help="only samples with this tag "
                   "(repeatable: all must match)")
    s.add_argument("--camera", help="only samples of this camera")
    s.add_argument("--saved-view", help="a saved FiftyOne view of the dataset")
    s.add_argument("--embeddings", metavar="VERSION", help="include this model version's vectors")
    s.add_argument("--max-frames", type=int, help="COCO: at most this many frames")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_cmd_export_dataset)

    s = subparsers.add_parser("export-model", help="export a model version as verified ONNX "
                              "(+ int8) with a model card")
    s.add_argument("--version", default="base")
    s.add_argument("--dataset", help="for the version's metrics, verification crops and "
                   "query/gallery retrieval metrics")
    s.add_argument("--out", help="folder name inside the exports folder (default: generated)")
    s.add_argument("--int8", action="store_true", help="also write an int8 model")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_cmd_export_model)




def _cmd_export_dataset(a) -> int:
    bar = Bar(f"export {a.format}")
    try:
        rep = export_dataset(a.dataset, a.format, a.out, tags=a.tag or None,
                             filters={"camera": a.camera} if a.camera else None,
                             saved_view=a.saved_view, by=a.by, include_embeddings=a.embeddings,
                             max_frames=a.max_frames, overwrite=a.overwrite, progress=bar)
    except (ExportError, store.StoreError) as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar.close()
    extra = f", {len(rep['classes'])} classes" if isinstance(rep.get("classes"), dict) else ""
    extra += f", {rep['boxes']} boxes" if "boxes" in rep else ""
    print(f"wrote {rep['count']} items ({rep['format']}{extra}, {rep['skipped']} skipped) "
          f"to {rep['path']}")
    return 0



def _cmd_export_model(a) -> int:
    bar = Bar(f"export model {a.version}")
    try:
        rep = export_model(a.version, a.out, dataset=a.dataset, int8=a.int8,
                           overwrite=a.overwrite, progress=bar)
    except (ExportError, store.StoreError) as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar.close()
    print(f"wrote {rep['onnx']} (max abs diff vs PyTorch {rep['max_abs_diff']:.2e} on "
          f"{rep['verified_on']} crops)")
    if rep.get("onnx_int8"):
        print(f"wrote {rep['onnx_int8']} ({rep['int8_method']})")
    for k, m in (rep.get("metrics") or {}).items():
        print(f"  {k}: rank-1 {m['rank1']:.3f}  mAP {m['mAP']:.3f}  {m['ms_per_image']:.2f} ms/img")
    print(f"model card: {rep['card']}")
    return 0
