"""The guest owner: the tenant's trusted key service (DESIGN.md, "Guest owner").

It keeps each guest's migration master secret, checks a VM's launch
measurement against the expected launch, and only then builds the
LAUNCH_SECRET packet that carries the secret (as an OVMF secret table) into
that VM.  The formats are AMD's, so the same code faces a real PSP through
QEMU's ``query-sev-launch-measure`` and ``sev-inject-launch-secret``.

- :mod:`.errors`        :class:`AttestationError` and its :class:`Refusal` reasons
- :mod:`.expected`      the expected launch and the policies the owner accepts
- :mod:`.state`         the state directory: pinned AMD root, expectations, secrets
- :mod:`.audit`         the decision log
- :mod:`.secret_table`  the injected secret's format (OVMF's GUIDed table)
- :mod:`.guest_owner`   :class:`GuestOwner`: ``start_launch``, ``release_secret``
- :mod:`.qmp_driver`    the launch over QMP: ``launch_files``, ``attest_and_inject``
- :mod:`.protocol`      the JSON-lines protocol of the service
- :mod:`.service`       ``vmmig owner serve``
- :mod:`.client`        :class:`OwnerClient`, a remote owner with the same API
- :mod:`.command`       the ``vmmig owner`` command line

In-process is the default; a served owner is reached with
:class:`~vmmig.owner.client.OwnerClient`, which takes the owner's place.
"""

from vmmig.owner.audit import AuditEvent, AuditLog
from vmmig.owner.client import OwnerClient
from vmmig.owner.errors import AttestationError, Refusal
from vmmig.owner.expected import ExpectedLaunch, LaunchKind, expected_launch_for
from vmmig.owner.guest_owner import GuestOwner, LaunchOffer, PlatformCerts
from vmmig.owner.qmp_driver import (
    LaunchFiles,
    OwnerService,
    attest_and_inject,
    launch_files,
    query_platform,
)
from vmmig.owner.secret_table import MIGRATION_SECRET_GUID, parse_secret_table
from vmmig.owner.state import OwnerState, TrustAnchor


__all__ = [
    "MIGRATION_SECRET_GUID",
    "AttestationError",
    "AuditEvent",
    "AuditLog",
    "ExpectedLaunch",
    "GuestOwner",
    "LaunchFiles",
    "LaunchKind",
    "LaunchOffer",
    "OwnerClient",
    "OwnerService",
    "OwnerState",
    "PlatformCerts",
    "Refusal",
    "TrustAnchor",
    "attest_and_inject",
    "expected_launch_for",
    "launch_files",
    "parse_secret_table",
    "query_platform",
]
