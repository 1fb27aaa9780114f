"""Serialisation, always in the caller (layer 1).

Values are pickled with protocol 5.  Buffers of at least ``OOB_MIN`` bytes
(numpy arrays, ``pickle.PickleBuffer``) are taken out of band, so the
channel can copy them straight into shared memory; ``bytes``, ``bytearray``
and ``memoryview`` values skip pickle altogether.  Objects the standard
pickler refuses by reference (lambdas, local functions) fall back to
cloudpickle.  Any failure is a :class:`SerializationError` whose
``__cause__`` is the original error, raised before any shared state changes.
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from ._errors import SerializationError

__all__ = ["OOB_MIN", "TAG_BYTEARRAY", "TAG_BYTES", "TAG_PICKLE", "decode", "encode"]

TAG_PICKLE = 0
TAG_BYTES = 1
TAG_BYTEARRAY = 2
OOB_MIN = 64 * 1024

_dumps = pickle.dumps
_loads = pickle.loads


def encode(value: Any) -> tuple[int, Any, list[pickle.PickleBuffer]]:
    """Return ``(tag, payload, out_of_band_buffers)`` for ``value``.

    Never blocks; raises SerializationError.
    """
    t = type(value)
    if t is bytes:
        return TAG_BYTES, value, []
    if t is bytearray or t is memoryview:
        return TAG_BYTEARRAY if t is bytearray else TAG_BYTES, value, []
    bufs: list[pickle.PickleBuffer] = []

    def take(pb: pickle.PickleBuffer) -> bool:
        if pb.raw().nbytes < OOB_MIN:
            return True  # small: in band
        bufs.append(pb)
        return False

    try:
        return TAG_PICKLE, _dumps(value, 5, buffer_callback=take), bufs
    except (pickle.PicklingError, AttributeError) as exc:
        # keep the message only: holding the exception would tie its
        # traceback's frames (and the channel in them) into a cycle
        first = str(exc)
    except Exception as exc:
        raise SerializationError(f"cannot pickle {t.__name__!s} value: {exc}") from exc
    bufs.clear()
    try:
        return TAG_PICKLE, cloudpickle.dumps(value, 5, buffer_callback=take), bufs
    except Exception as exc:
        raise SerializationError(f"cannot pickle {t.__name__!s} value: {first}") from exc


def decode(tag: int, payload: Any, buffers: list[Any] | None = None) -> Any:
    """Rebuild a value from :func:`encode`'s parts.  Raises SerializationError."""
    if tag == TAG_BYTES:
        return bytes(payload) if type(payload) is not bytes else payload
    if tag == TAG_BYTEARRAY:
        return bytearray(payload)
    try:
        return _loads(payload, buffers=buffers)
    except Exception as exc:
        raise SerializationError(f"cannot unpickle value: {exc}") from exc


def dumps(value: Any) -> bytes:
    """Pickle ``value`` in band (for control messages).  Raises SerializationError."""
    try:
        return _dumps(value, 5)
    except (pickle.PicklingError, AttributeError):
        pass
    except Exception as exc:
        raise SerializationError(f"cannot pickle {type(value).__name__} value: {exc}") from exc
    try:
        return cloudpickle.dumps(value, 5)  # type: ignore[no-any-return]
    except Exception as exc:
        raise SerializationError(f"cannot pickle {type(value).__name__} value: {exc}") from exc
