"""Shared UI pieces: the sidebar (dataset picker, active model, running jobs) and helpers that
turn core errors into messages an operator can act on. UI only: no math, no direct DB calls."""
from __future__ import annotations

import logging
from typing import Callable

import streamlit as st

from core.services import datasets as store

log = logging.getLogger("vigil.pages")


def current_dataset() -> str | None:
    return st.session_state.get("dataset")


def db_error(exc: Exception, retry: bool = False) -> None:
    st.error(
        f"The database is not reachable ({type(exc).__name__}: {str(exc)[:160]}). Vigil's MongoDB runs "
        "embedded under the data root; restart the app with `make run`, or check "
        "`FIFTYONE_DATABASE_URI` if you use your own MongoDB. Nothing you saved is lost: "
        "once the database answers again, retry.",
        icon=":material/cloud_off:",
    )
    if retry:
        st.button("Retry", icon=":material/refresh:", key="db_retry")


def show_error(exc: BaseException, doing: str, what_to_do: str = "", retry: bool = False) -> None:
    """The one way pages report a failure: a database outage says so (and that nothing is lost);
    anything else says what failed, why, and what the operator can do, and is logged with its
    traceback (core raises errors whose message already says what to do)."""
    if store.is_outage(exc):
        db_error(exc, retry=retry)
        return
    log.error("%s failed", doing, exc_info=exc)
    hint = f" {what_to_do}" if what_to_do else ""
    st.error(f"{doing[:1].upper()}{doing[1:]} failed: {exc}.{hint}", icon=":material/error:")


def db_ok() -> bool:
    """For polling fragments: False (with a short notice) while MongoDB does not answer."""
    try:
        store.check_db()
        return True
    except ConnectionError:
        st.caption(":material/cloud_off: Database unreachable: paused until it answers again.")
        return False


@st.cache_data(max_entries=16, show_spinner=False)
def _summary(name: str, stamp) -> dict:
    """The sidebar's counts, read again when the dataset changed (``stamp``: store.last_modified);
    at 100k samples they cost 0.18 s on every page run."""
    return store.summary(name)


@st.cache_data(max_entries=16, show_spinner=False)
def field_counts(name: str, stamp) -> dict[str, dict]:
    """Samples per camera, class, identity and low light, and per tag (``"tags"``), read again
    when the dataset changed (``stamp``: store.last_modified): six aggregations over every
    sample that each Data page run made."""
    out = {f: store.counts(name, f) for f in ("camera", "label", "identity", "low_light")}
    out["tags"] = store.tag_counts(name)
    return out


def summary(name: str) -> dict:
    """The dataset's summary (samples, identities, cameras, videos; cached as
    :func:`field_counts`) and its active model (read on every run: a job may activate one)."""
    return {**_summary(name, store.last_modified(name)), "active_model": store.active_model(name)}


def sidebar() -> None:
    with st.sidebar:
        st.markdown("### :material/shield: Vigil")
    try:
        store.check_db()
    except ConnectionError as exc:  # MongoDB down: say so in the page, stop before any query hangs
        db_error(exc, retry=True)
        st.stop()
    with st.sidebar:
        try:
            names = store.names()
        except Exception as exc:  # an outage says so; anything else says what failed
            show_error(exc, "listing the datasets", "Reload the page; if it persists, check the app log.")
            st.stop()
        if not names:
            st.info("No dataset yet: ingest footage on the Data page.")
            st.session_state["dataset"] = None
            return
        cur = st.session_state.get("dataset")
        idx = names.index(cur) if cur in names else 0
        st.session_state["dataset"] = st.selectbox("Dataset", names, index=idx, key="dataset_picker")
        try:
            s = summary(st.session_state["dataset"])
        except Exception as exc:
            show_error(exc, f"reading dataset {st.session_state['dataset']!r}",
                       "Pick another dataset above, or reload the page; the app log has the details.")
            st.stop()
        st.caption(f"{s['samples']} samples · {s['identities']} identities · {s['cameras']} cameras")
        st.caption(f"Active model: **{s['active_model'] or 'none (embed first)'}**")
        st.session_state["user"] = st.text_input("Operator", value=st.session_state.get("user", "operator"),
                                                 key="user_input")
        _jobs_panel(st.session_state["dataset"])


def _jobs_panel(name: str) -> None:
    try:
        from core import jobs
    except ImportError:
        return
    running = [j for j in jobs.list_jobs(name, limit=10) if j["state"] in ("queued", "running")]
    if running:
        st.markdown("**Running jobs**")
        for j in running:
            st.progress(j["progress"] or 0.0, text=f"{j['kind']}: {j['label'] or j['state']}")


def require_dataset() -> str:
    name = current_dataset()
    if not name:
        st.info("No dataset yet. Ingest footage on the Data page (a synthetic demo is created by `make run`).")
        st.stop()
    return name


def thumbnails(rows: list[dict], caption_fields: tuple[str, ...] = ("identity", "camera"), cols: int = 8,
               width: int = 96) -> None:
    """A grid of sample images with short captions (files are read on demand, per page)."""
    if not rows:
        st.caption("Nothing to show.")
        return
    grid = st.columns(cols)
    for i, r in enumerate(rows):
        cap = " · ".join(str(r.get(f)) for f in caption_fields if r.get(f) not in (None, ""))
        with grid[i % cols]:
            st.image(r["filepath"], caption=cap or None, width=width)


def user_name() -> str:
    """Who is labelling (set in the sidebar; with st.login configured, the signed-in user)."""
    return st.session_state.get("user") or "operator"


def job_status(name: str, kinds: tuple[str, ...], show_result: Callable[[dict], None] | None = None) -> None:
    """Live progress of this dataset's newest job of ``kinds``; reruns the page when it ends.
    ``show_result(job)`` draws a completed job's result (``job['result']``), once per page run."""
    from core import jobs

    def newest() -> dict | None:
        recent = jobs.list_jobs(name, kind=tuple(kinds), limit=1)
        return recent[0] if recent else None

    full_run = [True]  # False in the fragment's own reruns (every 2 s)

    @st.fragment(run_every=2.0)
    def _poll() -> None:
        if not db_ok():
            return
        j = newest()
        if j is None:
            return
        key = f"job_seen_{j['id']}"
        if j["state"] in ("queued", "running"):
            st.session_state[key] = "active"
            c1, c2 = st.columns([5, 1])
            c1.progress(j["progress"] or 0.0, text=f"{j['kind']} job {j['state']}: {j['label'] or 'waiting for the worker'}")
            if c2.button("Cancel", key=f"cancel_{j['id']}"):
                jobs.cancel(j["id"])
            return
        if st.session_state.get(key) == "active" and not full_run[0]:
            # it just ended: redraw the whole page, from the fragment's own run only (a rerun in
            # the middle of a whole-page run would drop that run's clicks)
            st.session_state[key] = "done"
            st.rerun(scope="app")
        if j["state"] == "failed":
            st.error(f"The last {j['kind']} job failed: {j['error']}")
        elif j["state"] == "cancelled":
            st.warning(f"The last {j['kind']} job was cancelled.")

    _poll()
    full_run[0] = False
    if show_result is not None:
        j = newest()
        if j is not None and j["state"] == "completed" and j["result"]:
            show_result(j)
