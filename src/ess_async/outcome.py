"""The final outcome of a message, as ``Manager.wait`` reports it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spool import ID_PATTERN

__all__ = ("Outcome", "message_id")


def message_id(message: str | os.PathLike[str]) -> str:
    """The id of a message given by id, file name or path; ValueError if neither (so no
    path can lead outside the spool)."""
    text = os.fspath(message)
    name = Path(text).name.removesuffix(".json")
    if not ID_PATTERN.match(name):
        raise ValueError(f"not a message id or spool path: {text!r}")
    return name


@dataclass(frozen=True)
class Outcome:
    """Where a message ended: ``state`` is passed, failed or corrupt."""

    id: str
    state: str
    path: Path
    attempts: int = 0
    finished_at: float | None = None
    code: int | None = None
    reply: str | None = None
    refused: dict[str, Any] = field(default_factory=dict)
    delivered_to: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.state == "passed"

    @classmethod
    def from_record(cls, state: str, path: Path, record: dict[str, Any]) -> Outcome:
        result = record.get("result") or {}
        return cls(id=record.get("id", path.stem), state=state, path=path,
                   attempts=record.get("attempts", 0), finished_at=record.get("finished_at"),
                   code=result.get("code"), reply=result.get("message"),
                   refused=result.get("refused") or {},
                   delivered_to=record.get("delivered_to") or [])
