"""Annotate page, two modes. Pairs (pages/annotate_pairs.py): "same person?" questions over the
identity graph. Crops: the labelling queue; each tab leases one item at a time (a heartbeat keeps
the lease while the tab is open), shows it large with its tracklet context, and writes each
decision to FiftyOne at once. UI only: core.services.labeling does the work."""
from __future__ import annotations

import uuid

import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core import jobs
from core.services import labeling
from core.services.labeling import pairs
from pages import annotate_pairs
from pages.common import db_ok, job_status, require_dataset, show_error, sidebar, user_name

LEASE_S = 120
HEARTBEAT_S = 30
CLASS_KEYS = "123456789"
IDENTITY_KEYS = "QWETY"
MODES = {"pairs": "Pairs: same person?", "crops": "Crops: class & identity"}

sidebar()
st.title("Annotate")
name = require_dataset()
sid = st.session_state.setdefault("annotate_session", uuid.uuid4().hex)
user = user_name()

# ---------------------------------------------------------------- mode: pairs or crops
if "ann_mode" not in st.session_state:  # pairs first where there are identities to compare
    try:
        st.session_state["ann_mode"] = "pairs" if annotate_pairs.has_pairs(name) else "crops"
    except Exception as exc:  # noqa: BLE001 - the crop view still works; say why pairs were not offered first
        show_error(exc, "reading the identity graph", "The crop view is shown; reload the page to try again.")
        st.session_state["ann_mode"] = "crops"
mode = st.radio("Mode", list(MODES), format_func=MODES.get, horizontal=True, key="ann_mode",
                label_visibility="collapsed")
if st.session_state.get("ann_mode_prev") not in (None, mode):  # switched: give the other mode's lease back
    try:
        if mode == "crops":
            pairs.release_pairs(name, sid)
        else:
            labeling.release(name, sid)
    except Exception as exc:  # noqa: BLE001 - an unreleased lease expires by itself
        show_error(exc, "giving the other mode's item back", "It goes back to the queue when its lease expires.")
st.session_state["ann_mode_prev"] = mode

try:
    emb = labeling.embedding_status(name)
    schema = labeling.label_schema(name)
except Exception as exc:  # an outage says so; anything else (a bad label schema...) says what failed
    show_error(exc, "reading the dataset's embeddings and label schema",
               "Reload the page; if it persists, check the label schema and the app log.")
    st.stop()

if emb["embedded"] == 0:
    job_status(name, ("embed",))
    st.info("This dataset has no embeddings yet, so the queue cannot tell which samples the model is "
            "unsure about. Embedding runs in the background (the worker started by `make run`).")
    if st.button("Embed with the packaged model", type="primary", key="embed_now"):
        try:
            jobs.submit(name, "embed", {})
        except Exception as exc:
            show_error(exc, "queueing the embedding job", "Try again; the worker started by `make run` runs it.")
        else:
            st.success("Embedding job queued; this page updates when it is done.")
    st.stop()
if emb["embedded"] < emb["total"]:
    st.caption(f"{emb['embedded']} of {emb['total']} samples embedded with **{emb['version']}**; "
               "only embedded samples are queued.")

if mode == "pairs":
    annotate_pairs.render(name, sid, user)
    st.stop()

# ---------------------------------------------------------------- queue settings
names = list(labeling.STRATEGIES)
SUGGESTED = {"identity": labeling.DEFAULT_STRATEGY, "label": "personness"}  # per target
c1, c2, c3, c4, c5 = st.columns([3, 2, 2, 1, 2])
target = c2.radio("Label", list(labeling.TARGETS), horizontal=True, key="ann_target",
                  format_func=lambda t: "identity" if t == "identity" else "class")
# switching the target suggests its strategy (before the selector is drawn, so it shows there)
if st.session_state.get("ann_target_prev") not in (None, target) and \
        st.session_state.get("ann_strategy") == SUGGESTED.get(st.session_state["ann_target_prev"]):
    st.session_state["ann_strategy"] = SUGGESTED[target]
st.session_state["ann_target_prev"] = target
st.session_state.setdefault("ann_strategy", SUGGESTED[target])
strategy = c1.selectbox(
    "Strategy", names, key="ann_strategy", format_func=lambda s: labeling.DESCRIPTIONS.get(s, s),
    help="uncertainty_diversity (the default for identities): uncertain and spread out; random is the "
         "control. For class labels: personness asks \"Is this a person?\" about the crops the active "
         "model is least sure of first (person-ness nearest its threshold; without a person-ness head, "
         "the lowest detector scores)")
