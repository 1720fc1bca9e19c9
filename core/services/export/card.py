"""What an exported model carries about itself: ONNX ``metadata_props`` and the model card."""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.services.export.base import ONNX_TOLERANCE

log = logging.getLogger("core.services.export")


def _version_record(version: str, dataset: str | None) -> tuple[int | None, dict[str, Any]]:
    """(training round, validation metrics) of ``version``: the model registry's record when
    there is one, else what the checkpoint holds; "base" has round 0 and no metrics."""
    if dataset and version != "base":  # registry.get would insert a "base" record
        try:
            from core.services import registry  # optional: fall back to the checkpoint without it

            rec = registry.get(dataset, version)
        except Exception as exc:  # noqa: BLE001 - the registry is optional: fall back
            log.debug("no registry record for %s/%s: %s", dataset, version, exc)
            rec = None
        if rec:
            rec = rec if isinstance(rec, dict) else getattr(rec, "__dict__", {})
            rnd = next((rec[k] for k in ("round", "training_round", "step") if rec.get(k)
                        is not None), None)
            return (int(rnd) if rnd is not None else None), dict(rec.get("metrics") or {})
    if version == "base":
        return 0, {}
    from core.model import embed

    ck = embed.load_checkpoint(version)
    return int(ck.get("step") or 0), dict(ck.get("metrics") or {})



def model_metadata(version: str, cfg, training_round: int | None, metrics: dict[str, Any],
                   opset: int, person: dict[str, Any] | None = None) -> dict[str, str]:
    """``metadata_props`` of an exported model (all values strings; JSON where structured)."""
    from core.model import backbones

    bb = backbones.get_backbone(cfg.backbone)
    extra = {} if person is None else {
        "person_output": "person", "person_head": json.dumps(person),
        "person_threshold": str(person.get("threshold", "")),
    }
    return {**extra,
        "vigil.format": "1",
        "version": version,
        "training_round": "" if training_round is None else str(training_round),
        "backbone": cfg.backbone,
        "input_name": "image",
        "input_layout": "NHWC",
        "input_dtype": "uint8",
        "input_size": json.dumps(list(cfg.crop_size)),  # (H, W) of crops
        "input_sizes": json.dumps({"crop": list(cfg.crop_size), "image": list(cfg.image_size)}),
        "channel_order": "BGR",
        "preprocessing": "in graph: BGR->RGB, /255, [luma normalisation], (x-mean)/std",
        "mean": json.dumps(list(bb.mean)),
        "std": json.dumps(list(bb.std)),
        "embedding_size": str(cfg.emb_dim),
        "output_name": "embedding",
        "output_normalized": "true",
        "brightness_invariant": "true" if cfg.brightness_invariant else "false",
        "validation_metrics": json.dumps(metrics, default=str),
        "opset": str(opset),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }



def _set_metadata(path: Path, meta: dict[str, str], doc: str) -> None:
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in meta.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    m.producer_name = "vigil"
    m.doc_string = doc
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))



def model_card(report: dict[str, Any], cfg) -> str:
    """A short markdown model card from an :func:`export_model` report."""
    m = report["metadata"]
    lines = [
        f"# Vigil re-ID embedding model `{report['version']}`",
        "",
        f"Exported {m['exported_at']} · training round {m['training_round'] or '-'} · "
        f"backbone {cfg.backbone} · ONNX opset {report['opset']}",
        "",
        "## Input and output",
        "",
        f"- input `image`: uint8 `[N, {cfg.crop_size[0]}, {cfg.crop_size[1]}, 3]` **BGR** "
        f"(as OpenCV decodes), dynamic batch; whole images use {tuple(cfg.image_size)} (H, W)",
        f"- preprocessing is inside the graph: BGR->RGB, /255, "
        f"{'brightness-invariant luma normalisation, ' if cfg.brightness_invariant else ''}"
        f"mean {m['mean']}, std {m['std']}",
        f"- output `embedding`: float32 `[N, {cfg.emb_dim}]`, L2-normalised: compare with cosine "
        "similarity (a dot product)",
        *_person_card(m),
        "",
        "## Verification",
        "",
        f"- `onnx.checker`: {report.get('checker')}",
        f"- ONNX Runtime vs PyTorch on {report.get('verified_on')} real crops: max abs "
        f"difference {report.get('max_abs_diff', float('nan')):.2e} (the export fails above "
        f"{report.get('tolerance', ONNX_TOLERANCE):g})",
    ]
    if report.get("int8_max_abs_diff") is not None:
        lines.append(f"- int8 vs fp32 on the same crops: max abs difference "
                     f"{report['int8_max_abs_diff']:.3f}, mean cosine similarity "
                     f"{report['int8_mean_cosine']:.3f} ({report.get('int8_method')})")
    val = json.loads(m.get("validation_metrics") or "{}")
    if val:
        lines += ["", "## Validation metrics (training round)", ""]
        lines += [f"- {k}: {v}" for k, v in sorted(val.items()) if not isinstance(v, dict)]
    mets = report.get("metrics") or {}
    if mets:
        ev = report.get("eval", {})
        lines += ["", f"## Retrieval on `{report.get('dataset')}` ({ev.get('queries')} queries, "
                      f"{ev.get('gallery')} gallery, "
                      f"{'cross-camera' if ev.get('cross_camera') else 'all cameras'})", "",
                  "| model | rank-1 | rank-5 | mAP | ms / image | size MB |",
                  "|---|---|---|---|---|---|"]
        for k, v in mets.items():
            lines.append(f"| {k} | {v['rank1']:.3f} | {v['rank5']:.3f} | {v['mAP']:.3f} | "
                         f"{v.get('ms_per_image', float('nan')):.2f} | "
                         f"{report['size_mb'].get(k, float('nan'))} |")
    lines += [
        "",
        "## Use and limits",
        "",
        "- Person re-identification embeddings for footage like the training data (camera "
        "angles, lighting, resolution); check rank-1/mAP on your own cameras before deploying.",
        "- Not a face recogniser; not for decisions about individuals without human review.",
        "- Metadata: `onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map`.",
        "",
    ]
    return "\n".join(lines)



def _person_card(meta: dict[str, str]) -> list[str]:
    """The model card's lines on the ``person`` output (none for a model without the head)."""
    if not meta.get("person_output"):
        return []
    h = json.loads(meta.get("person_head") or "{}")
    thr = h.get("threshold")
    return [
        "- output `person`: float32 `[N]` in 0..1, how much the crop looks like a person rather than a "
        "false positive of the detector (shadow, vehicle, animal, background), learnt from "
        f"{h.get('n_person', '?')} crops labelled person and {h.get('n_other', '?')} labelled otherwise",
        f"  - thresholding: drop a detection whose `person` is under **{thr:.3f}**: on the training round's "
        f"own labels (out of fold) that keeps 99 % of persons and removed {100 * h.get('fp_removed', 0):.0f} % "
        f"of false positives (cross-validated ROC AUC {h.get('cv_auc', float('nan')):.3f}); raise it to "
        "reject more, at the cost of missing people; check on your own cameras first"
        if thr is not None else "  - no threshold was recorded for this head",
    ]



def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """``metadata_props`` of an ONNX file (reads the protobuf; no torch)."""
    import onnx

    return {p.key: p.value for p in onnx.load(os.fspath(path), load_external_data=False)
            .metadata_props}
