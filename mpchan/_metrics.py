"""Program-wide observability: ``mpchan.stats()`` and the metrics endpoint (layer 6).

Data flow of one scrape::

    Prometheus, curl                 server thread ("mpchan-metrics", one per
    ----------------                 Supervisor made with metrics_port)
    GET 127.0.0.1:PORT/metrics ----> request thread: collect()
                                       | every registered source(owner), weakly held:
                                       |   supervisors  -> workers by state
                                       |   pools        -> tasks, queue depth
                                       |   pipelines    -> per-stage queue, chunks
                                       | every channel segment mapped here (_shm)
                                       v
                <----- 200 text ---- render(): exposition format 0.0.4

``stats()`` reads the same things as plain data, for a program to log or
assert on.

Invariants:
    - the registry holds its owners weakly: registering keeps nothing
      alive, and an owner that is collected drops out by itself.
    - a source only reads counters its owner keeps anyway (at most under
      the owner's short lock): a scrape never blocks on work, never starts
      a process and never creates shared memory.  A source that raises is
      skipped; the rest of the scrape goes on.
    - samples of one family with equal labels add up (the workers of
      several supervisors are the program's workers).

Ownership:
    - the Supervisor made with ``metrics_port`` starts its server and
      stops it in ``shutdown``, which joins the server thread and every
      request thread (``MetricsServer.close``): nothing outlives it.
    - a forked child closes the listening sockets it inherited (at fork:
      ``_lifecycle``'s "metrics" hook, registered on the first use of the
      registry or of a server), so a port is free again as soon as its
      server closes.
"""

from __future__ import annotations

import contextlib
import math
import os
import selectors
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from . import _lifecycle, _shm

__all__ = [
    "CONTENT_TYPE",
    "Family",
    "MetricsServer",
    "collect",
    "register",
    "render",
    "stats",
    "unregister",
]

THREAD_NAME = "mpchan-metrics"
HOST = "127.0.0.1"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REQUEST_TIMEOUT_S = 5.0  # a client that stalls longer is dropped (shutdown waits for it)

T = TypeVar("T")
Kind = Literal["gauge", "counter"]


@dataclass(frozen=True)
class Family:
    """One metric family: its name, type, help text and samples (labels, value).

    Counters are named ``..._total``. Never blocks.
    """

    name: str
    kind: Kind
    help: str
    samples: Sequence[tuple[Mapping[str, str], float]]


# ----------------------------------------------------------------------------- registry

_lock = threading.Lock()
_sources: weakref.WeakKeyDictionary[Any, Callable[[Any], Iterable[Family]]] = (
    weakref.WeakKeyDictionary()
)
_hooked = False


def _hook_lifecycle() -> None:
    # On first use of the registry or of a server, before it takes _lock: a
    # forked child must then forget the parent's sources and servers, and
    # renew a lock a thread of the parent may hold.
    global _hooked
    if not _hooked:
        _lifecycle.on_fork_child("metrics", _after_fork_in_child)
        _hooked = True


def register(owner: T, source: Callable[[T], Iterable[Family]]) -> None:
    """Report ``source(owner)`` in every scrape for as long as ``owner`` lives.

    ``owner`` is held weakly; ``source`` must be a plain function (an
    unbound method), since a bound method of ``owner`` would keep it alive.
    Registering the same owner again replaces its source. Never blocks.
    Process safety: any thread.
    """
    if isinstance(source, types.MethodType) and source.__self__ is owner:
        raise TypeError("source must not be a bound method of its owner (it would never be freed)")
    _hook_lifecycle()
    with _lock:
        _sources[owner] = source


def unregister(owner: object) -> None:
    """Stop reporting ``owner`` (nothing happens if it was not registered). Never blocks."""
    _hook_lifecycle()
    with _lock, contextlib.suppress(KeyError, TypeError):
        del _sources[owner]


def collect() -> list[Family]:
    """Every family of every live source, then those of this process's channels.

    Never blocks (beyond the owners' short locks). Process safety: any thread.
    """
    _hook_lifecycle()
    with _lock:
        entries = list(_sources.items())
    families: list[Family] = []
    for owner, source in entries:
        try:
            families.extend(source(owner))
        except Exception:  # a broken source must not break the scrape
            continue
    del entries
    families.extend(_segment_families())
    return families