if target == "label" and strategy != "personness":
    c1.caption("Suggested for class labels: *Is this a person? least sure first* (personness).")
trust = c3.toggle("Ingested values count", value=schema.mode == "trust", key="ann_trust",
                  help="Off: identities that came with MOT / re-ID data are unverified and queued for you to "
                       "confirm. On: they count as labels; only samples without one are queued.")
k = int(c4.number_input("Batch", 5, 200, 20, key="ann_k"))
boost = c5.toggle("Night / shadow / flagged first", value=True, key="ann_boost")
spec = labeling.QueueSpec(strategy=strategy, k=k, target=target, mode="trust" if trust else "verify",
                          boost_conditions=boost)
if st.session_state.get("ann_queue") not in (None, spec.key):
    labeling.release(name, sid)  # settings changed: give the old item back
st.session_state["ann_queue"] = spec.key


DOING = {"next_item": "getting the next item to label", "build_queue": "computing the queue",
         "undo": "undoing your last decision", "similar_crops": "finding crops like this one",
         "merge_identities": "merging the identities", "progress": "counting the labelling progress"}


def _do(fn, *args, **kwargs):
    """Run a core call, turning its errors into messages; returns (result, ok)."""
    try:
        return fn(*args, **kwargs), True
    except labeling.LabelConflict:
        raise
    except labeling.LabelingError as exc:
        st.error(str(exc))
    except Exception as exc:  # an outage says so; anything else says what failed
        show_error(exc, DOING.get(fn.__name__, fn.__name__.replace("_", " ")),
                   "Try again; if it persists, the app log has the details.")
    return None, False


item, ok = _do(labeling.next_item, name, sid, LEASE_S, spec)
if not ok:
    st.stop()

b1, b2, b3 = st.columns([2, 2, 6])
counts = labeling.queue_counts(name, spec.key)
b3.caption(f"Queue: {counts['pending']} waiting · {counts['leased']} with operators · {counts['done']} done · "
           f"{counts['skipped']} skipped — refills in the background when fewer than {spec.refill_below} wait")
if b1.button("Recompute queue", key="ann_rebuild", help="Compute a fresh batch with the current labels"):
    labeling.release(name, sid)
    labeling.clear_queue(name, spec.key, pending_only=True)
    _do(labeling.build_queue, name, spec=spec)
    st.rerun()
if b2.button("Undo last", key="undo", shortcut="U", help="Revert your last decision (U)"):
    try:
        d, ok = _do(labeling.undo, name, sid, user)
    except labeling.LabelConflict as exc:
        st.warning(f"Cannot undo: the sample was changed since by {exc.theirs.get('labelled_by') or 'someone'} "
                   f"({labeling.describe(exc.theirs)}).")
    else:
        if ok and d is None:
            st.info("Nothing to undo in this tab.")
        elif ok:
            if item is not None and d.sample_id and d.sample_id != item.sample_id:
                labeling.release(name, sid, item.sample_id)  # show the undone sample next
            if d.kind == "bulk":  # the same tab's bulk action on the Map page
                kept = len(d.not_restored or [])
                st.session_state["ann_last"] = "Undid your bulk action on the map" + (
                    f" ({kept} samples changed since were left as they are)." if kept else ".")
            else:
                st.session_state["ann_last"] = f"Undid your {d.kind} of {d.sample_id or d.after}."
            st.rerun()

if st.session_state.get("ann_error") is not None:  # a decision's callback failed
    exc = st.session_state.pop("ann_error")
    if isinstance(exc, labeling.LabelingError):
        st.error(str(exc))
    else:
        show_error(exc, "saving your decision", "Try again; if it persists, the app log has the details.")
if st.session_state.get("ann_last"):
    st.caption(st.session_state["ann_last"])

