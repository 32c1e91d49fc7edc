"""The owner's decision log: one frozen event per grant or refusal.

A tenant must be able to say afterwards which platform got a launch session
for which guest and which VM received the secret, and why anything was
refused.  Each decision is appended to ``audit.jsonl`` in the owner's state
directory (one JSON object per line, mode 0600) as it is made, and kept in
memory for the owner's lifetime.  Secrets and keys never appear in it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import attrs

from vmmig.owner.errors import Refusal


__all__ = ["AuditEvent", "AuditLog"]


@attrs.frozen
class AuditEvent:
    """One decision of the owner.

    :ivar action: ``start-launch``, ``release-secret`` or ``expect``.
    :ivar guest: the guest it concerned.
    :ivar granted: whether the owner said yes.
    :ivar session: the launch session's handle, when there was one.
    :ivar reason: why it refused (None when granted).
    :ivar detail: one line: the platform's PDH digest, the refusal's text...
    :ivar time: wall-clock seconds since the epoch.
    """

    action: str
    guest: str
    granted: bool
    session: str | None = None
    reason: Refusal | None = None
    detail: str = ""
    time: float = attrs.field(factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """The event as one line of ``audit.jsonl``."""
        return {"time": round(self.time, 3), "action": self.action, "guest": self.guest,
                "granted": self.granted, "session": self.session,
                "reason": None if self.reason is None else self.reason.value,
                "detail": self.detail}


class AuditLog:
    """Appends events to ``path`` (None: memory only) and keeps them in :attr:`events`."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.events: list[AuditEvent] = []

    def record(self, event: AuditEvent) -> AuditEvent:
        """Keep ``event`` and append it to the file, flushed before the decision takes effect."""
        self.events.append(event)
        if self.path is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as out:
                out.write(json.dumps(event.to_json(), sort_keys=True) + "\n")
        return event
