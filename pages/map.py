"""Map page: the embedding space as a UMAP map the operator can box/lasso, bulk actions on the
selection, misclustered candidates with reasons, and two model versions side by side."""
from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.services import analysis, labeling, projection, registry
from core import jobs
from core.services import datasets as store
from core.jobs import tasks
from pages.common import job_status, require_dataset, show_error, sidebar, thumbnails, user_name

sidebar()
st.title("Embedding map")
name = require_dataset()

COLOR_FIELDS = {
    "identity": "identity", "class label": "label", "camera": "camera", "night / low light": "low_light",
    "blur": "blur", "brightness": "brightness", "uncertainty": "uncertainty",
    "misclustered score": "mis_score", "operator flag": "flagged", "labelling round": "label_round",
    "person-ness (false positives low)": "personness",
}
HOVER = ["identity", "label", "camera", "low_light", "brightness", "blur"]  # read by hover_text

# one decision session per browser tab, shared with the Annotate page (its Undo covers bulk actions too)
session = st.session_state.setdefault("annotate_session", uuid.uuid4().hex)
try:
    active = store.active_model(name)
    schema = labeling.label_schema(name)
    ready = [v["version"] for v in registry.list_versions(name) if v["status"] == "ready"]
except Exception as exc:
    show_error(exc, "reading the dataset's models", "Reload the page; if it persists, check the app log.")
    st.stop()

job_status(name, ("embed", "layout"))

if not active:
    pending = tasks.embedding_pending(name)
    st.info("This dataset has no embeddings yet. Embedding runs in the background; the map appears "
            "when it is done." + (" It is under way." if pending else ""))
    if not pending and st.button("Embed with the packaged model", type="primary"):
        tasks.submit_embedding(name)  # queues nothing when another tab just did
        st.rerun()
    st.stop()

versions = [v for v in ready if projection.cached_layout(name, v)]
if active not in versions:
    st.info(f"No map for the active model **{active}** yet.")
    if st.button("Compute map", type="primary"):
        jobs.submit(name, "layout", {"version": active})
        st.rerun()
    if not versions:
        st.stop()


@st.cache_resource(show_spinner="Loading map…", max_entries=8)
def load_map(dataset: str, version: str, stamp) -> pd.DataFrame:
    """The map's frame, read once per change of the dataset (``stamp``: store.last_modified) and
    shared, not copied, by every run and tab (the page only reads it: a copy of 100k rows
    costs 0.17 s a run)."""
    m = projection.compute_layout(dataset, version)  # cached: reads positions, never recomputes
    fields = {f for f in COLOR_FIELDS.values() if f != "personness"}
    cols = store.view_columns(dataset, [*fields, *HOVER, "filepath", "tags", store.person_field(version)],
                              m.ids)
    cols["personness"] = cols.pop(store.person_field(version))  # the model's own score (None: no head)
    df = pd.DataFrame(cols)
    df["x"], df["y"] = m.coords[:, 0], m.coords[:, 1]
    df["hover"] = hover_text(df)
    return df


def hover_text(df: pd.DataFrame) -> np.ndarray:
    """One short hover line per point (made once per map: 0.3 s at 100k samples)."""

    def num(col: str) -> pd.Series:
        return pd.to_numeric(df[col], errors="coerce").round().astype("Int64").astype(str).replace("<NA>", "?")

    return (df["identity"].fillna("no identity").astype(str) + " · cam " + df["camera"].fillna("?").astype(str)
            + " · " + df["label"].fillna("no class").astype(str)
            + np.where(df["low_light"].fillna(False).astype(bool), " · low light", "")
            + " · brightness " + num("brightness") + " · blur " + num("blur")).to_numpy(dtype=object)


