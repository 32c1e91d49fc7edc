"""SEV firmware status codes and the one exception every PSP command raises.

The codes are the SEV API's (AMD 55766, chapter 4.4, "Status Codes"); a real
PSP returns them in the command buffer and KVM reports them as ``fw_error``.
Only the codes this emulation can produce are documented with their use; the
others are listed so that a status read from a real PSP maps onto the enum.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TypeVar

from vmmig.errors import VmmigError


__all__ = ["PspError", "PspStatus", "SevCommand", "parse_or_fail"]

_T = TypeVar("_T")


class PspStatus(enum.IntEnum):
    """A firmware status code (SEV API 55766, table "Status Codes")."""

    SUCCESS = 0x00
    #: The platform is not in a state that accepts the command.
    INVALID_PLATFORM_STATE = 0x01
    #: The guest is not in a state that accepts the command (commands out of order).
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    #: A buffer (certificate, session, header, data) has the wrong length or alignment.
    INVALID_LENGTH = 0x04
    ALREADY_OWNED = 0x05
    #: A certificate is malformed, has the wrong usage or does not chain to the ARK.
    INVALID_CERTIFICATE = 0x06
    #: The guest policy forbids the command (NOSEND, NOKS, ES, API version, DOMAIN).
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    #: A guest physical address is not aligned as the command requires.
    INVALID_ADDRESS = 0x09
    #: A certificate signature does not verify.
    BAD_SIGNATURE = 0x0A
    #: An HMAC does not verify (wrapped keys, policy, LAUNCH_SECRET or transport packet).
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DFFLUSH_REQUIRED = 0x0F
    #: No guest context has this handle.
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWERROR_PLATFORM = 0x13
    HWERROR_UNSAFE = 0x14
    #: The emulation does not implement this option (e.g. compressed packets).
    UNSUPPORTED = 0x15
    #: A parameter is out of range (flags, duplicate vCPU index, ...).
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17


class SevCommand(enum.IntEnum):
    """SEV API command identifiers (55766 chapter 4.3; ``include/linux/psp-sev.h``)."""

    PLATFORM_STATUS = 0x04
    PDH_CERT_EXPORT = 0x08
    DECOMMISSION = 0x20
    ACTIVATE = 0x21
    GUEST_STATUS = 0x23
    LAUNCH_START = 0x30
    LAUNCH_UPDATE_DATA = 0x31
    LAUNCH_UPDATE_VMSA = 0x32
    LAUNCH_MEASURE = 0x33
    LAUNCH_SECRET = 0x34
    LAUNCH_FINISH = 0x35
    SEND_START = 0x40
    SEND_UPDATE_DATA = 0x41
    SEND_UPDATE_VMSA = 0x42
    SEND_FINISH = 0x43
    SEND_CANCEL = 0x44
    RECEIVE_START = 0x50
    RECEIVE_UPDATE_DATA = 0x51
    RECEIVE_UPDATE_VMSA = 0x52
    RECEIVE_FINISH = 0x53


class PspError(VmmigError):
    """The emulated PSP refused a command; guest and platform state are unchanged.

    :param status: the firmware status code.
    :param message: what was wrong, naming the offending field.
    :param command: the command that failed; the PSP fills it in when the
        error leaves a command.
    """

    def __init__(
        self, status: PspStatus, message: str, *, command: SevCommand | None = None
    ) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.command = command

    def __str__(self) -> str:
        where = f"{self.command.name}: " if self.command is not None else ""
        return f"{where}{self.status.name} (0x{self.status.value:02x}): {self.message}"


def parse_or_fail(status: PspStatus, what: str, parse: Callable[[], _T]) -> _T:
    """Run a format parser, turning its ValueError into a PspError with ``status``."""
    try:
        return parse()
    except ValueError as err:
        raise PspError(status, f"{what}: {err}") from None
