"""The technology-neutral, sans-IO core: phases, events, actions, the state machine.

Nothing in this package performs I/O: no asyncio, sockets, processes or QMP.
"""
