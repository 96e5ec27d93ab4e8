# cython: language_level=3
"""Fan-out: the PHID index of one instance, matching, framing and writing.

This is the public face of the compiled fan-out: the rest of the server
imports its names from here. The work is done in four compiled modules that
share their C-level declarations through ``.pxd`` files, so a call from one
to another stays a C call:

* ``_wire``: :func:`build_frame`, the picows version guard, and the inline
  helpers that write a frame through picows' transport.
* ``_outbox``: :class:`Outbox`, the frames of one loop iteration, one write
  per socket when it ends.
* ``_subscriber``: :class:`Subscriber`, one socket: its PHIDs, its writes,
  its paced replays.
* ``_channel``: :class:`Channel`, the PHID index: matching and publishing.

Read each module's docstring for its part of the story.
"""

cimport cython

from fastaphlict._wire import PICOWS_VERSION, build_frame, check_picows_version
from fastaphlict._outbox import Outbox
from fastaphlict._subscriber import Subscriber
from fastaphlict._channel import Channel

__all__ = [
    "COMPILED",
    "PICOWS_VERSION",
    "Channel",
    "Outbox",
    "Subscriber",
    "build_frame",
    "check_picows_version",
]

#: True in the compiled module; tests assert it so a broken build can't hide.
COMPILED = cython.compiled
