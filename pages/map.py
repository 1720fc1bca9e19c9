"""Map page: the embedding space as a UMAP map the operator can box/lasso, bulk actions on the
selection, misclustered candidates with reasons, and two model versions side by side."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import analysis, jobs, labeling, projection, registry, store
from pages.common import db_error, job_status, require_dataset, sidebar, thumbnails, user_name

sidebar()
st.title("Embedding map")
name = require_dataset()

COLOR_FIELDS = {
    "identity": "identity", "class label": "label", "camera": "camera", "night / low light": "low_light",
    "blur": "blur", "brightness": "brightness", "uncertainty": "uncertainty",
    "misclustered score": "mis_score", "operator flag": "flagged", "labelling round": "label_round",
}
HOVER = ["identity", "label", "camera", "brightness", "low_light", "blur"]
CONDITION_TAGS = list(analysis.CONDITION_TAGS)

try:
    active = store.active_model(name)
except Exception as exc:
    db_error(exc)
    st.stop()

job_status(name, ("embed", "layout"))

if not active:
    st.info("This dataset has no embeddings yet. Embedding runs in the background; the map appears "
            "when it is done.")
    if st.button("Embed with the packaged model", type="primary"):
        jobs.submit(name, "embed", {})
        st.rerun()
    st.stop()

versions = [v["version"] for v in registry.list_versions(name)
            if v["status"] == "ready" and projection.cached_layout(name, v["version"])]
if active not in versions:
    st.info(f"No map for the active model **{active}** yet.")
    if st.button("Compute map", type="primary"):
        jobs.submit(name, "layout", {"version": active})
        st.rerun()
    if not versions:
        st.stop()


@st.cache_data(show_spinner="Loading map…", max_entries=8)
def load_map(dataset: str, version: str, _stamp) -> pd.DataFrame:
    m = projection.compute_layout(dataset, version)  # cached: reads positions, never recomputes
    cols = store.view_columns(dataset, [*set(COLOR_FIELDS.values()), *HOVER, "filepath", "tags"], m.ids)
    df = pd.DataFrame(cols)
    df["x"], df["y"] = m.coords[:, 0], m.coords[:, 1]
    return df


def figure(df: pd.DataFrame, color: str, highlight: set[str], height: int = 560) -> go.Figure:
    """WebGL scatter; one trace per category for a few categories, a colour scale otherwise."""
    custom = np.stack([df["id"], *[df[h].astype(str) for h in HOVER]], axis=1)
    hover = "<br>".join([f"{h}: %{{customdata[{i + 1}]}}" for i, h in enumerate(HOVER)]) + "<extra></extra>"
    fig = go.Figure()
    vals = df[color]
    numeric = pd.api.types.is_numeric_dtype(vals) and not pd.api.types.is_bool_dtype(vals) and vals.nunique() > 12
    if numeric:
        fig.add_trace(go.Scattergl(x=df["x"], y=df["y"], mode="markers", customdata=custom, hovertemplate=hover,
                                   marker=dict(size=5, color=vals.fillna(0), colorscale="Viridis", showscale=True,
                                               colorbar=dict(title=color))))
    else:
        cats = vals.astype(str)
        many = cats.nunique() > 24
        if many:  # hundreds of identities: one trace, colours by code
            codes = pd.Categorical(cats).codes
            fig.add_trace(go.Scattergl(x=df["x"], y=df["y"], mode="markers", customdata=custom,
                                       hovertemplate=hover, marker=dict(size=5, color=codes, colorscale="Turbo"),
                                       name=color))
        else:
            for cat in sorted(cats.unique(), key=lambda c: (len(c), c)):  # 2 before 10
                m = (cats == cat).to_numpy()
                fig.add_trace(go.Scattergl(x=df["x"][m], y=df["y"][m], mode="markers", name=cat,
                                           customdata=custom[m], hovertemplate=hover, marker=dict(size=5)))
    if highlight:
        h = df["id"].isin(highlight).to_numpy()
        fig.add_trace(go.Scattergl(x=df["x"][h], y=df["y"][h], mode="markers", name="selected",
                                   customdata=custom[h], hovertemplate=hover,
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
if compare:
    other = st.selectbox("Compare with", [v for v in versions if v != version])
    left, right = st.columns(2)
    with left:
        st.caption(f"**{version}**")
        event = st.plotly_chart(figure(df, color, set(selected), 480), on_select="rerun",
                                selection_mode=("points", "box", "lasso"), key=f"map_{version}_cmp")
    with right:
        st.caption(f"**{other}** (same selection highlighted)")
        st.plotly_chart(figure(load_map(name, other, store.last_modified(name)), color, set(selected), 480),
                        key=f"map_{other}_right")
else:
    event = st.plotly_chart(figure(df, color, set(selected)), on_select="rerun",
                            selection_mode=("points", "box", "lasso"), key=f"map_{version}")
st.caption(f"{len(df)} samples · box or lasso to select, click a point to see it · hover for details")

points = (event or {}).get("selection", {}).get("points", []) if event else []
if points:
    ids = list(dict.fromkeys(p["customdata"][0] for p in points if p.get("customdata")))
    if ids != selected:
        st.session_state[sel_key] = ids
        selected = ids

# ---------------------------------------------------------------- selection and bulk actions
if selected:
    st.subheader(f"Selection: {len(selected)} samples")
    rows = df[df["id"].isin(selected)].head(48).to_dict("records")
    thumbnails(rows, ("identity", "camera"))
    who = user_name()
    a1, a2, a3 = st.columns(3)
    with a1.form("bulk_label"):
        new_label = st.text_input("Set class label", placeholder="person, vehicle, shadow…")
        new_ident = st.text_input("Set identity")
        if st.form_submit_button("Apply to selection"):
            if new_label.strip():
                store.set_field(name, selected, "label", new_label.strip(), user=who)
            if new_ident.strip():
                store.set_field(name, selected, "identity", new_ident.strip(), user=who)
            st.success(f"Updated {len(selected)} samples.")
    with a2.form("bulk_tags"):
        tags = st.multiselect("Add condition tags", CONDITION_TAGS)
        if st.form_submit_button("Tag selection"):
            n = store.tag_samples(name, selected, tags)
            st.success(f"Tagged {n} samples with {', '.join(tags)}.")
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
        st.session_state[sel_key] = []
        st.rerun()

# ---------------------------------------------------------------- misclustered candidates
st.subheader("Misclustered candidates")
clusters = analysis.condition_clusters(name)
for c in clusters[:5]:
    with st.expander(f":material/warning: {c['condition']} cluster: {c['size']} samples"):
        st.write(c["reason"])
        thumbnails(store.sample_rows(store.get_dataset(name).select(c["members"][:16]), ["identity"]), ("identity",))
        if st.button("Select these on the map", key=f"selc_{c['condition']}_{c['size']}"):
            st.session_state[sel_key] = list(c["members"])
            st.rerun()
cands = analysis.candidates(name, limit=60)
if not cands:
    st.caption("No candidates yet (they are scored after embedding and after each round).")
else:
    table = pd.DataFrame([{"score": round(r["mis_score"], 2), "identity": r["identity"], "camera": r["camera"],
                           "why": "; ".join(r["mis_reasons"] or [])} for r in cands])
    st.dataframe(table, hide_index=True, width="stretch", height=260)
    if st.button("Select the top candidates on the map"):
        st.session_state[sel_key] = [r["id"] for r in cands]
        st.rerun()
