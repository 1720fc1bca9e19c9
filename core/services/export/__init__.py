"""Export: curated datasets in standard formats and verified ONNX models for the edge.

Everything is written under ``settings().exports_dir`` and nowhere else:

- :func:`safe_export_path` turns an operator-given folder name into a path inside the export
  root and refuses anything that escapes it (``..``, an absolute path elsewhere, a symlink that
  points out, an empty name).
- Each export is written into a temporary sibling folder (``.NAME.tmp-*``) and renamed into
  place when complete, so a failed or killed export leaves no half folder under its name.

Dataset formats (:func:`export_dataset`), all with FiftyOne's own exporters:

==========================  ==================================================================
``fiftyone``                ``fo.types.FiftyOneDataset``: media, every field, tags, labelling
                            fields; embeddings only of the chosen model version
``classification-tree``     ``ImageClassificationDirectoryTree``: ``<class>/<image>`` by the
                            ``label`` or ``identity`` field (unlabelled samples are skipped)
``coco``                    ``COCODetectionDataset`` of video frames with person boxes (the
                            companion ``NAME__videos`` dataset), frames decoded with OpenCV
``manifest``                ``manifest.csv`` + ``manifest.parquet`` (one row per sample), plus
                            ``embeddings_<version>.npy`` [N, D] in manifest row order
==========================  ==================================================================

Model export (:func:`export_model`): ONNX (opset >= 17, dynamic batch) with metadata in
``metadata_props``, checked with ``onnx.checker``, verified against PyTorch on real crops with
ONNX Runtime (max abs difference; above :data:`ONNX_TOLERANCE` the export fails, and rounds run
the same check on their model file with :func:`verify_onnx`), optional int8 (ONNX Runtime static QDQ quantization
calibrated on real crops, dynamic when none) with retrieval metrics next to fp32, and a model
card (``MODEL_CARD.md``).

Progress callbacks are ``progress(done, total, msg)``.
"""
from __future__ import annotations

from core.services.export.base import (Progress, FORMATS, LABEL_FIELDS, MANIFEST_COLUMNS, ONNX_TOLERANCE, VERIFY_CROPS, export_root, safe_export_path, dataset_export_name, model_export_name, export_target, retrieval_metrics, embedding_versions, model_versions)  # noqa: F401
from core.data.exporters import TREE_FIELDS, ExportError, resolve_view  # noqa: F401
from core.services.export.datasets import (export_dataset, manifest_rows)  # noqa: F401
from core.services.export.card import (_version_record, model_card, model_metadata, read_metadata)  # noqa: F401
from core.services.export.models import (spread_by_identity, eval_set, onnx_max_abs_diff, verify_onnx, export_model)  # noqa: F401
