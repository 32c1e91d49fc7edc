"""vmmig: live migration of confidential virtual machines, generic over the technology.

Plugins implement the hooks in :mod:`vmmig.hookspecs` and mark them with
:data:`hookimpl`; third-party plugins register through the ``vmmig``
entry-point group::

    [project.entry-points.vmmig]
    snp = "vmmig_snp.plugin"
"""

from __future__ import annotations

import logging

import pluggy


__all__ = ["PROJECT", "__version__", "hookimpl"]

__version__ = "0.1.0"

#: The pluggy project name, also the entry-point group of third-party plugins.
PROJECT = "vmmig"

#: Marks a plugin function as the implementation of a vmmig hook.
hookimpl = pluggy.HookimplMarker(PROJECT)

logging.getLogger(__name__).addHandler(logging.NullHandler())
