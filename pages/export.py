"""Export page: a curated view of the dataset in a standard format, and a verified ONNX model
(optionally int8) with its metadata, metrics and model card. UI only: core.services.export does the work."""
from __future__ import annotations

import json
from datetime import datetime

import pandas as pd
import plotly.express as px
import streamlit as st

from core.services import export
from core.services import datasets as store
from core.jobs import tasks
from core.jobs import JobError
from pages.common import job_status, require_dataset, show_error, sidebar

sidebar()
st.title("Export")
name = require_dataset()
try:
    tags = store.tag_counts(name)
    cameras = [c for c in store.counts(name, "camera") if c != "(none)"]
    saved = store.saved_views(name)
    emb_versions = export.embedding_versions(name)
    versions = export.model_versions()
    root = export.export_root()
except Exception as exc:  # noqa: BLE001
    show_error(exc, f"reading what dataset {name!r} can export", "Reload the page.")
    st.stop()

st.caption(f"Everything is written inside the export folder `{root}`; names that lead "
           "outside it are refused.")

FORMAT_HELP = {
    "fiftyone": "FiftyOne dataset: media, every field, tags and labels (full round trip)",
    "classification-tree": "one folder per class (identity or label) with its images",
    "coco": "COCO detection: video frames of the view's sequences with their person boxes",
    "manifest": "CSV + Parquet table: path, label, identity, camera, conditions, tags, flags, "
                "who labelled it, model version, split",
}

# ---------------------------------------------------------------- dataset export
st.subheader("Dataset")
with st.form("export_dataset"):
    c1, c2 = st.columns(2)
    scope = c1.radio("View", ["All samples", "By tag", "By camera", "Saved view"],
                     horizontal=True, key="exp_scope")
    fmt = c2.selectbox("Format", export.FORMATS, format_func=lambda f: f"{f}: {FORMAT_HELP[f]}",
                       key="exp_fmt")
    c3, c4, c5 = st.columns(3)
    pick_tags = c3.multiselect("Tags (all must match)", sorted(tags), key="exp_tags")
    pick_camera = c4.selectbox("Camera", cameras or ["-"], key="exp_camera")
    pick_saved = c5.selectbox("Saved view", saved or ["-"], key="exp_saved")
    c6, c7, c8 = st.columns(3)
    by = c6.radio("Class folders by (classification tree)", export.TREE_FIELDS, horizontal=True,
                  key="exp_by")
    emb = c7.selectbox("Include embeddings of (fiftyone, manifest)", ["none", *emb_versions],
                       key="exp_emb")
    max_frames = c8.number_input("COCO: at most this many frames (0 = all)", 0, 100000, 200,
                                 key="exp_frames")
    c9, c10 = st.columns([3, 1])
    out_name = c9.text_input("Folder name inside the export folder", key="exp_out",
                             placeholder=f"{name}-FORMAT-{datetime.now():%Y%m%d-%H%M%S} "
                                         "(leave empty for this)")
    overwrite = c10.checkbox("Overwrite", key="exp_overwrite")
    go = st.form_submit_button("Export dataset", type="primary")

if go:
    kw: dict = {}
    if scope == "By tag":
        kw["tags"] = pick_tags or None
    elif scope == "By camera" and cameras:
        kw["filters"] = {"camera": pick_camera}
    elif scope == "Saved view" and saved:
        kw["saved_view"] = pick_saved
    try:
        tasks.submit_export_dataset(name, fmt, out_name.strip() or None, by=by,
                                    include_embeddings=None if emb == "none" else emb,
                                    max_frames=int(max_frames) or None, overwrite=overwrite, **kw)
    except (export.ExportError, store.StoreError, JobError) as exc:  # a bad name: at once
        st.error(f"{exc}")
    except Exception as exc:  # noqa: BLE001
        show_error(exc, "queuing the dataset export", "Check that the job worker runs (`make run` "
                   "starts it) and try again.")
    else:
        st.rerun()


