"""Source and target agents: the processes that move a VM's state between hosts.

Each agent drives its machine over QMP and talks to its peer over a
:mod:`vmmig.channel`.  ``pages`` is the plain page path (batches of GPAs
and page contents straight from and into guest RAM).
"""