def figure(df: pd.DataFrame, color: str, highlight: set[str], height: int = 560) -> go.Figure:
    """WebGL scatter; one trace per category for a few categories, a colour scale otherwise.

    Per point the figure carries x and y as typed arrays (base64 in the JSON), its row number
    as ``customdata`` (a plain number: the selection event returns it as is) and one short
    hover text (:func:`hover_text`); with every hover field a separate string, 100k samples
    made a 13 MB figure and a second of JSON."""
    text = df["hover"].to_numpy()
    rows = np.arange(len(df), dtype=np.int32)
    x, y = df["x"].to_numpy(np.float32), df["y"].to_numpy(np.float32)
    fig = go.Figure()

    def trace(m, **kw) -> go.Scattergl:
        return go.Scattergl(x=x[m], y=y[m], mode="markers", customdata=rows[m], text=text[m],
                            hovertemplate="%{text}<extra></extra>", **kw)

    vals = df[color]
    every = np.ones(len(df), bool)
    numeric = pd.api.types.is_numeric_dtype(vals) and not pd.api.types.is_bool_dtype(vals) and vals.nunique() > 12
    if numeric:
        fig.add_trace(trace(every, marker=dict(size=5, color=vals.fillna(0).to_numpy(np.float32),
                                               colorscale="Viridis", showscale=True, colorbar=dict(title=color))))
    else:
        cats = vals.astype(str)
        if cats.nunique() > 24:  # hundreds of identities: one trace, colours by code
            codes = pd.Categorical(cats).codes.astype(np.int32)
            fig.add_trace(trace(every, marker=dict(size=5, color=codes, colorscale="Turbo"), name=color))
        else:
            for cat in sorted(cats.unique(), key=lambda c: (len(c), c)):  # 2 before 10
                fig.add_trace(trace((cats == cat).to_numpy(), name=cat, marker=dict(size=5)))
    if highlight:
        fig.add_trace(trace(df["id"].isin(highlight).to_numpy(), name="selected",
                            marker=dict(size=9, color="rgba(0,0,0,0)", line=dict(color="white", width=2))))
    fig.update_layout(height=height, dragmode="select", margin=dict(l=0, r=0, t=30, b=0),
                      legend=dict(itemsizing="constant"), xaxis=dict(visible=False), yaxis=dict(visible=False))
    return fig


c1, c2, c3 = st.columns([2, 2, 1])
version = c1.selectbox("Model version", versions, index=versions.index(active) if active in versions else 0)
color_label = c2.selectbox("Colour by", list(COLOR_FIELDS))
compare = c3.toggle("Before / after", disabled=len(versions) < 2, help="Two model versions side by side")
df = load_map(name, version, store.last_modified(name))
color = COLOR_FIELDS[color_label]

sel_key = f"sel_{name}"
selected: list[str] = st.session_state.get(sel_key, [])
# the chart's widget key changes whenever the selection is set from outside the chart (cleared,
# a cluster, the top candidates): a fresh widget has no lasso of its own that would win again
chart = f"map_{name}_{st.session_state.get(f'chart_{name}', 0)}"


def set_selection(ids: list[str]) -> None:
    st.session_state[sel_key] = ids
    st.session_state[f"chart_{name}"] = st.session_state.get(f"chart_{name}", 0) + 1
    st.rerun()

if compare:
    other = st.selectbox("Compare with", [v for v in versions if v != version])
    left, right = st.columns(2)
    with left:
        st.caption(f"**{version}**")
        event = st.plotly_chart(figure(df, color, set(selected), 480), on_select="rerun",
                                selection_mode=("points", "box", "lasso"), key=f"{chart}_{version}_cmp")
    with right:
        st.caption(f"**{other}** (same selection highlighted)")
        st.plotly_chart(figure(load_map(name, other, store.last_modified(name)), color, set(selected), 480),
                        key=f"map_{other}_right")
else:
    event = st.plotly_chart(figure(df, color, set(selected)), on_select="rerun",
                            selection_mode=("points", "box", "lasso"), key=f"{chart}_{version}")
st.caption(f"{len(df)} samples · box or lasso to select, click a point to see it · hover for details")

points = (event or {}).get("selection", {}).get("points", []) if event else []
if points:
    rows = [int(p["customdata"]) for p in points if p.get("customdata") is not None]  # row numbers (see figure)
    ids = list(dict.fromkeys(str(s) for s in df["id"].to_numpy()[rows]))
    if ids != selected:
        st.session_state[sel_key] = ids
        selected = ids

# ---------------------------------------------------------------- selection and bulk actions
def _what(change: dict) -> str:
    parts = [f"{k} {v}" for k, v in change.items() if k in ("label", "identity") and v is not None]
    return ", ".join([*parts, *(change.get("tags_add") or ())])


def _flash(kind: str, text: str) -> None:
    """A message shown after the rerun that redraws the map with the new values."""
    st.session_state.setdefault("map_flash", []).append((kind, text))


