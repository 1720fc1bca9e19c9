"""Data page: ingest footage, see what is in the dataset, browse it, open it in the FiftyOne App."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from core.services import datasets as store
from core.jobs import tasks
from core.services.ingest import KINDS, REID_PATTERNS, IngestError
from core.jobs import JobError
from pages.common import current_dataset, field_counts, job_status, show_error, sidebar, summary, thumbnails

# an ingest was queued into another dataset: the sidebar's picker starts again on that one
if "ingest_switch_to" in st.session_state:
    st.session_state["dataset"] = st.session_state.pop("ingest_switch_to")
    st.session_state.pop("dataset_picker", None)
sidebar()
st.title("Data")


def ingest_report(job: dict) -> None:
    """The report of the newest finished ingest job of this dataset."""
    rep = job["result"]
    when = f" at {job['finished_at']:%Y-%m-%d %H:%M} UTC" if job.get("finished_at") else ""
    st.success(f"Ingest finished{when}: {rep['summary']}")
    for note in rep.get("notes") or []:
        st.warning(f"Note: {note}.")
    problems = rep.get("problems") or []
    if problems:
        total = rep.get("problems_total", len(problems))
        more = (f" (the first {len(problems)} shown; job {job['id']}'s log lists all)"
                if total > len(problems) else "")
        st.warning(f"{total} items skipped, each with its reason{more}:")
        st.dataframe(pd.DataFrame(problems, columns=["file", "reason"]), hide_index=True, width="stretch")


# ---------------------------------------------------------------- ingest
with st.expander("Ingest footage", expanded=not store.names()):
    with st.form("ingest"):
        c1, c2 = st.columns([3, 1])
        path = c1.text_input("Folder on this machine", placeholder="/footage/site-a/MOT or /footage/reid")
        kind = c2.selectbox("Kind", KINDS, help="mot: MOT Challenge sequences (seqinfo.ini, gt/gt.txt, "
                            "img1/ or one video; det/det.txt instead of gt: the site's detections); "
                            "reid: <identity>/<image> folders; images: any pictures; videos: raw clips, "
                            "people found by the site's detections or detector (below)")
        c3, c4, c5 = st.columns(3)
        target = c3.text_input("Into dataset", value=current_dataset() or "site")
        every = c4.number_input("Keep every Nth frame of a track", 1, 100, 5)
        pattern = c5.selectbox("re-ID file names", list(REID_PATTERNS))
        st.markdown("**People in raw clips** come from, in order: a detection file the site put beside each "
                    "clip (`<clip>.det.txt` or `<clip>.csv`: frame, x, y, w, h, score; MOT `det/det.txt`), "
                    "else the site's ONNX detector below, else OpenCV's HOG detector. HOG's boxes are weak "
                    "(it misses small and partly hidden people and finds shadows and benches): prefer the "
                    "site's own detections or model.")
        d1, d2, d3, d4 = st.columns([3, 1, 1, 1])
        detector = d1.text_input("Site detector (ONNX file, optional)", placeholder="/models/yolov8n.onnx",
                                 help="Ultralytics YOLOv5/v8/v11, YOLOX or end-to-end exports; run on every "
                                      "Nth frame with ONNX Runtime")
        person_class = d2.text_input("Person class", "person", help="the detector's class name or index")
        det_conf = d3.number_input("Min score", 0.0, 1.0, 0.25, 0.05)
        tracker = d4.selectbox("Tracker", ["bytetrack", "iou"], help="ByteTrack, or the old overlap linker")
        go = st.form_submit_button("Ingest", type="primary")
        st.caption("Ingesting runs in the background: you can leave this page; the report appears "
                   "here when it is done.")
    if go:
        if not path.strip():
            st.error("Enter the folder to ingest.")
        else:
            try:
                tasks.submit_ingest(path.strip(), kind, target.strip(), every_n=int(every), pattern=pattern,
                                    detector=detector.strip() or None, person_class=person_class,
                                    det_conf=float(det_conf), tracker=tracker)
            except (IngestError, store.StoreError, JobError) as exc:  # a bad path or name: at once
                st.error(f"{exc}")
            except Exception as exc:  # noqa: BLE001
                show_error(exc, "queuing the ingest", "Check that the job worker runs (`make run` "
                           "starts it) and try again.")
            else:
                st.session_state["ingest_switch_to"] = target.strip()
                st.rerun()
if current_dataset():
    job_status(current_dataset(), ("ingest",), show_result=ingest_report)

name = current_dataset()
if not name:
    st.info("No dataset yet: ingest a folder above, or run `make run` to create the synthetic demo.")
    st.stop()

# ---------------------------------------------------------------- overview
try:
    overview = summary(name)
    counts_of = field_counts(name, store.last_modified(name))
except Exception as exc:  # noqa: BLE001
    show_error(exc, f"reading dataset {name!r}", "Reload the page, or pick another dataset in the sidebar.")
    st.stop()
m = st.columns(5)
m[0].metric("Samples", overview["samples"])
m[1].metric("Identities", overview["identities"])
m[2].metric("Cameras", overview["cameras"])
m[3].metric("Videos", overview["videos"])
m[4].metric("Active model", overview["active_model"] or "—")


def bar(field: str, title: str, top: int = 30) -> None:
    counts = counts_of[field]
    if not counts:
        st.caption(f"No {title.lower()} yet.")
        return
    df = pd.DataFrame(sorted(counts.items(), key=lambda kv: -kv[1])[:top], columns=[field, "samples"])
    fig = px.bar(df, x=field, y="samples", title=title, height=280)
    fig.update_layout(margin=dict(l=10, r=10, t=40, b=10), xaxis_type="category")
    st.plotly_chart(fig, width="stretch")


c1, c2 = st.columns(2)
with c1:
    bar("camera", "Samples per camera")
    bar("label", "Samples per class")
with c2:
    bar("identity", "Samples per identity (top 30)")
    cond = {**{f"low light: {k}": v for k, v in counts_of["low_light"].items()},
            **{f"tag: {k}": v for k, v in counts_of["tags"].items()}}
    if cond:
        fig = px.bar(pd.DataFrame(list(cond.items()), columns=["condition", "samples"]),
                     x="condition", y="samples", title="Conditions and tags", height=280)
        fig.update_layout(margin=dict(l=10, r=10, t=40, b=10))
        st.plotly_chart(fig, width="stretch")

# ---------------------------------------------------------------- browse
st.subheader("Browse")
f1, f2, f3, f4 = st.columns(4)
cams = [c for c in counts_of["camera"] if c != "(none)"]
camera = f1.selectbox("Camera", ["(any)", *cams])
identity = f2.text_input("Identity", "")
light = f3.selectbox("Light", ["(any)", "day", "low light"])
tags = f4.multiselect("Tags", list(counts_of["tags"]))
filters = {"camera": None if camera == "(any)" else camera, "identity": identity.strip() or None}
if light != "(any)":
    filters["low_light"] = light == "low light"
n = store.matching_count(name, filters, tags)
per_page = 48
pages = max(1, (n + per_page - 1) // per_page)
page = st.number_input(f"{n} samples match · page", 1, pages, 1) if pages > 1 else 1
rows = store.browse(name, filters, tags, ["identity", "camera", "low_light"], offset=(page - 1) * per_page, limit=per_page)
thumbnails(rows)

if st.button("Open in FiftyOne App", help="Serves the FiftyOne App on 127.0.0.1 showing this view"):
    try:
        url = store.open_in_app(name, store.matching_ids(name, filters, tags, limit=5000))
        st.success(f"FiftyOne App: [{url}]({url})")
    except Exception as exc:  # noqa: BLE001
        show_error(exc, "starting the FiftyOne App", "Check that its port is free and try again.")