# ---------------------------------------------------------------- conflict (never dropped)
conflict = st.session_state.get("ann_conflict")
if conflict:
    theirs, mine = conflict["theirs"], conflict["mine"]
    st.warning(f"**Conflict** on sample `{conflict['sample_id']}`: {theirs.get('labelled_by') or 'someone'} changed it "
               f"at {theirs.get('labelled_at') or '?'} while you were deciding. Nothing was overwritten.\n\n"
               f"- theirs: {labeling.describe(theirs) or '(empty)'}\n- yours: {labeling.describe(mine) or '(empty)'}")
    k1, k2 = st.columns(2)
    if k1.button("Keep mine (overwrite theirs)", key="conflict_mine", type="primary"):
        try:
            labeling.decide(name, sid, conflict["sample_id"], user, expected_version=conflict["token"],
                            **conflict["kwargs"])
            labeling.record_conflict(name, sid, conflict["sample_id"], user, mine, theirs, "kept_mine")
            del st.session_state["ann_conflict"]
        except labeling.LabelConflict as exc:  # changed again meanwhile: show the new state
            conflict.update(theirs=exc.theirs, token=exc.token)
        st.rerun()
    if k2.button("Keep theirs (drop mine)", key="conflict_theirs"):
        labeling.record_conflict(name, sid, conflict["sample_id"], user, mine, theirs, "kept_theirs")
        del st.session_state["ann_conflict"]
        st.rerun()


def _decide(it: labeling.Item, **kwargs) -> None:
    """Button callback: one decision on the item the operator was shown (bound when the buttons
    were drawn), with its pending toggles. It runs before the page's next run, so a decision
    costs one page run, not two (at 100k crops a run of this page is about a second)."""
    for key, val in _pending(it).items():
        kwargs.setdefault(key, val)
    try:
        d = labeling.decide(name, sid, it.sample_id, user, expected_version=it.token, **kwargs)
    except labeling.LabelConflict as exc:
        st.session_state["ann_conflict"] = {"sample_id": it.sample_id, "mine": exc.mine, "theirs": exc.theirs,
                                            "token": exc.token, "kwargs": kwargs}
        return
    except Exception as exc:  # noqa: BLE001 - shown by the run this callback precedes
        st.session_state["ann_error"] = exc
        return
    what = "skipped" if d.kind == "skip" else labeling.describe({k: v for k, v in d.after.items() if d.before.get(k) != v})
    agreed = "" if d.model_agreed is None else (" · model agreed" if d.model_agreed else f" · model said {d.predicted}")
    st.session_state["ann_last"] = f"Saved: {what or 'no change'}{agreed}."


def _decide_typed(it: labeling.Item) -> None:
    typed = (st.session_state.get(f"id_text_{it.sample_id}") or "").strip()
    if typed:
        _decide(it, identity=typed)


def _decide_new(it: labeling.Item) -> None:
    try:
        fresh = labeling.new_identity(name)
    except Exception as exc:  # noqa: BLE001 - shown by the run this callback precedes
        st.session_state["ann_error"] = exc
        return
    _decide(it, identity=fresh)


def _pending(it: labeling.Item) -> dict:
    """Tag / behaviour / attribute widget values of the item, as decide() arguments."""
    sfx = it.sample_id
    have = set(it.current.get("tags") or [])
    on = {t for t in schema.conditions if st.session_state.get(f"tag_{t}_{sfx}", t in have)}
    out: dict = {"tags_add": sorted(on - have), "tags_remove": sorted((have & set(schema.conditions)) - on)}
    beh = st.session_state.get(f"beh_{sfx}")
    if beh and beh != it.current.get("behaviour"):
        out["behaviour"] = beh
    attrs = {}
    for a in schema.attributes:
        v = st.session_state.get(f"attr_{a}_{sfx}")
        if v not in (None, "", "—") and v != (it.current.get("attributes") or {}).get(a):
            attrs[a] = v
    if attrs:
        out["attributes"] = attrs
    return out


# ---------------------------------------------------------------- the item
if item is None:
    st.success("Nothing left to label with these settings. Recompute the queue after new footage or a "
               "training round, or switch the target / mode.")
