"""Vigil core: the library shared by the Streamlit pages, the CLI and the background jobs."""
