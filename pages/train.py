"""Train page: one Retrain button that says what it will do (every knob under Advanced), live
progress and loss curve in the background, round history with metrics, activate / roll back."""
from __future__ import annotations

import dataclasses

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core import jobs
from core.services import datasets as store
from core.services import registry, rounds
from core.services.training import (ID_LOSSES, TrainConfig, describe_device, preset_config, preset_job_config, presets_for, select_device)
from pages.common import db_ok, require_dataset, show_error, sidebar

# The Advanced knobs, one per TrainConfig field: (label, widget options, help). Fields not named
# here keep TrainConfig's defaults; ``options`` makes a select box, a bool default a toggle.
KNOBS: dict[str, tuple[str, dict, str | None]] = {
    "steps": ("Steps", {"min_value": 20, "max_value": 5000, "step": 20}, "Training steps; early stopping may end sooner"),
    "frozen_blocks": ("Frozen early blocks (of 19)", {"min_value": 0, "max_value": 18}, None),
    "lr": ("Learning rate", {"min_value": 1e-5, "max_value": 1e-2, "format": "%.5f"}, None),
    "margin": ("Triplet margin", {"min_value": 0.05, "max_value": 1.0}, None),
    "ids_per_batch": ("Identities per batch (P)", {"min_value": 2, "max_value": 64}, None),
    "samples_per_id": ("Crops per identity (K)", {"min_value": 2, "max_value": 16}, None),
    "patience": ("Early-stopping patience (evaluations)", {"min_value": 0, "max_value": 20},
                 "Evaluations without improvement before stopping (0: never stop early)"),
    "brightness_invariant": ("Brightness-invariant input", {"options": [None, True, False]},
                             "Normalises luma per image in the model itself, so training, extraction and the "
                             "exported ONNX all see the same input"),
    "id_loss": ("Identity loss beside the triplet loss", {"options": [None, *ID_LOSSES]},
                "A classification loss over the labelled identities learns about twice as fast in short "
                "rounds, but plateaued lower than triplet alone on campus62"),
    "soft_margin": ("Soft-margin triplet", {}, "log(1 + exp(d_pos - d_neg)) instead of a hinge at the margin"),
    "flip_average": ("Average with the mirror image", {},
                     "The model embeds each crop and its mirror and averages them (twice the compute per "
                     "crop at extraction, in the ONNX export too)"),
    "neck": ("Batch-norm neck", {}, "Normalises the pooled features before the head: learns faster early"),
    "last_stride": ("Last stride", {"options": [2, 1]}, "1: a twice finer final feature map, about 1.8x the compute"),
    "recluster_every": ("Re-cluster every (steps)", {"min_value": 10, "max_value": 5000, "step": 10},
                        "With pseudo-identities: steps between two clusterings of the tracklets on the "
                        "current model's embeddings"),
}
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
if set(KNOBS) - FIELDS:  # a renamed TrainConfig field must fail here, not in the worker
    raise RuntimeError(f"Train page knobs {sorted(set(KNOBS) - FIELDS)} are not TrainConfig fields")
SHOWN = {None: "keep the starting model's", True: "on", False: "off"}


def knob(field: str, default, where) -> object:
    """The widget of one TrainConfig field in container ``where``; returns its value."""
    label, opts, help_ = KNOBS[field]
    opts = dict(opts)
    key = f"train_{field}"
    if "options" in opts:
        choices = opts.pop("options")
        none = "none (triplet only)" if field == "id_loss" else SHOWN[None]
        fmt = lambda v: none if v is None else SHOWN[v] if isinstance(v, bool) else str(v)  # noqa: E731
        return where.selectbox(label, choices, index=choices.index(default), format_func=fmt, help=help_, key=key)
    if isinstance(default, bool):
        return where.toggle(label, value=default, help=help_, key=key)
    return where.number_input(label, value=default, help=help_, key=key, **opts)


@st.cache_resource(show_spinner=False)
def this_device() -> tuple[str, str]:
    """Where this machine's rounds run (core.model.device; imports torch once per process)."""
    where = select_device()
    return where, describe_device(where)


def _reset_knobs() -> None:
    """A new preset: the knobs start again from its values."""
    for f in KNOBS:
        st.session_state.pop(f"train_{f}", None)


@st.cache_data(max_entries=8, show_spinner=False)
def _preview(name: str, stamp) -> rounds.RoundPreview:
    """What a round would train on, read again when a sample changed (``stamp``:
    store.last_modified): every run of this page read every crop's columns (2.6 s at 100k)."""
    return rounds.preview(name)


sidebar()
st.title("Retrain")
name = require_dataset()
try:
    active = store.active_model(name)
    versions = registry.list_versions(name)
    plan = _preview(name, store.last_modified(name))
except Exception as exc:
    show_error(exc, "reading the model versions and labels", "Reload the page; the app log has the details.")
    st.stop()

if not active:
    st.info("Embed the dataset first (Map page): a round starts from the active model.")

