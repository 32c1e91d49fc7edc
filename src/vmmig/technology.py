"""What a technology plugin declares about itself (the capability query)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import attrs


__all__ = ["PLATFORMS", "Technology"]

#: The platforms vmmig knows: real QEMU, and the emulated confidential platform.
PLATFORMS = ("qemu", "emu")

_NAME = re.compile(r"^[a-z][a-z0-9-]*$")


def _check_name(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if not _NAME.match(value):
        raise ValueError(f"technology name {value!r} must be lowercase letters, digits, '-'")


def _names(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _feature_set(values: Iterable[str]) -> frozenset[str]:
    return frozenset(values)


@attrs.frozen
class Technology:
    """A migration technology and where it runs.

    :ivar name: what ``--tech`` selects, e.g. ``"sev-es"``.
    :ivar summary: one line for ``vmmig plugins``.
    :ivar platforms: platforms on which its hooks work.
    :ivar features: optional features it supports everywhere (e.g. ``"auto-converge"``).
    :ivar platform_features: more features it supports on one platform only
        (``plain`` has ``multifd`` on ``qemu``, where QEMU provides it).
    :ivar unavailable: if set, why it cannot run yet; selecting it stops
        with this message before any VM is touched.
    """

    name: str = attrs.field(validator=_check_name)
    summary: str
    platforms: tuple[str, ...] = attrs.field(converter=_names)
    features: frozenset[str] = attrs.field(converter=_feature_set, factory=frozenset)
    platform_features: Mapping[str, frozenset[str]] = attrs.field(factory=dict)
    unavailable: str | None = None

    def supports(self, feature: str, platform: str) -> bool:
        """Whether ``feature`` works with this technology on ``platform``."""
        return feature in self.features or feature in self.platform_features.get(platform, ())

    @platforms.validator
    def _check_platforms(self, _attr: attrs.Attribute[tuple[str, ...]],
                         value: tuple[str, ...]) -> None:
        unknown = set(value) - set(PLATFORMS)
        if unknown:
            raise ValueError(f"unknown platforms {sorted(unknown)}; known: {', '.join(PLATFORMS)}")
