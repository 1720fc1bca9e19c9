"""Train page: round settings, one-click Retrain in the background, live progress and loss curve,
round history with metrics, activate / roll back."""
from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core import jobs, registry, store
from core.train import ID_LOSSES, TrainConfig
from pages.common import db_error, db_ok, require_dataset, sidebar

sidebar()
st.title("Retrain")
name = require_dataset()
try:
    active = store.active_model(name)
    versions = registry.list_versions(name)
except Exception as exc:
    db_error(exc)
    st.stop()

if not active:
    st.info("Embed the dataset first (Map page): a round starts from the active model.")

# ---------------------------------------------------------------- settings and the button
d = TrainConfig()
with st.form("round"):
    st.markdown(f"Next round starts from **{active or registry.BASE}**; labelled identities train, a held-out "
                "set of identities evaluates before and after.")
    c1, c2, c3, c4 = st.columns(4)
    steps = c1.number_input("Steps", 20, 5000, d.steps, step=20)
    frozen = c2.number_input("Frozen early blocks (of 19)", 0, 18, d.frozen_blocks)
    lr = c3.number_input("Learning rate", 1e-5, 1e-2, d.lr, format="%.5f")
    margin = c4.number_input("Triplet margin", 0.05, 1.0, d.margin)
    c5, c6, c7, c8 = st.columns(4)
    ids_per_batch = c5.number_input("Identities per batch (P)", 2, 64, d.ids_per_batch)
    per_id = c6.number_input("Crops per identity (K)", 2, 16, d.samples_per_id)
    invariant = c7.toggle("Brightness-invariant input", value=bool(d.brightness_invariant),
                          help="Normalises luma per image in the model itself, so training, extraction and "
                               "the exported ONNX all see the same input")
    patience = c8.number_input("Early-stopping patience (evaluations)", 0, 20, d.patience)
    id_loss = st.selectbox("Identity loss beside the triplet loss", [None, *ID_LOSSES], index=0,
                           format_func=lambda v: "none (triplet only)" if v is None else v,
                           help="A classification loss over the labelled identities learns about twice as "
                                "fast in short rounds, but plateaued lower than triplet alone on campus62")
    with st.expander("Advanced: model head and loss"):
        a1, a2, a3, a4 = st.columns(4)
        soft = a1.toggle("Soft-margin triplet", value=d.soft_margin,
                         help="log(1 + exp(d_pos - d_neg)) instead of a hinge at the margin")
        flip = a2.toggle("Average with the mirror image", value=d.flip_average,
                         help="The model embeds each crop and its mirror and averages them (twice the "
                              "compute per crop at extraction, in the ONNX export too)")
        neck = a3.toggle("Batch-norm neck", value=d.neck,
                         help="Normalises the pooled features before the head: learns faster early")
        last_stride = a4.selectbox("Last stride", [2, 1], index=[2, 1].index(d.last_stride),
                                   help="1: a twice finer final feature map, about 1.8x the compute")
    go_train = st.form_submit_button("Retrain", type="primary", disabled=not active)
if go_train:
    cfg = {"steps": int(steps), "frozen_blocks": int(frozen), "lr": float(lr), "margin": float(margin),
           "ids_per_batch": int(ids_per_batch), "samples_per_id": int(per_id),
           "brightness_invariant": bool(invariant), "patience": int(patience), "id_loss": id_loss,
           "soft_margin": bool(soft), "flip_average": bool(flip), "neck": bool(neck),
           "last_stride": int(last_stride)}
    job = jobs.submit(name, "train", {"config": cfg})
    st.session_state["train_job"] = job
    st.success("Round queued: it runs in the background; keep labelling, the progress shows here.")