# ---------------------------------------------------------------- what Retrain does, the button
n_ids, n_crops, n_lone = plan.identities, plan.crops, plan.lone
lone = f", {n_lone} of them lone tracklets nobody has joined yet" if n_lone else ""
auto_unsupervised = n_lone > 0  # core.model.train's auto: some training identity open (a lone tracklet)
where, where_words = this_device()
offered = presets_for(where)
c1, c2 = st.columns([1, 2])
preset = c1.selectbox("Preset", offered, key="train_preset", on_change=_reset_knobs,
                      help="Starting values of the knobs under Advanced. 'quality' (256x128 crops, more "
                           "steps) is offered only where rounds run on a GPU")
c2.caption(f"Rounds on this machine train on **{where_words}**"
           + ("" if where == "cuda" else " (no GPU seen by torch: the quality preset needs one)") + ".")
with st.form("round", enter_to_submit=False):  # Enter in a knob must not queue a round
    st.markdown(f"**Retrain** starts from model **{active or registry.BASE}**, trains on **{n_ids} identities** "
                f"of the identity graph ({n_crops} crops{lone}), holds out **{plan.held_out} other "
                f"identities** to evaluate the model before and after ({plan.protocol}), and runs in the "
                "background: keep labelling, activate the new version when its numbers are better.")
    need = TrainConfig().min_val_ids + 2  # what core.services.rounds.run_round requires
    if plan.problem:
        st.warning(f"Retrain needs held-out identities to judge the round: {plan.problem}.")
    elif n_ids < need:
        st.warning(f"Retrain needs at least {need} identities to train on, besides the held-out ones; the "
                   f"graph has {n_ids}: answer pairs (Annotate page) or ingest more footage.")
    unsup = st.toggle(
        "Learn from unlabelled footage (pseudo-identities)", value=auto_unsupervised, key="train_unsupervised",
        help="Each tracklet is one person (positives), tracklets seen in the same frame are two "
             "(negatives); every few hundred steps, tracklets that are each other's nearest match in "
             "another camera (on the current model, each camera's mean look removed) are joined into a "
             "pseudo-identity, and the round trains on those; operator answers override it (a 'different' or two named people are never joined). The round's closest proposed joins come first in the pair queue. "
             + ("On by default here: the graph has lone tracklets nobody has named or joined yet." if auto_unsupervised
                else "Off by default here: every identity to train on is named or joined (verified)."))
    go_train = st.form_submit_button("Retrain", type="primary",
                                     disabled=not active or bool(plan.problem) or n_ids < need)
    d = preset_config(preset)
    values: dict = {}
    with st.expander("Advanced: steps, learning rate, batch (P × K), frozen blocks, losses, model head"):
        names = list(KNOBS)
        for row in range(0, len(names), 4):
            cols = st.columns(4)
            for col, f in zip(cols, names[row: row + 4]):
                values[f] = knob(f, getattr(d, f), col)
if go_train:
    try:
        chosen = None if unsup == auto_unsupervised else unsup  # untouched: auto, resolved by the round
        extra = {} if chosen is None else {"unsupervised": bool(chosen)}
        job = jobs.submit(name, "train", {"config": preset_job_config(preset, **values, **extra)})
    except Exception as exc:
        show_error(exc, "queueing the round", "Try again; the worker started by `make run` runs it.")
    else:
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
    if j["state"] in ("failed", "cancelled"):
        version = rounds.resumable_round(name, j["id"])
        if version and st.button(f"Resume round {version}", icon=":material/play_arrow:",
                                 help="Continue it from its last evaluation with its own settings, in "
                                      "the same version"):
            try:
                registry.resumable(name, version)  # another tab may have resumed it meanwhile
                st.session_state["train_job"] = jobs.submit(name, "train", {"resume_version": version})
            except Exception as exc:
                show_error(exc, f"resuming round {version}", "Reload the page to see its state.")
            else:
                st.rerun(scope="app")
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
                 "from": v.get("parent"), "active": "● active" if v["version"] == active else "",
                 "rank-1": m.get("rank1"), "mAP": m.get("mAP"), "rank-1 before": b.get("rank1"),
                 "mAP before": b.get("mAP"), "mAP re-ranked": mr.get("mAP"),
                 "mAP re-ranked before": br.get("mAP"), "device": (v.get("train") or {}).get("device"),
                 "pseudo-identities": {True: "yes", False: "no"}.get((v.get("train") or {}).get("unsupervised")),
                 "person-ness AUC": ((v.get("train") or {}).get("person") or {}).get("cv_auc"),
                 "error": v.get("error")})


def shown(v) -> str:
    """A table cell: metrics with 3 decimals, a dash where there is no value."""
    if v is None or (isinstance(v, float) and pd.isna(v)) or v == "":
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


table = pd.DataFrame([{k: v if k == "active" else shown(v) for k, v in r.items()} for r in rows])
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
        from core.services.training import compare

        tr = latest.get("train") or {}
        st.caption(f"Trained on {tr.get('device') or 'an unrecorded device'}; "
                   + (f"pseudo-identities: {tr.get('pseudo_summary') or 'no re-clustering ran'}, "
                      f"{len(latest.get('proposals') or [])} proposed joins for the pair queue."
                      if tr.get("unsupervised") else "trained on the graph's identities (no pseudo-identities)."))
        if tr.get("person_summary"):
            st.caption(f"False positives: {tr['person_summary']}.")
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
