"""The ``emu`` platform: an emulated confidential-computing host (issue 3, in progress).

One OS process per VM (the *machine*), controlled over QMP; guest RAM owned
by that process, with SEV's rules enforced (the host sees only AES-XEX
ciphertext of private pages); vCPUs running real x86-64 code in Unicorn with
their state in a VMSA page; the kernel's own dirty logging; a per-host PSP
implementing the SEV API subset migration needs.

Modules (each one job):

- ``dirtylog``   userfaultfd write-protect + PAGEMAP_SCAN dirty logging, with fallback
- ``xex``        batched per-page AES-XEX (the memory controller's encryption)
- ``memory``     guest RAM, private/shared pages, the host's view of them
- ``psp``        the emulated AMD Secure Processor (SEV API 55766 subset)
- ``vmsa``       the VMSA save-area layout
- ``vcpu``       Unicorn vCPU threads
- ``qmp_schema`` the QMP command table and argument checking
- ``qmp_server`` the machine's QMP endpoint
- ``sev_launch`` an SEV/SEV-ES machine's launch through the PSP (QEMU's sev-guest)
- ``sev_qmp``    QEMU's SEV QMP commands (query-sev, sev-inject-launch-secret, ...)
- ``machine``    one VM: RAM, vCPUs, dirty log, behind QMP commands
- ``process``    ``vmmig emu start``: a machine process serving QMP
"""