def dataset_report(job: dict) -> None:
    """The report of the newest finished dataset export."""
    rep = job["result"]
    st.success(f"Wrote {rep['count']} items ({rep['format']}) to `{rep['path']}`"
               + (f"; {rep['skipped']} skipped (no {rep.get('by', 'value')})"
                  if rep.get("skipped") else ""))
    m = st.columns(4)
    m[0].metric("Items", rep["count"])
    m[1].metric("Skipped", rep["skipped"])
    if rep.get("class_counts"):
        m[2].metric("Classes", len(rep["class_counts"]))
        st.dataframe(pd.DataFrame(rep["class_counts"], columns=["class", "images"]),
                     hide_index=True, height=240)
    if "boxes" in rep:
        m[2].metric("Boxes", rep["boxes"])
    if rep.get("embeddings"):
        m[3].metric("Embeddings", rep["embeddings"])


st.caption("Exports run in the background: you can leave this page; the report appears here "
           "when it is done.")
job_status(name, ("export_dataset",), show_result=dataset_report)

# ---------------------------------------------------------------- model export
st.divider()
st.subheader("Model (ONNX)")
with st.form("export_model"):
    c1, c2, c3 = st.columns([2, 1, 2])
    active = store.active_model(name)
    version = c1.selectbox("Model version", versions,
                           index=versions.index(active) if active in versions else 0,
                           key="exp_version")
    int8 = c2.checkbox("Also int8", value=True, key="exp_int8",
                       help="ONNX Runtime static quantization calibrated on this dataset's crops; "
                            "its retrieval metrics are shown next to fp32")
    m_out = c3.text_input("Folder name inside the export folder", key="exp_m_out",
                          placeholder="model-VERSION-DATE-TIME (leave empty for this)")
    m_overwrite = st.checkbox("Overwrite", key="exp_m_overwrite")
    go_model = st.form_submit_button("Export and verify model", type="primary")
    st.caption("Verified against PyTorch on real crops of this dataset; retrieval metrics use "
               "its query/gallery split when it has one.")

if go_model:
    try:
        tasks.submit_export_model(name, version, m_out.strip() or None, int8=int8,
                                  overwrite=m_overwrite)
    except (export.ExportError, store.StoreError, JobError) as exc:
        st.error(f"{exc}")
    except Exception as exc:  # noqa: BLE001
        show_error(exc, "queuing the model export", "Check that the job worker runs (`make run` "
                   "starts it) and try again.")
    else:
        st.rerun()


def model_report(job: dict) -> None:
    """The report of the newest finished model export: verification, sizes, metrics, card."""
    mrep = job["result"]
    st.success(f"Wrote `{mrep['onnx']}`" + (f" and `{mrep['onnx_int8']}`"
                                            if mrep.get("onnx_int8") else ""))
    m = st.columns(4)
    m[0].metric("Max abs diff vs PyTorch", f"{mrep['max_abs_diff']:.1e}",
                help=f"on {mrep['verified_on']} real crops")
    m[1].metric("onnx.checker", mrep["checker"])
    m[2].metric("fp32 size", f"{mrep['size_mb']['fp32']} MB")
    if mrep.get("onnx_int8"):
        m[3].metric("int8 size", f"{mrep['size_mb']['int8']} MB",
                    help=f"int8 vs fp32: max abs diff {mrep['int8_max_abs_diff']:.3f}, mean "
                         f"cosine {mrep['int8_mean_cosine']:.3f}")
    mets = mrep.get("metrics") or {}
    if mets:
        rows = [{"model": k, "metric": lab, "value": v[key]} for k, v in mets.items()
                for key, lab in (("rank1", "rank-1"), ("rank5", "rank-5"), ("mAP", "mAP"))]
        fig = px.bar(pd.DataFrame(rows), x="metric", y="value", color="model", barmode="group",
                     range_y=[0, 1], height=300, title="Retrieval: what int8 costs")
        st.plotly_chart(fig)
    else:
        st.info("This dataset has no query/gallery split, so no retrieval metrics were computed.")
    with st.expander("Metadata in the ONNX file"):
        st.dataframe(pd.DataFrame(sorted(mrep["metadata"].items()), columns=["key", "value"]),
                     hide_index=True)
    with st.expander("Model card", expanded=True):
        try:
            with open(mrep["card"], encoding="utf-8") as fh:
                st.markdown(fh.read())
        except OSError as exc:
            st.warning(f"Model card not readable: {exc}")
    st.download_button("Download report (JSON)", json.dumps(mrep, indent=2, default=str),
                       file_name="report.json", mime="application/json")


st.caption("The model export runs in the background (int8 calibration takes a while): you can "
           "leave this page; the report appears here when it is done.")
job_status(name, ("export_model",), show_result=model_report)
