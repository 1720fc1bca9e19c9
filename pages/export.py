"""Export page (being built)."""
import streamlit as st

st.title("Export")
st.info("This page arrives with its issue.")
