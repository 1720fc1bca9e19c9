"""Annotate page (being built)."""
import streamlit as st

st.title("Annotate")
st.info("This page arrives with its issue.")
