"""What the owner expects of a guest's launch, and the policies it accepts.

The tenant records an :class:`ExpectedLaunch` per guest before any host
launches it: the launch digest (SHA-256 of every LAUNCH_UPDATE_DATA input
and, for SEV-ES, every initial VMSA, in launch order), the policy the owner
puts into the launch session, and the oldest firmware API it accepts.  The
PSP's MEASURE binds all of them (see :mod:`vmmig.platforms.emu.psp.packets`),
so a host that launches anything else gets no secret.

A migrating guest launches two ways, so it has one expectation of each
:class:`LaunchKind`: its boot (workload and Migration Handler), and the
migration target's launch (the MH firmware only, receiving).  The host names
the kind when it starts a launch; the digest of that kind decides.

Policy choices (:func:`check_policy`), for the Migration Handler design:

- NODBG is required: with debugging allowed the host may DBG_DECRYPT any
  private page, which voids the whole confidentiality argument.
- ES must match the technology: an ``sev-es`` guest without ES would have
  its registers readable by the host, an ``sev`` guest with ES cannot launch.
- NOSEND is allowed and even recommended: the MH moves pages itself, so the
  PSP's SEND path is never needed; NOSEND closes it to a hostile host.
- NOKS, DOMAIN and SEV are allowed either way: they restrict key sharing
  (a mirror-VM helper would need it) and the PSP's SEND path, which the MH
  design does not rely on.
- The firmware must be at least the newer of the policy's API minimum and
  the expectation's ``min_firmware``; checked against the platform's PEK at
  :meth:`~vmmig.owner.GuestOwner.start_launch` and against the measured
  version (the MAC binds it) at :meth:`~vmmig.owner.GuestOwner.release_secret`.
"""

from __future__ import annotations

import enum
from typing import Any, Final

import attrs

from vmmig.owner.errors import AttestationError, Refusal
from vmmig.platforms.emu.psp import FirmwareVersion, Policy, launch_digest


__all__ = ["ANY_FIRMWARE", "OWNER_TECHS", "ExpectedLaunch", "LaunchKind", "check_firmware",
           "check_policy", "expected_launch_for"]

#: The technologies whose launches the owner attests.
OWNER_TECHS: Final = ("sev", "sev-es")
#: No minimum firmware beyond the policy's.
ANY_FIRMWARE: Final = FirmwareVersion(0, 0)


class LaunchKind(enum.StrEnum):
    """Which of a guest's launches an expectation describes; values are wire names."""

    #: The guest's own boot: its workload and the Migration Handler.
    BOOT = "boot"
    #: A migration target's launch (``--incoming --mh-target``): the MH only, to receive.
    MIGRATION_TARGET = "migration-target"


