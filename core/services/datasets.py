"""What the pages read and write about a dataset, without FiftyOne views in their hands.

The store's lookups the pages need are named here once (``names``, ``summary``, ``counts``, ...);
what took a view in a page is a function of plain values here (:func:`browse`, :func:`rows_of`).
Pages import this module, never :mod:`core.data.store` (``.importlinter``).
"""
from __future__ import annotations

from typing import Any, Sequence

from core.data import store
from core.data.store import (StoreError, active_model, check_db, counts, is_outage, last_modified,  # noqa: F401
                             open_in_app, person_field, tag_counts, tag_samples, view_columns)

names = store.dataset_names
summary = store.dataset_summary


def matching_count(name: str, filters: dict[str, Any] | None, tags: list[str] | None) -> int:
    """How many samples match the equality ``filters`` and carry all ``tags``."""
    return len(store.filtered_view(name, filters, tags))


def browse(name: str, filters: dict[str, Any] | None, tags: list[str] | None, fields: list[str],
           offset: int, limit: int) -> list[dict[str, Any]]:
    """Rows (id, filepath, ``fields``) ``offset .. offset + limit`` of the samples matching
    ``filters`` / ``tags``."""
    return store.sample_rows(store.filtered_view(name, filters, tags).skip(offset), fields, limit=limit)


def matching_ids(name: str, filters: dict[str, Any] | None, tags: list[str] | None, limit: int) -> list[str]:
    """Ids of the first ``limit`` samples matching ``filters`` / ``tags``."""
    return [r["id"] for r in store.sample_rows(store.filtered_view(name, filters, tags), [], limit=limit)]


def rows_of(name: str, ids: Sequence[str], fields: list[str]) -> list[dict[str, Any]]:
    """Rows (id, filepath, ``fields``) of the samples ``ids``."""
    return store.sample_rows(store.get_dataset(name).select(list(ids)), fields)


def saved_views(name: str) -> list[str]:
    """The dataset's saved FiftyOne views (the App's), by name."""
    return store.get_dataset(name).list_saved_views()