# ----------------------------------------------------------------------------- channels


def _channel_rows() -> tuple[list[dict[str, Any]], int]:
    """(one dict per channel mapped here, number of contexts mapped here)."""
    channels: list[dict[str, Any]] = []
    contexts = 0
    for seg in _shm.mapped_segments():
        kind = _shm.segment_kind(seg.name)
        if kind == _shm.CONTEXT:
            contexts += 1
            continue
        if kind != _shm.CHANNEL:
            continue
        try:
            row = _shm.core_stats(seg.core)
        except (ValueError, OSError):  # detached meanwhile
            continue
        channels.append({"name": seg.name, **row})
    return channels, contexts


_CHANNEL_FAMILIES: tuple[tuple[str, str, Kind, str], ...] = (
    ("len", "mpchan_channel_length", "gauge", "Messages buffered in the channel"),
    ("capacity", "mpchan_channel_capacity", "gauge", "Buffer size of the channel (0: unbuffered)"),
    ("sent", "mpchan_channel_sent_total", "counter", "Messages sent on the channel"),
    ("received", "mpchan_channel_received_total", "counter", "Messages received from the channel"),
)


def _segment_families() -> list[Family]:
    channels, contexts = _channel_rows()
    fams: list[Family] = []
    for key, name, kind, text in _CHANNEL_FAMILIES:
        samples = [({"channel": c["name"]}, float(c[key])) for c in channels]
        fams.append(Family(name, kind, text, samples))
    fams.append(
        Family(
            "mpchan_contexts",
            "gauge",
            "Cancellable contexts mapped in this process",
            [({}, float(contexts))],
        )
    )
    return fams


def stats() -> dict[str, Any]:
    """A plain-data snapshot of the whole program, as this process sees it.

    ``pid``: this process. ``processes``: the program supervisor's
    ``stats()`` (start method, worker pids and states), or None when no
    supervisor was started. ``channels``: one dict per channel this process
    maps (``name``, ``len``, ``capacity``, ``sent``, ``received``,
    ``blocked_senders``, ``blocked_receivers``, ``closed``). ``contexts``:
    how many cancellable contexts it maps.

    Never blocks (beyond short internal locks) and never starts anything:
    no supervisor, process or shared memory is made to answer.
    Process safety: any thread of any process.
    """
    module = sys.modules.get(__name__.rpartition(".")[0] + "._supervisor")
    current = getattr(module, "current_supervisor", None)
    sup = current() if current is not None else None
    channels, contexts = _channel_rows()
    return {
        "pid": os.getpid(),
        "processes": sup.stats() if sup is not None else None,
        "channels": channels,
        "contexts": contexts,
    }


# ----------------------------------------------------------------------------- text format


def render(families: Iterable[Family]) -> str:
    """The families in the Prometheus text exposition format 0.0.4.

    Families of the same name are merged (the first one's type and help
    win; one of another type is dropped); samples with equal labels add
    up; a family without samples is left out. Never blocks.
    """
    merged: dict[str, tuple[Family, dict[tuple[tuple[str, str], ...], float]]] = {}
    for fam in families:
        entry = merged.get(fam.name)
        if entry is None:
            entry = merged[fam.name] = (fam, {})
        elif entry[0].kind != fam.kind:
            continue
        values = entry[1]
        for labels, value in fam.samples:
            key = tuple(sorted(labels.items()))
            values[key] = values.get(key, 0.0) + float(value)
    lines: list[str] = []
    for name, (fam, values) in merged.items():
        if not values:
            continue
        lines.append(f"# HELP {name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {name} {fam.kind}")
        for key, value in values.items():
            if key:
                text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in key)
                lines.append(f"{name}{{{text}}} {_format_value(value)}")
            else:
                lines.append(f"{name} {_format_value(value)}")
    return "\n".join(lines) + "\n" if lines else ""


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


# ----------------------------------------------------------------------------- HTTP server


