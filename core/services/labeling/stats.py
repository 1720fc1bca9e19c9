"""Progress statistics: labelled counts per class, identity, condition and operator, and the
model's agreement with new labels over time."""
from __future__ import annotations

from typing import Any

from core.services.labeling.base import CONDITION_TAGS, DECISIONS, _aware, _coll, _ensure


def progress(name: str) -> dict[str, Any]:
    """Labelled counts over samples with a human decision (``labelled_by`` set):
    {labelled, total, per_class, per_identity, per_condition, per_user, agreement}; agreement
    is :func:`agreement_series`."""
    ds = _ensure(name)
    view = ds.exists("labelled_by")
    n = view.count()
    out: dict[str, Any] = {"labelled": n, "total": len(ds), "per_class": {}, "per_identity": {},
                           "per_condition": {}, "per_user": {}}
    if n:
        out["per_class"] = {str(k): v for k, v in view.count_values("label").items() if k is not None}
        out["per_identity"] = {str(k): v for k, v in view.count_values("identity").items() if k is not None}
        out["per_user"] = {str(k): v for k, v in view.count_values("labelled_by").items() if k is not None}
        tags = view.count_sample_tags()
        cond = {t: int(tags.get(t, 0)) for t in CONDITION_TAGS}
        if "low_light" in ds.get_field_schema():
            cond["low light (measured)"] = int(view.count_values("low_light").get(True, 0))
        out["per_condition"] = cond
    out["agreement"] = agreement_series(name)
    return out


def agreement_series(name: str, window: int = 20) -> list[dict[str, Any]]:
    """The model's agreement with new labels over time: one row per label decision that had a
    prediction (not undone), oldest first: {at, n, agreed, rolling, cumulative, round, target}
    (``rolling``: share over the last ``window`` decisions)."""
    rows = []
    hits: list[int] = []
    for d in _coll(DECISIONS).find({"dataset": name, "kind": "label", "undone": False,
                                    "model_agreed": {"$ne": None}}, sort=[("seq", 1)]):
        hits.append(int(bool(d["model_agreed"])))
        last = hits[-window:]
        rows.append({"at": _aware(d["at"]), "n": len(hits), "agreed": bool(d["model_agreed"]),
                     "rolling": sum(last) / len(last), "cumulative": sum(hits) / len(hits),
                     "round": d.get("round", 0), "target": d.get("target")})
    return rows
