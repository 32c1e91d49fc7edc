"""The channel between a source and a target agent: framed, counted, over TCP or Unix.

``frames`` is the sans-IO wire format; ``stream`` moves frames over a
connected socket without copying page data (``sendmsg`` of memoryviews,
``recv_into`` a reusable or caller-given buffer).
"""

from vmmig.channel.frames import FRAME_HEADER, FrameHeader, FrameKind
from vmmig.channel.stream import Channel, connect, listen


__all__ = ["FRAME_HEADER", "Channel", "FrameHeader", "FrameKind", "connect", "listen"]
