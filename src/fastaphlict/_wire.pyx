# cython: language_level=3
"""Frames and picows: building a server text frame, and the picows guard.

* :func:`build_frame` turns a payload into one unmasked server text frame. The
  publisher builds it once and the very same bytes go to every target.
* :func:`check_picows_version` runs at import: the fan-out modules read
  picows' ``WSTransport`` struct directly (the helpers in ``_wire.pxd``), so
  they must run against the picows they were compiled against.

.. DANGER::
   A frame is shared by every target of a publish and by the history. It is an
   immutable ``bytes`` object so no writer can alter what another one sends.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memcpy
from picows import __version__ as _picows_installed

__all__ = ["PICOWS_VERSION", "build_frame", "check_picows_version"]

#: The picows this module was compiled against (setup.py bakes it in).
PICOWS_VERSION = PICOWS_BUILD_VERSION


def check_picows_version(str installed, str built=PICOWS_VERSION):
    """Refuse to run against another picows than the one compiled against.

    The fan-out modules read picows' ``WSTransport`` struct directly: with
    another picows the layout may differ and a write would corrupt memory
    instead of failing. (A changed struct size is caught earlier by Cython's
    own import check; a reshuffled one only here.)
    """
    if installed != built:
        raise ImportError(
            f"fastaphlict._fanout was built against picows {built} but picows "
            f"{installed} is installed: reinstall fastaphlict so it is compiled "
            f"against picows {installed} (pip install --force-reinstall fastaphlict; "
            f"in a checkout, python setup.py build_ext --inplace), or install "
            f"picows=={built}"
        )


check_picows_version(_picows_installed)


def build_frame(bytes payload not None):
    """Return ``payload`` as one final, unmasked WebSocket text frame (RFC 6455 §5.2).

    Server-to-client frames are never masked, so the frame is the same for
    every socket: build it once per message.
    """
    cdef Py_ssize_t size = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t header
    if size < 126:
        header = 2
    elif size < 65536:
        header = 4
    else:
        header = 10
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, header + size)
    cdef uint8_t* out = <uint8_t*>PyBytes_AS_STRING(frame)
    cdef uint64_t n = <uint64_t>size
    cdef int i
    out[0] = 0x81  # FIN + opcode 1 (text)
    if header == 2:
        out[1] = <uint8_t>size
    elif header == 4:
        out[1] = 126
        out[2] = <uint8_t>(n >> 8)
        out[3] = <uint8_t>(n & 0xFF)
    else:
        out[1] = 127
        for i in range(8):
            out[2 + i] = <uint8_t>((n >> (8 * (7 - i))) & 0xFF)
    memcpy(out + header, PyBytes_AS_STRING(payload), size)
    return frame
