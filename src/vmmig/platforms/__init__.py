"""Platforms: where the virtual machines of a migration run.

:mod:`vmmig.platforms.qemu` starts and controls real QEMU processes (KVM
when ``/dev/kvm`` works, TCG otherwise) over QMP.
"""
