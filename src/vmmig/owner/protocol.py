"""The guest owner's wire protocol: JSON lines, one request and one response each.

Both ends use this module (:mod:`.service` serves, :mod:`.client` calls).
Modelled on QMP so that it reads familiar; each message is one JSON object
on one line of at most :data:`MAX_LINE` bytes (UTF-8, ``\\n``-terminated)::

    S: {"vmmig-owner": {"version": 1, "operations": ["release-secret", "start-launch"]}}
    C: {"execute": "start-launch", "arguments": {"guest": "web-1", "kind": "boot",
        "pdh": B64, "cert-chain": B64, "amd-cert-chain": B64}}  (kind, amd-cert-chain optional)
    S: {"return": {"session": HEX, "policy": 1, "dh-cert": B64, "session-blob": B64}}
    C: {"execute": "release-secret", "arguments": {"guest": "web-1", "session": HEX,
        "measurement": B64, "api-major": 1, "api-minor": 55, "build-id": 21,
        "pdh": B64}}                                                   (pdh optional)
    S: {"return": {"packet-header": B64, "secret": B64}}
    S: {"error": {"class": "AttestationError", "desc": "...",
                  "reason": "measurement-mismatch", "guest": "web-1", "detail": "..."}}
    S: {"error": {"class": "ProtocolError", "desc": "..."}}

``kind`` is a :class:`~vmmig.owner.expected.LaunchKind` value, ``boot`` when
absent.  ``pdh``/``cert-chain`` are ``query-sev-capabilities``' fields; the
``release-secret`` reply holds ``sev-inject-launch-secret``'s arguments.
Error classes: ``AttestationError`` (the owner refused; ``reason`` is a
:class:`~vmmig.owner.errors.Refusal` value), ``ConfigError`` (a bad guest
id), ``ProtocolError`` (not JSON, unknown operation, missing or mistyped
argument, line too long: the server then closes the connection),
``OwnerError`` (the owner's own state is broken).

Confidentiality needs no channel protection: a launch offer is wrapped to a
verified PDH and a secret packet is sealed to one measured VM, so everything
the service returns may pass through the untrusted host.  What an attacker
on the path can do is deny service, which the host can anyway.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Final

from vmmig.errors import VmmigError
from vmmig.owner.errors import AttestationError, Refusal
from vmmig.owner.expected import LaunchKind
from vmmig.owner.guest_owner import LaunchOffer, PlatformCerts
from vmmig.platforms.emu.psp import FirmwareVersion, PlatformChain, Policy, SecretPacket
from vmmig.platforms.emu.psp.store import b64


__all__ = [
    "MAX_LINE",
    "OPERATIONS",
    "PROTOCOL_VERSION",
    "OwnerProtocolError",
    "attestation_error_from_json",
    "certs_from_json",
    "certs_to_json",
    "decode_line",
    "encode_line",
    "error_to_json",
    "firmware_from_json",
    "get_bytes",
    "get_str",
    "kind_from_json",
    "offer_from_json",
    "offer_to_json",
    "packet_from_json",
    "packet_to_json",
]

PROTOCOL_VERSION: Final = 1
#: The operations a server offers.
OPERATIONS: Final = ("release-secret", "start-launch")
#: The longest line either end accepts, newline included: a whole chain is about 4 KiB.
MAX_LINE: Final = 64 * 1024


class OwnerProtocolError(VmmigError):
    """A message broke the protocol (the peer's fault, or a version mismatch)."""


def encode_line(message: dict[str, Any]) -> bytes:
    """One message as one line."""
    line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise OwnerProtocolError(f"a {len(line)}-byte message exceeds {MAX_LINE} bytes")
    return line


def decode_line(line: bytes) -> dict[str, Any]:
    """One line as a message (a JSON object).

    :raises OwnerProtocolError: too long, unterminated, or not a JSON object.
    """
    if len(line) > MAX_LINE or not line.endswith(b"\n"):
        raise OwnerProtocolError(f"a message is one line of at most {MAX_LINE} bytes")
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OwnerProtocolError(f"not JSON: {err}") from None
    if not isinstance(message, dict):
        raise OwnerProtocolError("a message is a JSON object")
    return message


def get_str(arguments: dict[str, Any], name: str) -> str:
    """A string argument; :class:`OwnerProtocolError` if missing or mistyped."""
    value = arguments.get(name)
    if not isinstance(value, str):
        raise OwnerProtocolError(f"argument {name!r} must be a string")
    return value


def get_bytes(arguments: dict[str, Any], name: str) -> bytes:
    """A base64 argument's bytes; :class:`OwnerProtocolError` if missing or not base64."""
    try:
        return base64.b64decode(get_str(arguments, name), validate=True)
    except binascii.Error:
        raise OwnerProtocolError(f"argument {name!r} must be base64") from None


def _int(arguments: dict[str, Any], name: str) -> int:
    value = arguments.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise OwnerProtocolError(f"argument {name!r} must be an integer")
    return value


def certs_to_json(platform: PlatformChain | PlatformCerts) -> dict[str, Any]:
    """A platform's certificates as ``start-launch`` arguments."""
    certs = PlatformCerts.of(platform) if isinstance(platform, PlatformChain) else platform
    fields = {"pdh": b64(certs.pdh), "cert-chain": b64(certs.cert_chain)}
    if certs.amd_certs is not None:
        fields["amd-cert-chain"] = b64(certs.amd_certs)
    return fields


def certs_from_json(arguments: dict[str, Any]) -> PlatformCerts:
    """:func:`certs_to_json`'s inverse."""
    amd = get_bytes(arguments, "amd-cert-chain") if "amd-cert-chain" in arguments else None
    return PlatformCerts(get_bytes(arguments, "pdh"), get_bytes(arguments, "cert-chain"), amd)


def kind_from_json(arguments: dict[str, Any]) -> LaunchKind:
    """``start-launch``'s optional ``kind``; :class:`OwnerProtocolError` if not a kind."""
    if "kind" not in arguments:
        return LaunchKind.BOOT
    try:
        return LaunchKind(get_str(arguments, "kind"))
    except ValueError:
        raise OwnerProtocolError(f"argument 'kind' must be one of "
                                 f"{', '.join(LaunchKind)}") from None


def firmware_from_json(arguments: dict[str, Any]) -> FirmwareVersion:
    """``api-major``, ``api-minor`` and ``build-id`` (``query-sev``'s names)."""
    try:
        return FirmwareVersion(_int(arguments, "api-major"), _int(arguments, "api-minor"),
                               _int(arguments, "build-id"))
    except ValueError as err:
        raise OwnerProtocolError(str(err)) from None


def offer_to_json(offer: LaunchOffer) -> dict[str, Any]:
    """A launch offer as ``start-launch``'s return value."""
    return {"session": offer.session, "policy": offer.policy.value,
            "dh-cert": b64(offer.dh_cert), "session-blob": b64(offer.session_blob)}


def offer_from_json(value: dict[str, Any]) -> LaunchOffer:
    """:func:`offer_to_json`'s inverse."""
    try:
        policy = Policy.from_value(_int(value, "policy"))
    except ValueError as err:
        raise OwnerProtocolError(str(err)) from None
    return LaunchOffer(get_str(value, "session"), policy, get_bytes(value, "dh-cert"),
                       get_bytes(value, "session-blob"))


def packet_to_json(packet: SecretPacket) -> dict[str, Any]:
    """A secret packet as ``sev-inject-launch-secret``'s arguments."""
    return {"packet-header": b64(packet.header), "secret": b64(packet.ciphertext)}


def packet_from_json(value: dict[str, Any]) -> SecretPacket:
    """:func:`packet_to_json`'s inverse."""
    return SecretPacket(get_bytes(value, "packet-header"), get_bytes(value, "secret"))


def error_to_json(err: VmmigError) -> dict[str, Any]:
    """An error reply; an :class:`AttestationError` keeps its reason, guest and detail."""
    error: dict[str, Any] = {"class": type(err).__name__, "desc": str(err)}
    if isinstance(err, AttestationError):
        error.update(reason=err.reason.value, guest=err.guest, detail=err.detail)
    elif isinstance(err, OwnerProtocolError):
        error["class"] = "ProtocolError"
    return {"error": error}


def attestation_error_from_json(error: dict[str, Any]) -> AttestationError:
    """The :class:`AttestationError` an error reply carries.

    :raises OwnerProtocolError: the reply lacks a known reason, the guest or the detail.
    """
    try:
        return AttestationError(Refusal(error.get("reason")), get_str(error, "guest"),
                                get_str(error, "detail"))
    except ValueError:
        raise OwnerProtocolError(f"unknown refusal {error.get('reason')!r}") from None
