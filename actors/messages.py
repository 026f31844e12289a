"""Messages between pairlane's actors (the application vocabulary).

Owns: every message that carries application work or admin requests between
actors. Each is a frozen dataclass with documented fields. Bounded: no message
carries more than one chunk (`gateway.max_message_bytes`) of data. Never
holds decoded trade rows (raw msgpack bytes travel; they are decoded once,
where rows are needed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AdminCommand:
    """Admin actor -> the actor that executes `cmd`; reply with AdminReply(token, reply)."""

    token: int
    cmd: str
    args: dict


@dataclass(frozen=True)
class AdminReply:
    """reply is the full admin reply map: {"ok": True, ...} or {"ok": False, "error": ...}."""

    token: int
    reply: dict


@dataclass(frozen=True)
class MetricUpdates:
    """Any actor -> metrics: a batch of ("inc"|"set"|"observe", name, labels, value) tuples."""

    updates: tuple


@dataclass(frozen=True)
class Alert:
    """Any actor -> metrics (which owns the PUB socket): raise or clear a named alert."""

    name: str
    state: str          # "raised" | "cleared"
    severity: str
    reasons: dict = field(default_factory=dict)
