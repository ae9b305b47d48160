"""Notes passes leave for the report: what they declined and why, in words a user can read."""

from __future__ import annotations

import onnx_ir as ir

_NOTES_KEY = "qcompile.notes"


def add_note(model: ir.Model, text: str) -> None:
    model.meta.setdefault(_NOTES_KEY, []).append(text)


def notes(model: ir.Model) -> list[str]:
    return list(model.meta.get(_NOTES_KEY, []))
