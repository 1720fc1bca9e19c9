"""Vigil: a workbench that teaches a re-ID embedding model what matters in your own footage."""
from __future__ import annotations

import streamlit as st

from pages import common

st.set_page_config(page_title="Vigil", page_icon="🛡️", layout="wide")

PAGES = [
    st.Page("pages/data.py", title="Data", icon="🗂️", default=True),
    st.Page("pages/map.py", title="Map", icon="🗺️"),
    st.Page("pages/annotate.py", title="Annotate", icon="🏷️"),
    st.Page("pages/train.py", title="Train", icon="🏋️"),
    st.Page("pages/export.py", title="Export", icon="📦"),
]
nav = st.navigation(PAGES)
common.sidebar()
nav.run()
