"""The emulated AMD Secure Processor (PSP): the SEV API subset migration needs.

Formats and constructions follow AMD's SEV API specification (publication
55766) as implemented by virtee/sev, QEMU and Linux; each module documents
its byte layouts with offsets, since a real PSP is the reference:

- :mod:`.status`        status codes, command ids, :class:`PspError`
- :mod:`.policy`        the guest policy word and what the PSP enforces
- :mod:`.primitives`    HMAC-SHA256, AES-128-CTR, the SP 800-108 KDF
- :mod:`.sev_cert`      SEV certificates (OCA, CEK, PEK, PDH, DH keys)
- :mod:`.amd_cert`      AMD certificates (ARK, ASK)
- :mod:`.chain`         a platform's chain and the owner's verifier
- :mod:`.root`          the emulated AMD root shared by a deployment
- :mod:`.identity`      one host's persisted PSP identity
- :mod:`.session`       the TEK/TIK session (LAUNCH_START, SEND/RECEIVE_START)
- :mod:`.packets`       packet headers, measurement, MAC constructions
- :mod:`.owner`         the guest owner's side of a launch
- :mod:`.guest`         guest states and the machine's memory interfaces
- :mod:`.messages`      typed command buffers
- :mod:`.launch`        LAUNCH_* commands
- :mod:`.send_receive`  SEND_* and RECEIVE_* commands
- :mod:`.cost`          the modelled command cost (assumptions) and pacing
- :mod:`.device`        :class:`Psp`, the command dispatcher

Simplifications relative to the spec: no platform management commands other
than PLATFORM_STATUS and PDH_CERT_EXPORT (the platform is always initialised
and self-owned; no PEK_CSR/PEK_CERT_IMPORT, PDH_GEN, INIT, SHUTDOWN); no
DBG_* commands; no compressed packets; P-384 keys only in SEV certificates;
the SEND/RECEIVE packet MAC input is our own (see :mod:`.packets`).
"""

from vmmig.platforms.emu.psp.chain import ChainError, PdhPublicKey, PlatformChain, verify_chain
from vmmig.platforms.emu.psp.cost import Pacer, PspCostModel
from vmmig.platforms.emu.psp.device import Psp
from vmmig.platforms.emu.psp.guest import (
    GuestMemoryReader,
    GuestMemoryWriter,
    GuestState,
    MemoryKeySlot,
    VmsaReader,
    VmsaWriter,
)
from vmmig.platforms.emu.psp.identity import DEFAULT_FIRMWARE, PlatformIdentity
from vmmig.platforms.emu.psp.messages import (
    GuestStatus,
    LaunchSecretRequest,
    LaunchStartRequest,
    LaunchUpdateDataRequest,
    LaunchUpdateVmsaRequest,
    PdhCertExport,
    PlatformStatus,
    ReceiveStartRequest,
    ReceiveUpdateDataRequest,
    ReceiveUpdateVmsaRequest,
    SendStartRequest,
    SendStartResponse,
    SendUpdateDataRequest,
    SendUpdateVmsaRequest,
    TransportPacket,
)
from vmmig.platforms.emu.psp.owner import (
    LaunchSession,
    SecretPacket,
    build_launch_session,
    build_secret_packet,
    expected_measurement,
    launch_digest,
)
from vmmig.platforms.emu.psp.packets import Measurement
from vmmig.platforms.emu.psp.policy import FirmwareVersion, Policy
from vmmig.platforms.emu.psp.root import EmulatedAmdRoot
from vmmig.platforms.emu.psp.status import PspError, PspStatus, SevCommand


__all__ = [
    "DEFAULT_FIRMWARE",
    "ChainError",
    "EmulatedAmdRoot",
    "FirmwareVersion",
    "GuestMemoryReader",
    "GuestMemoryWriter",
    "GuestState",
    "GuestStatus",
    "LaunchSecretRequest",
    "LaunchSession",
    "LaunchStartRequest",
    "LaunchUpdateDataRequest",
    "LaunchUpdateVmsaRequest",
    "Measurement",
    "MemoryKeySlot",
    "Pacer",
    "PdhCertExport",
    "PdhPublicKey",
    "PlatformChain",
    "PlatformIdentity",
    "PlatformStatus",
    "Policy",
    "Psp",
    "PspCostModel",
    "PspError",
    "PspStatus",
    "ReceiveStartRequest",
    "ReceiveUpdateDataRequest",
    "ReceiveUpdateVmsaRequest",
    "SecretPacket",
    "SendStartRequest",
    "SendStartResponse",
    "SendUpdateDataRequest",
    "SendUpdateVmsaRequest",
    "SevCommand",
    "TransportPacket",
    "VmsaReader",
    "VmsaWriter",
    "build_launch_session",
    "build_secret_packet",
    "expected_measurement",
    "launch_digest",
    "verify_chain",
]