# ---------------------------------------------------------------- live progress
@st.fragment(run_every=2.0)
def live() -> None:
    if not db_ok():
        return
    recent = jobs.list_jobs(name, kind="train", limit=1)
    if not recent:
        st.caption("No round yet.")
        return
    j = recent[0]
    st.subheader(f"Latest round: {j['state']}")
    if j["state"] in ("queued", "running"):
        c1, c2 = st.columns([5, 1])
        eta = j["details"].get("eta_s")
        c1.progress(j["progress"] or 0.0, text=(j["label"] or "waiting for the worker")
                    + (f" · ETA {eta:.0f} s" if eta else ""))
        if c2.button("Cancel round"):
            jobs.cancel(j["id"])
        st.session_state["train_active"] = j["id"]
    elif st.session_state.get("train_active") == j["id"]:
        st.session_state["train_active"] = None
        st.rerun(scope="app")
    if j["state"] == "failed":
        st.error(f"The round failed: {j['error']}. The active model is unchanged.")
        with st.expander("Log"):
            st.code(jobs.log_tail(j["id"], 60))
    elif j["state"] == "cancelled":
        st.warning("The round was cancelled. The active model is unchanged.")
    hist = pd.DataFrame([h for h in j["history"] if "step" in h])
    if not hist.empty:
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=hist["step"], y=hist["loss"], name="triplet loss", mode="lines"))
        if "val_mAP" in hist:
            v = hist.dropna(subset=["val_mAP"]).drop_duplicates("val_mAP")
            fig.add_trace(go.Scatter(x=v["step"], y=v["val_mAP"], name="validation mAP", mode="lines+markers",
                                     yaxis="y2"))
        fig.update_layout(height=300, margin=dict(l=10, r=10, t=30, b=10), title="Loss and validation mAP",
                          yaxis=dict(title="loss"), yaxis2=dict(title="mAP", overlaying="y", side="right",
                                                                range=[0, 1]))
        st.plotly_chart(fig, width="stretch")


live()

# ---------------------------------------------------------------- history of rounds
st.subheader("Model versions")
rows = []
for v in versions:
    m = (v.get("metrics") or {}).get("all", {})
    b = (v.get("before") or {}).get("all", {})
    mr = (v.get("metrics") or {}).get("reranked") or {}
    br = (v.get("before") or {}).get("reranked") or {}
    rows.append({"version": v["version"], "round": v.get("round", 0), "status": v["status"],
                 "from": v.get("parent") or "", "active": "✅" if v["version"] == active else "",
                 "rank-1": m.get("rank1"), "mAP": m.get("mAP"), "rank-1 before": b.get("rank1"),
                 "mAP before": b.get("mAP"), "mAP re-ranked": mr.get("mAP"),
                 "mAP re-ranked before": br.get("mAP"), "error": v.get("error") or ""})
table = pd.DataFrame(rows)
st.dataframe(table, hide_index=True, width="stretch")

ready = [r for r in rows if r["status"] == "ready" and r["version"] != registry.BASE and r["mAP"] is not None]
if ready:
    long = []
    for r in ready:
        for metric in ("rank-1", "mAP", "mAP re-ranked"):
            long.append({"version": r["version"], "metric": metric, "when": "before (parent)", "value": r[f"{metric} before"]})
            long.append({"version": r["version"], "metric": metric, "when": "after", "value": r[metric]})
    fig = px.bar(pd.DataFrame(long), x="version", y="value", color="when", facet_col="metric", barmode="group",
                 height=320, range_y=[0, 1], title="Held-out retrieval before and after each round")
    st.plotly_chart(fig, width="stretch")

    latest = [v for v in versions if v["version"] == ready[-1]["version"]][0]
    with st.expander(f"Round report: {latest['version']} (by condition, camera, false matches)", expanded=True):
        from core.evaluate import compare

        cmp = pd.DataFrame(compare(latest.get("before") or {}, latest.get("metrics") or {}))
        cmp = cmp[cmp["metric"].str.contains("rank1|mAP|fmr|tmr|threshold")]
        st.dataframe(cmp, hide_index=True, width="stretch")

c1, c2 = st.columns(2)
choices = [r["version"] for r in rows if r["status"] == "ready"]
target = c1.selectbox("Version", choices, index=len(choices) - 1 if choices else 0)
if c1.button("Activate", type="primary", disabled=not choices or target == active):
    try:
        registry.activate(name, target)
        jobs.submit(name, "layout", {"version": target})  # rescore misclustered samples for it
        st.success(f"{target} is now the active model.")
        st.rerun()
    except registry.RegistryError as exc:
        st.error(str(exc))
if c2.button("Roll back", help="Re-activate the version that was active before"):
    try:
        st.success(f"Rolled back to {registry.rollback(name)}.")
        st.rerun()
    except registry.RegistryError as exc:
        st.error(str(exc))