def _http_server(port: int) -> Any:
    """A ThreadingHTTPServer on HOST:port answering /metrics (OSError if it
    cannot bind). http.server is imported here, only by a program that asks
    for metrics: importing it costs every program tens of milliseconds."""
    import socketserver
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        server_version = "mpchan-metrics"
        timeout = _REQUEST_TIMEOUT_S

        def do_GET(self) -> None:
            if self.path.partition("?")[0] != "/metrics":
                self.send_error(404, "Not Found", "metrics are served at /metrics")
                return
            try:
                body = render(collect()).encode("utf-8")
            except Exception as exc:  # a bug: tell the scraper rather than drop it
                self.send_error(500, "Internal Server Error", f"{type(exc).__name__}: {exc}")
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes are routine: nothing on the program's stderr

    class Server(ThreadingHTTPServer):
        # server_close() joins every request thread (block_on_close); they are
        # daemons only so that a stalled client can never hold up interpreter exit.
        daemon_threads = True
        block_on_close = True
        timeout = 1.0  # handle_request's own wait, after the selector said "ready"

        def server_bind(self) -> None:
            # HTTPServer.server_bind looks up the host's FQDN (a DNS query that
            # can take seconds); the name is only used in error pages.
            socketserver.TCPServer.server_bind(self)
            self.server_name = HOST
            self.server_port = int(self.socket.getsockname()[1])

    return Server((HOST, port), Handler)


class MetricsServer:
    """Serves ``render(collect())`` at ``http://127.0.0.1:PORT/metrics``.

    ``port`` 0 picks a free port (see :attr:`address`). Raises ValueError
    for a port outside 0..65535 and OSError (naming the address) when the
    port cannot be bound; nothing is left running then.

    Process safety: any thread of the process that made it; ``close`` from
    any thread but the server's own.
    """

    def __init__(self, port: int) -> None:
        if isinstance(port, bool) or not isinstance(port, int):
            raise TypeError(f"metrics_port must be an int, not {type(port).__name__}")
        if not 0 <= port <= 65535:
            raise ValueError(f"metrics_port must be a port number from 0 to 65535, not {port}")
        _hook_lifecycle()  # before the socket exists: a forked child closes it
        try:
            self._httpd = _http_server(port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise OSError(exc.errno, f"cannot serve metrics on {HOST}:{port}: {reason}") from None
        self._port = self._httpd.server_port
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=THREAD_NAME, daemon=True)
        self._thread.start()
        _live_servers.add(self)

    @property
    def address(self) -> tuple[str, int]:
        """``("127.0.0.1", bound port)``. Never blocks."""
        return (HOST, self._port)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` began. Never blocks."""
        return self._closed

    def _serve(self) -> None:
        # One wait over the listening socket and the wake pipe, so close()
        # takes effect at once (serve_forever would poll every half second).
        with selectors.DefaultSelector() as sel:
            sel.register(self._httpd.socket, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                events = sel.select()
                if any(key.fileobj == self._wake_r for key, _ in events):
                    return
                with contextlib.suppress(OSError):
                    self._httpd.handle_request()  # accept; a thread answers it

    def close(self) -> None:
        """Stop serving; return once the server thread and every request
        thread have ended and the port is released. Idempotent.

        Blocks: until requests in progress are answered (a stalled client
        for at most 5 s). Cancellation: none.
        Process safety: any thread but a request thread of this server.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")
        self._thread.join()
        self._httpd.server_close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        _live_servers.discard(self)

    def _forget_after_fork(self) -> None:
        # In a forked child: no thread serves here; release the inherited
        # listening socket and pipe, or the port would stay bound after the
        # parent's server closed.
        self._closed = True
        with contextlib.suppress(OSError):
            self._httpd.socket.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


_live_servers: weakref.WeakSet[MetricsServer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child starts with no sources: the parent's pools and pipelines
    # are not its own.
    global _lock, _sources
    _lock = threading.Lock()
    _sources = weakref.WeakKeyDictionary()
    for server in list(_live_servers):
        server._forget_after_fork()
    _live_servers.clear()
