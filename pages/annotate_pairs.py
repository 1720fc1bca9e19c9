"""Annotate page, pair view: "same person?" questions over the identity graph.

Each tab leases one pair at a time (a heartbeat keeps the lease while the tab is open) and shows
both identities side by side: crops, cameras, frames, conditions, a frame strip of each
representative tracklet. One key a decision: Same (Y) merges the two identities, Different (N)
keeps them apart, Not sure (S) passes, Undo (U) takes back this tab's last answer. UI only:
core.services.labeling.identity and core.services.labeling.pairs do the work."""
from __future__ import annotations

import streamlit as st

from core.services.labeling import DEFAULT_PAIR_ORDER, PAIR_ORDERS, LabelingError, identity, pairs, tracklet_strip
from pages.common import db_ok, show_error

LEASE_S = 120
HEARTBEAT_S = 30
STRIP_FRAMES = 6
ANSWERS = (("same", "Same", "Y", "They are one person: merge the two identities (Y)"),
           ("different", "Different", "N", "Two people: keep them apart, never asked again (N)"),
           ("unsure", "Not sure", "S", "Cannot tell: pass; not asked again while both identities stay as they are (S)"))


def has_pairs(name: str) -> bool:
    """True when the dataset's identity graph has two or more identities (tracklets or crops)
    to compare: the Annotate page opens on the pair view then."""
    return len(identity.load(name).graph.components()) >= 2


@st.cache_data(ttl=600, max_entries=64, show_spinner=False)
def _strip(name: str, sample_id: str, n: int) -> list:
    return tracklet_strip(name, sample_id, n=n)


@st.fragment(run_every=HEARTBEAT_S)
def _heartbeat(name: str, sid: str, a: str, b: str) -> None:
    if not db_ok():
        return
    if not pairs.renew_pair(name, sid, a, b, LEASE_S):
        st.warning("Your lease on this pair expired and another operator took it; answering anyway is "
                   "checked against the graph as it stands then.")


def _report(doing: str, exc: BaseException) -> None:
    if isinstance(exc, LabelingError):  # core's message says what to do
        st.error(str(exc))
    else:  # an outage says so; anything else says what failed
        show_error(exc, doing, "Try again; if it persists, the app log has the details.")


def _call(doing: str, fn, *args, **kwargs):
    """Run a core call, turning its errors into messages; returns (result, ok)."""
    try:
        return fn(*args, **kwargs), True
    except Exception as exc:  # noqa: BLE001 - reported by _report
        _report(doing, exc)
    return None, False


def _answer(name: str, sid: str, user: str, item: pairs.PairItem, answer: str) -> None:
    """Button callback: the answer on the pair the operator was shown (bound when the buttons were
    drawn, so a pair that changed meanwhile is never the one answered)."""
    try:
        r = identity.decide_pair(name, sid, item.a.node, item.b.node, answer, user,
                                 model_version=item.model_version, p_same=item.p_same, cosine=item.cosine)
    except identity.PairConflict as exc:  # nothing applied; core closed the pair
        st.session_state["pair_conflict"] = _conflict_text(exc)
        st.session_state.pop("pair_last", None)
    except Exception as exc:  # noqa: BLE001 - shown by the run this callback precedes
        st.session_state["pair_error"] = exc
    else:
        st.session_state["pair_last"] = _result_text(r, item)


def _label(side: pairs.Side) -> str:
    return side.identity or f"unnamed {side.node}"


def _facts(side: pairs.Side) -> str:
    cams = ", ".join(side.cameras) or "?"
    frames = f"frames {side.frames[0]}–{side.frames[1]}" if side.frames else "no frame numbers"
    seqs = f" of {', '.join(side.sequences)}" if side.sequences and side.sequences != side.cameras else ""
    night = f" · 🌙 {side.low_light:.0%} low light" if side.low_light else " · no low light"
    return (f"{side.crops} crops · {side.tracklets} tracklet{'s' if side.tracklets != 1 else ''} · "
            f"camera {cams} · {frames}{seqs}{night}")


def _draw_side(name: str, title: str, side: pairs.Side) -> None:
    st.markdown(f"**{title}: {_label(side)}**")
    st.caption(_facts(side))
    if side.filepaths:
        st.image(side.filepaths, width=64)
    if side.node.startswith("t:") and side.sample_ids:
        strip = _strip(name, side.sample_ids[0], STRIP_FRAMES)
        if strip:
            st.caption(f"Tracklet {side.node[2:]} — frames it spans")
            st.image([im for _f, im in strip], caption=[f"frame {f}" for f, _im in strip], width=100)


