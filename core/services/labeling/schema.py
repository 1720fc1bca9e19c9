"""The label schema: what an operator can decide (classes, behaviours, condition tags,
attributes) and what "labelled" means (``mode``), kept in the dataset's state; and the
labelling round."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from core.data import store
from core.services.labeling.base import CONDITION_TAGS, LabelingError

DEFAULT_CLASSES = ("person", "vehicle", "animal", "shadow/noise", "other")
DEFAULT_BEHAVIOURS = ("walking", "loitering", "running", "other")
DEFAULT_ATTRIBUTES: dict[str, list[str]] = {"access": ["authorised", "intruder"], "clothing": []}
MODES = ("verify", "trust")


@dataclass
class LabelSchema:
    """What an operator can decide. ``attributes``: name -> allowed values (empty: free text)."""

    classes: list[str] = field(default_factory=lambda: list(DEFAULT_CLASSES))
    behaviours: list[str] = field(default_factory=lambda: list(DEFAULT_BEHAVIOURS))
    conditions: list[str] = field(default_factory=lambda: list(CONDITION_TAGS))
    attributes: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_ATTRIBUTES.items()})
    mode: str = "verify"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "LabelSchema":
        d = dict(d or {})
        known = {k: d[k] for k in ("classes", "behaviours", "conditions", "attributes", "mode") if k in d}
        s = cls(**known)
        s.validate()
        return s

    def validate(self) -> None:
        if not self.classes:
            raise LabelingError("the label schema needs at least one class")
        if self.mode not in MODES:
            raise LabelingError(f"mode must be one of {MODES}, not {self.mode!r}")
        for name, vals in self.attributes.items():
            if not isinstance(vals, list):
                raise LabelingError(f"attribute {name!r}: allowed values must be a list (empty for free text)")


def label_schema(name: str) -> LabelSchema:
    """The dataset's schema (its ``label_schema`` state), defaults where unset."""
    return LabelSchema.from_dict(store.state(name).get("label_schema"))


def set_label_schema(name: str, schema: LabelSchema | dict[str, Any]) -> LabelSchema:
    s = schema if isinstance(schema, LabelSchema) else LabelSchema.from_dict(schema)
    s.validate()
    store.set_state(name, "label_schema", asdict(s))
    return s


def current_round(name: str) -> int:
    """The labelling round: the round of the active model version (0 for "base" / unknown).
    Labels made while round r's model is active feed round r + 1."""
    version = store.active_model(name)
    if not version:
        return 0
    rec = store.db()["vigil_models"].find_one({"dataset": name, "version": version}, {"round": 1})
    return int((rec or {}).get("round") or 0)
