"""Map page (being built)."""
import streamlit as st

st.title("Map")
st.info("This page arrives with its issue.")
