"""Train page (being built)."""
import streamlit as st

st.title("Train")
st.info("This page arrives with its issue.")