def _digest(instance: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    if len(value) != 32:
        raise ValueError(f"{attribute.name} is a SHA-256 digest (32 bytes), got {len(value)}")


@attrs.frozen
class ExpectedLaunch:
    """One guest's launch as the tenant built it.

    :ivar tech: ``sev`` or ``sev-es``.
    :ivar policy: the policy the owner's launch session carries.
    :ivar digest: the launch digest (image, then SEV-ES VMSAs).
    :ivar min_firmware: the oldest firmware API (major.minor) accepted;
        the build is not compared.
    :ivar kind: which of the guest's launches this is.
    """

    tech: str = attrs.field(validator=attrs.validators.in_(OWNER_TECHS))
    policy: Policy
    digest: bytes = attrs.field(validator=_digest, repr=lambda d: d.hex()[:16])
    min_firmware: FirmwareVersion = ANY_FIRMWARE
    kind: LaunchKind = attrs.field(default=LaunchKind.BOOT,
                                   validator=attrs.validators.instance_of(LaunchKind))

    def to_json(self) -> dict[str, Any]:
        """The JSON object kept in the owner's state directory."""
        return {"tech": self.tech, "policy": self.policy.value, "digest": self.digest.hex(),
                "min-api": [self.min_firmware.api_major, self.min_firmware.api_minor],
                "kind": self.kind.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExpectedLaunch:
        """Read :meth:`to_json`'s object back; without ``kind`` (older files) it is a boot.

        :raises ValueError: a field is missing or malformed.
        """
        try:
            major, minor = data["min-api"]
            return cls(tech=data["tech"], policy=Policy.from_value(data["policy"]),
                       digest=bytes.fromhex(data["digest"]),
                       min_firmware=FirmwareVersion(major, minor),
                       kind=LaunchKind(data.get("kind", LaunchKind.BOOT)))
        except (KeyError, TypeError) as err:
            raise ValueError(f"not an expected launch: {err!r}") from None

    def allows_firmware(self, api_major: int, api_minor: int) -> bool:
        """Whether firmware API ``api_major.api_minor`` meets both minimums."""
        least = (self.min_firmware.api_major, self.min_firmware.api_minor)
        return self.policy.allows_firmware(api_major, api_minor) and \
            (api_major, api_minor) >= least


def check_policy(guest: str, launch: ExpectedLaunch) -> None:
    """Refuse a policy the Migration Handler design cannot keep confidential.

    :raises AttestationError: POLICY_REFUSED, naming the bit.
    """
    word = f"{launch.policy.value:#x}"
    if not launch.policy.nodbg:
        raise AttestationError(Refusal.POLICY_REFUSED, guest, f"policy {word} lacks NODBG "
                               "(bit 0): the host could decrypt guest memory with DBG_DECRYPT")
    if launch.policy.es != (launch.tech == "sev-es"):
        state = "sets" if launch.policy.es else "lacks"
        raise AttestationError(Refusal.POLICY_REFUSED, guest,
                               f"policy {word} {state} ES (bit 2) for an {launch.tech} guest")


def check_firmware(guest: str, launch: ExpectedLaunch, api_major: int, api_minor: int,
                   whose: str) -> None:
    """Refuse firmware older than the expected launch accepts.

    :param whose: what stated the version, e.g. ``"the platform's PEK"``.
    :raises AttestationError: POLICY_REFUSED.
    """
    if not launch.allows_firmware(api_major, api_minor):
        least = max((launch.policy.api_major, launch.policy.api_minor),
                    (launch.min_firmware.api_major, launch.min_firmware.api_minor))
        raise AttestationError(Refusal.POLICY_REFUSED, guest,
                               f"{whose} states firmware API {api_major}.{api_minor}, "
                               f"older than the required {least[0]}.{least[1]}")


def expected_launch_for(tech: str, *, memory: int, vcpus: int, workload: str,
                        policy: Policy | None = None,
                        min_firmware: FirmwareVersion = ANY_FIRMWARE,
                        mh_queues: int = 1, mh_target: bool = False,
                        firmware: bytes | None = None) -> ExpectedLaunch:
    """The expected launch of an emulated machine (``vmmig emu start`` with these options).

    The owner builds the same image in scratch memory, as a real owner
    hashes the OVMF build it hands to the host: the workload, and the
    Migration Handler firmware with its launch configuration (roles, queues,
    mailbox place), so a host that loads another MH gets no secret.

    :param policy: None for ``vmmig emu start``'s default of the technology.
    :param mh_queues: the MH mailbox's queues (``--mh-queues``).
    :param mh_target: an MH migration target's launch (``--incoming --mh-target``):
        the firmware only, and an MH that may only receive; its kind is
        :attr:`LaunchKind.MIGRATION_TARGET`.
    :param firmware: the MH blob; None for the built-in one.
    :raises ConfigError: an unknown workload or bad MH options.
    """
    # The emulated machine (and Unicorn) only when the owner builds an expectation.
    from vmmig.platforms.emu.machine import MachineConfig, launch_chunks_for  # noqa: PLC0415
    from vmmig.platforms.emu.sev_launch import DEFAULT_POLICY  # noqa: PLC0415

    config = MachineConfig(name="owner", memory=memory, vcpus=vcpus, tech=tech,
                           workload=workload, incoming=mh_target, firmware=firmware,
                           mh_queues=mh_queues, mh_target=mh_target)
    return ExpectedLaunch(
        tech=tech,
        policy=Policy.from_value(DEFAULT_POLICY[tech]) if policy is None else policy,
        digest=launch_digest(launch_chunks_for(config)),
        min_firmware=min_firmware,
        kind=LaunchKind.MIGRATION_TARGET if mh_target else LaunchKind.BOOT,
    )
