"""Vigil: a workbench that teaches a re-ID embedding model what matters in your own footage."""
from __future__ import annotations

import streamlit as st

st.set_page_config(page_title="Vigil", page_icon=":material/shield:", layout="wide")

PAGES = [
    st.Page("pages/data.py", title="Data", icon=":material/video_library:", default=True),
    st.Page("pages/map.py", title="Map", icon=":material/scatter_plot:"),
    st.Page("pages/annotate.py", title="Annotate", icon=":material/label:"),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/export.py", title="Export", icon=":material/ios_share:"),
]
st.navigation(PAGES).run()  # each page draws the sidebar first (pages.common.sidebar)
