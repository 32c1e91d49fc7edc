"""The exceptions vmmig raises, one root and meaningful subclasses.

::

    Exception
     +-- VmmigError                  every error vmmig raises on purpose
          +-- ConfigError            a bad migration plan or option (exit 2)
          +-- PluginError            a plugin failed to load or is unusable
          +-- UnsupportedError       technology/platform/feature not available
          +-- IllegalTransition      an event the migration state machine refuses
          +-- PlatformError          a VM platform failed (process, QMP, host)
          |    +-- HostRequirementError  QEMU, KVM or a kernel feature missing
          +-- MigrationFailed        the migration did not complete
          |    +-- MigrationCancelled    stopped by the user (Ctrl-C)
          +-- IntegrityError         guest state differs after migration

Each carries its context on attributes; the CLI prints ``str(err)`` as one
line and never a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from vmmig.core.phases import Phase


__all__ = [
    "ConfigError",
    "HostRequirementError",
    "IllegalTransition",
    "IntegrityError",
    "MigrationCancelled",
    "MigrationFailed",
    "PlatformError",
    "PluginError",
    "UnsupportedError",
    "VmmigError",
]


class VmmigError(Exception):
    """Root of every error vmmig raises on purpose."""


class ConfigError(VmmigError):
    """A migration plan or command-line option is invalid.

    :param field: the dotted name of the offending plan field.
    :param problem: what is wrong with it.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class PluginError(VmmigError):
    """A plugin could not be loaded, or breaks the plugin contract."""


class UnsupportedError(VmmigError):
    """The selected technology, platform or feature is not available."""


class IllegalTransition(VmmigError):
    """The state machine refused an event; its state is unchanged."""

    def __init__(self, phase: Phase, event: object) -> None:
        super().__init__(f"event {type(event).__name__} is illegal in phase {phase.value}")
        self.phase = phase
        self.event = event


class PlatformError(VmmigError):
    """A VM platform failed: a process died, QMP refused, the host lacks something."""


class HostRequirementError(PlatformError):
    """The host lacks what the platform needs (a binary, a device, a kernel feature)."""


class MigrationFailed(VmmigError):
    """The migration did not complete; the source was left as the message says."""


class MigrationCancelled(MigrationFailed):
    """The user cancelled the migration (Ctrl-C, SIGTERM); the source keeps running.

    :param signum: the signal that cancelled it.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class IntegrityError(VmmigError):
    """Guest memory or CPU state differs between source and target."""