def bulk(ids: list[str], verb: str, **change) -> None:
    """One bulk decision (checked, logged, undoable as one step); redraws the map."""
    try:
        r = labeling.bulk_decide(name, session, ids, user_name(), **change)
    except labeling.LabelingError as exc:
        st.error(str(exc))
        return
    except Exception as exc:
        show_error(exc, "applying the bulk action", "Apply it again: samples that already have the values "
                   "are left as they are.")
        return
    _flash("success", f"{verb} {len(r.changed)} samples with {_what(change)}."
           + (" Undo last bulk action reverts it." if r.changed else ""))
    if r.unchanged:
        _flash("caption", f"{len(r.unchanged)} samples already had these values.")
    if r.conflicts:
        _flash("warning", f"{len(r.conflicts)} samples were changed by someone else while this ran and were "
                          "left as they are: select them again to apply.")
    if r.not_joined:
        _flash("warning", f"Not one person: {len(r.not_joined)} of the selected tracklets are seen together in "
                          f"one frame (or kept apart by an answer), so the graph keeps them as separate identities "
                          f"(the name with ~2, ~3…). First: {r.not_joined[0]}")
    load_map.clear()
    st.rerun()


for kind, text in st.session_state.pop("map_flash", []):
    getattr(st, kind)(text)

if selected:
    st.subheader(f"Selection: {len(selected)} samples")
    rows = df[df["id"].isin(selected)].head(48).to_dict("records")
    thumbnails(rows, ("identity", "camera"))
    who = user_name()
    a1, a2, a3 = st.columns(3)
    with a1.form("bulk_label"):
        new_label = st.selectbox("Set class label", [None, *schema.classes],
                                 format_func=lambda c: "(keep each sample's)" if c is None else c)
        new_ident = st.text_input("Set identity", placeholder="e.g. id-0042 (empty: keep each sample's)")
        if st.form_submit_button("Apply to selection"):
            bulk(selected, "Updated", label=new_label, identity=new_ident.strip() or None)
    with a2.form("bulk_tags"):
        tags = st.multiselect("Add condition tags", schema.conditions)
        if st.form_submit_button("Tag selection"):
            bulk(selected, "Tagged", tags_add=tags)
    with a3:
        reason = st.text_input("Flag reason", value="misclustered")
        if st.button("Flag as misclustered"):
            labeling.flag(name, selected, reason, who)
            st.success(f"Flagged {len(selected)} samples; they go up in the queue and in training.")
        if st.button("Send to labelling queue"):
            store.tag_samples(name, selected, ["to-label"])
            st.success("Tagged 'to-label': the Annotate page serves them first.")
        if st.button("Open in FiftyOne App"):
            url = store.open_in_app(name, selected)
            st.markdown(f"[Open the FiftyOne App]({url})")
    if st.button("Clear selection"):
        set_selection([])
if st.button("Undo last bulk action", key="bulk_undo", icon=":material/undo:",
             help="Revert this tab's last class / identity / tag action on a selection"):
    try:
        d = labeling.undo(name, session, user_name(), kinds=("bulk",))
    except Exception as exc:
        show_error(exc, "undoing the bulk action", "Try again; nothing was reverted twice.")
    else:
        if d is None:
            st.info("No bulk action of this tab to undo.")
        else:
            kept = d.not_restored or []
            _flash("success", f"Undid the bulk action ({_what(d.after)}).")
            if kept:
                _flash("warning", f"{len(kept)} samples were changed since and were left as they are: "
                                  + ", ".join(kept[:10]) + (" …" if len(kept) > 10 else ""))
            load_map.clear()
            st.rerun()

# ---------------------------------------------------------------- misclustered candidates
st.subheader("Misclustered candidates")
clusters = analysis.condition_clusters(name)
for i, c in enumerate(clusters[:5]):
    with st.expander(f":material/warning: {c['condition']} cluster: {c['size']} samples"):
        st.write(c["reason"])
        thumbnails(store.rows_of(name, c["members"][:16], ["identity"]), ("identity",))
        if st.button("Select these on the map", key=f"selc_{i}"):
            set_selection(list(c["members"]))
cands = analysis.candidates(name, limit=60)
if not cands:
    st.caption("No candidates yet (they are scored after embedding and after each round).")
else:
    table = pd.DataFrame([{"score": round(r["mis_score"], 2), "identity": r["identity"], "camera": r["camera"],
                           "why": "; ".join(r["mis_reasons"] or [])} for r in cands])
    st.dataframe(table, hide_index=True, width="stretch", height=260)
    if st.button("Select the top candidates on the map"):
        set_selection([r["id"] for r in cands])