def _result_text(r: identity.PairResult, item: pairs.PairItem) -> str:
    crops = f"{r.labelled} crop{'s' if r.labelled != 1 else ''} labelled"
    if r.answer == "same":
        return (f"Same: merged into identity {r.identity} — {crops} ({r.component_crops} crops in "
                "that identity now).")
    if r.answer == "different":
        return f"Different: {_label(item.a)} and {_label(item.b)} are kept apart — {crops}."
    return f"Not sure: passed on {_label(item.a)} / {_label(item.b)} — {crops}."


def _conflict_text(exc: identity.PairConflict) -> str:
    c = exc.conflict

    def members(side: list[str]) -> str:
        return ", ".join(side[:6]) + (f" and {len(side) - 6} more" if len(side) > 6 else "")

    return (f"**Not applied**: {c.describe()}.\n\n- one side: {members(c.a_side)}\n- other side: "
            f"{members(c.b_side)}\n\nUndo the answer in the way, or answer 'different' / 'not sure'.")


def render(name: str, sid: str, user: str) -> None:
    """The pair view of dataset ``name`` for the tab ``sid`` labelling as ``user``."""
    orders = list(PAIR_ORDERS)
    c1, c2 = st.columns([2, 5])
    order = c1.radio("Order", orders, index=orders.index(DEFAULT_PAIR_ORDER), horizontal=True,
                     key="pair_order", help="likely: the pairs most probably one person first (each Same labels both "
                                            "identities; the default); uncertainty: those the model is least sure of; "
                                            "random: the control")
    if st.session_state.get("pair_order_prev") not in (None, order):
        _call("giving the pair back", pairs.release_pairs, name, sid)  # order changed: give the old pair back
    st.session_state["pair_order_prev"] = order

    if st.session_state.get("pair_error") is not None:
        _report("saving your answer", st.session_state.pop("pair_error"))
    if st.session_state.get("pair_conflict"):
        st.warning(st.session_state.pop("pair_conflict"))
    if st.session_state.get("pair_last"):
        st.success(st.session_state["pair_last"])

    item, ok = _call("getting the next pair", pairs.next_pair, name, sid, order=order, lease_s=LEASE_S,
                     prefetch=True)
    if not ok:
        return
    st.session_state["pair_item"] = item.key if item is not None else None
    st.session_state["pair_nodes"] = (item.a.node, item.b.node) if item is not None else None

    if item is None:
        st.success("Nothing left to ask: every pair of identities the model finds close is answered or "
                   "implied by the graph. New footage or a training round brings new questions.")
    else:
        _heartbeat(name, sid, item.a.node, item.b.node)
        c2.caption(f"Why this pair: {item.reason} · {item.order} order · model {item.model_version or '?'}")
        st.markdown("### Same person?")

    # the answer buttons, one key a decision (Streamlit shows each key on its button); Undo works
    # with nothing left to ask too
    cols = st.columns([1, 1, 1, 1, 2])
    for col, (answer, text, key, why) in zip(cols, ANSWERS):
        col.button(text, key=f"pair_{answer}", shortcut=key, width="stretch",
                   type="primary" if answer == "same" else "secondary", disabled=item is None, help=why,
                   on_click=_answer, args=(name, sid, user, item, answer))
    if cols[3].button("Undo", key="pair_undo", shortcut="U", width="stretch",
                      help="Take back this tab's last pair answer; the pair is asked again (U)"):
        d, ok = _call("undoing your last answer", identity.undo_pair, name, sid, user)
        if ok and d is None:
            st.info("No pair answer to undo in this tab.")
        elif ok:
            st.session_state["pair_last"] = f"Undid your '{d['answer']}' on {d['a']} / {d['b']}."
            st.rerun()
    cols[4].caption("Keys: Y same · N different · S not sure · U undo")

    if item is not None:
        left, right = st.columns(2)
        with left:
            _draw_side(name, "A", item.a)
        with right:
            _draw_side(name, "B", item.b)

    found, ok = _call("reading the graph's conflicts", identity.conflicts, name)
    if ok and found:
        with st.expander(f"Answers the graph could not apply ({len(found)})"):
            st.caption("Two answers that contradict each other (e.g. given at once in two tabs). Neither "
                       "side is applied silently: undo the one that is wrong.")
            for c in found:
                st.markdown(f"- {c.describe()}")