else:
    st.session_state["annotate_item"] = item.sample_id

    @st.fragment(run_every=HEARTBEAT_S)
    def heartbeat(sample_id: str) -> None:
        if not db_ok():
            return
        if not labeling.renew(name, sid, sample_id, LEASE_S):
            st.warning("Your lease on this item expired and another operator took it; if you decide anyway, "
                       "a conflicting write is shown to you, never applied silently.")

    heartbeat(item.sample_id)
    now_state, now_token = labeling.sample_state(name, item.sample_id)
    if now_token != item.token and not conflict:
        st.warning(f"This sample changed since it was served ({labeling.describe(now_state)}, by "
                   f"{now_state.get('labelled_by') or 'someone'}); deciding will ask you which to keep.")

    left, right = st.columns([2, 3])
    with left:
        st.image(item.filepath, width=260,
                 caption=f"{item.identity or 'no identity'} · camera {item.camera or '?'} · {item.label or 'no class'}")
        st.caption(f"#{item.rank + 1} of batch {item.batch} · {item.strategy} · score {item.score:.3f}")
        if item.reason:
            st.caption(f"Why: {item.reason}")
        if item.low_light:
            st.caption(f"🌙 low light (brightness {item.brightness:.0f})" if item.brightness is not None else "🌙 low light")
        if item.current.get("labelled_by"):
            st.caption(f"Last labelled by {item.current['labelled_by']} at {item.current.get('labelled_at')}")

    with right:
        st.markdown("**Class** — one click saves and moves on")
        cols = st.columns(len(schema.classes))
        for i, cls in enumerate(schema.classes):
            sc = CLASS_KEYS[i] if i < len(CLASS_KEYS) else None
            cols[i].button(cls, key=f"cls_{cls}", shortcut=sc, width="stretch",
                           type="primary" if cls == item.label else "secondary",
                           help=f"Key {sc}" if sc else None, on_click=_decide, args=(item,), kwargs={"label": cls})

        st.markdown("**Identity**")
        try:
            sugg = labeling.suggest_identities(name, item.sample_id, k=len(IDENTITY_KEYS))
        except labeling.LabelingError:
            sugg = []
        id_cols = st.columns(len(IDENTITY_KEYS) + 1)
        if item.identity and not item.current.get("labelled_by"):
            id_cols[0].button(f"✓ {item.identity}", key="id_confirm", shortcut="V", type="primary",
                              help="Confirm the ingested identity (V)", on_click=_decide, args=(item,),
                              kwargs={"identity": item.identity,
                                      "label": item.label if item.label in schema.classes else None})
        for i, s in enumerate(sugg):
            txt = f"{s['identity']}{'' if s['verified'] else ' ?'} · {s['distance']:.2f}"
            id_cols[i + 1].button(txt, key=f"id_s{i}", shortcut=IDENTITY_KEYS[i],
                                  help=f"Nearest {'verified' if s['verified'] else 'unverified (ingested)'} "
                                       f"identity, {s['votes']} of the nearest labelled samples (key {IDENTITY_KEYS[i]})",
                                  on_click=_decide, args=(item,), kwargs={"identity": s["identity"]})
        t1, t2, t3 = st.columns([3, 1, 2])
        t1.text_input("Identity", key=f"id_text_{item.sample_id}", label_visibility="collapsed",
                      placeholder="type an identity and press Set")
        t2.button("Set", key="id_set", on_click=_decide_typed, args=(item,))
        t3.button("New identity", key="id_new", shortcut="N", help="A fresh identity (N)", on_click=_decide_new,
                  args=(item,))

        if item.tracklet:
            st.radio("Behaviour (tracklet)", schema.behaviours, horizontal=True, key=f"beh_{item.sample_id}",
                     index=schema.behaviours.index(item.current["behaviour"])
                     if item.current.get("behaviour") in schema.behaviours else None)
        st.markdown("**Conditions** (saved with the decision)")
        tcols = st.columns(len(schema.conditions))
        for i, t in enumerate(schema.conditions):
            tcols[i].toggle(t, value=t in (item.current.get("tags") or []), key=f"tag_{t}_{item.sample_id}")
        if schema.attributes:
            acols = st.columns(len(schema.attributes))
            for i, (a, opts) in enumerate(schema.attributes.items()):
                cur = (item.current.get("attributes") or {}).get(a)
                if opts:
                    choices = ["—", *opts]
                    acols[i].selectbox(a, choices, index=choices.index(cur) if cur in choices else 0,
                                       key=f"attr_{a}_{item.sample_id}")
                else:
                    acols[i].text_input(a, value=cur or "", key=f"attr_{a}_{item.sample_id}")
        s1, s2 = st.columns(2)
        s1.button("Save tags / attributes only", key="save_extra", on_click=_decide, args=(item,))
        s2.button("Skip", key="skip", shortcut="S", help="Not now (S)", on_click=_decide, args=(item,),
                  kwargs={"skip": True})
        st.caption("Keys: 1–9 class · V confirm identity · Q W E T Y suggested identity · N new identity · "
                   "S skip · U undo")

    if item.tracklet:
        strip = labeling.tracklet_strip(name, item.sample_id, n=8)
        if strip:
            st.markdown(f"**Tracklet {item.tracklet}** — frames it spans")
            st.image([im for _f, im in strip], caption=[f"frame {f}" for f, _im in strip], width=150)
            path = labeling.tracklet_path(name, item.tracklet)
            if path:
                bg = strip[len(strip) // 2][1]
                fig = go.Figure(go.Image(z=bg, opacity=0.6))
                fig.add_trace(go.Scatter(x=[p[1] for p in path], y=[p[2] for p in path], mode="lines+markers",
                                         text=[f"frame {p[0]}" for p in path], name="path",
                                         line=dict(color="orange", width=3)))
                fig.add_trace(go.Scatter(x=[path[0][1]], y=[path[0][2]], mode="markers", name="start",
                                         marker=dict(color="lime", size=12)))
                fig.update_layout(height=360, margin=dict(l=0, r=0, t=10, b=0), showlegend=True,
                                  xaxis=dict(visible=False), yaxis=dict(visible=False))
                st.plotly_chart(fig, key="ann_path")

    if st.toggle("More like this", key="ann_similar",
                 help="The crops most like this one under the active model, across cameras, re-ranked by "
                      "shared neighbours (k-reciprocal re-ranking)"):
        hits, ok = _do(labeling.similar_crops, name, item.sample_id, 8)
        if ok and hits:
            st.image([h["filepath"] for h in hits], width=110,
                     caption=[f"{h['identity'] or '?'} · cam {h['camera'] or '?'} · {h['distance']:.2f}"
                              for h in hits])
        elif ok:
            st.caption("This crop has no embedding of the active model yet: embed the dataset on the Data page.")

# ---------------------------------------------------------------- merge identities
with st.expander("Merge two identities"):
    ids = labeling.identities(name)
    m1, m2, m3 = st.columns([2, 2, 1])
    keep = m1.selectbox("Keep", ids, key="merge_a")
    drop = m2.selectbox("Merge into it", [i for i in ids if i != keep], key="merge_b")
    if m3.button("Merge", key="merge_go", disabled=not drop):
        d, ok = _do(labeling.merge_identities, name, keep, drop, user, sid)
        if ok:
            st.session_state["ann_last"] = f"Merged {drop} into {keep} (Undo reverts it)."
            st.rerun()

# ---------------------------------------------------------------- progress
st.subheader("Progress")
prog, ok = _do(labeling.progress, name)
if ok:
    st.caption(f"{prog['labelled']} of {prog['total']} samples have a human decision"
               + (" · by " + ", ".join(f"{u} {n}" for u, n in prog["per_user"].items()) if prog["per_user"] else ""))
    g1, g2, g3 = st.columns(3)
    for col, key, title in ((g1, "per_class", "Labelled per class"), (g2, "per_identity", "Labelled per identity"),
                            (g3, "per_condition", "Labelled per condition")):
        data = prog[key]
        if key == "per_identity":
            data = dict(sorted(data.items(), key=lambda kv: -kv[1])[:30])
        if data:
            fig = px.bar(x=list(data), y=list(data.values()), labels={"x": "", "y": "samples"}, title=title)
            fig.update_layout(height=300, margin=dict(l=0, r=0, t=40, b=0))
            col.plotly_chart(fig, key=f"prog_{key}")
        else:
            col.caption(f"{title}: nothing yet")
    agr = prog["agreement"]
    if agr:
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=[r["at"] for r in agr], y=[r["rolling"] for r in agr], mode="lines+markers",
                                 name="last 20 decisions"))
        fig.add_trace(go.Scatter(x=[r["at"] for r in agr], y=[r["cumulative"] for r in agr], mode="lines",
                                 name="all so far", line=dict(dash="dot")))
        fig.update_layout(title="Model agreement with new labels (kNN on previously labelled samples)",
                          yaxis=dict(range=[0, 1.05], tickformat=".0%"), height=320, margin=dict(l=0, r=0, t=40, b=0))
        st.plotly_chart(fig, key="prog_agreement")
    else:
        st.caption("Model agreement appears once decisions are made on samples with labelled neighbours.")
