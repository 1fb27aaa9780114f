"""Observability: ``mpchan.stats()``, the metrics registry and text format, and
the Prometheus endpoint a Supervisor serves with ``metrics_port``."""

from __future__ import annotations

import gc
import re
import socket
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import cloudpickle
import pytest

import mpchan
from mpchan import _metrics, _supervisor

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x: int) -> int:
    return x * x


def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


# --------------------------------------------------------------------------- helpers

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_exposition(text: str) -> tuple[dict[str, str], Samples]:
    """Parse (and check) Prometheus text format 0.0.4: (type by family, samples).

    Fails the test on a line that is not valid, a sample before its family's
    TYPE line, a family described twice, or a sample repeated.
    """
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: Samples = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"HELP twice for {name}"
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _h, _t, name, kind = line.split(" ")
            assert name not in types, f"TYPE twice for {name}"
            assert kind in ("counter", "gauge"), line
            types[name] = kind
            continue
        assert not line.startswith("#"), line
        m = _SAMPLE.match(line)
        assert m is not None, f"not a sample line: {line!r}"
        name = m["name"]
        assert name in types, f"sample before its TYPE line: {line!r}"
        labels: list[tuple[str, str]] = []
        if m["labels"]:
            raw = m["labels"]
            pos = 0
            while pos < len(raw):
                lm = _LABEL.match(raw, pos)
                assert lm is not None, f"bad labels in {line!r}"
                labels.append((lm[1], lm[2]))
                pos = lm.end()
        key = (name, tuple(sorted(labels)))
        assert key not in samples, f"sample repeated: {line!r}"
        samples[key] = float(m["value"])
    assert set(types) == helps
    return types, samples


def scrape(sup: _supervisor.Supervisor) -> str:
    address = sup.metrics_address
    assert address is not None
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body: bytes = resp.read()
    return body.decode("utf-8")


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def with_label(samples: Samples, name: str, key: str, val: str) -> list[float]:
    return [v for (n, labels), v in samples.items() if n == name and (key, val) in labels]


# --------------------------------------------------------------------------- mpchan.stats()


def test_stats_lists_channels_and_contexts_and_starts_nothing() -> None:
    previous = _supervisor.set_supervisor(None)
    try:
        ch = mpchan.Channel(3)
        ch.send("a")
        ch.send("b")
        assert ch.recv() == "a"
        ctx, cancel = mpchan.with_cancel(mpchan.background())
        wg = mpchan.WaitGroup()
        gc.collect()  # earlier tests' garbage must not be counted away below
        snap = mpchan.stats()
        # asking made no supervisor (so no process either)
        assert _supervisor._default is None
        assert snap["processes"] is None
        mine = [c for c in snap["channels"] if c["name"] == ch._name]
        assert mine == [
            {
                "name": ch._name,
                "len": 1,
                "capacity": 3,
                "sent": 2,
                "received": 1,
                "blocked_senders": 0,
                "blocked_receivers": 0,
                "closed": False,
            }
        ]
        # contexts and wait groups are segments too, but not channels
        names = {c["name"] for c in snap["channels"]}
        assert wg._seg.name not in names
        assert snap["contexts"] >= 1
        cancel()
        del ctx, cancel, wg
        gc.collect()
        assert mpchan.stats()["contexts"] == snap["contexts"] - 1
        assert "stats" in mpchan.__all__
    finally:
        _supervisor.set_supervisor(previous)


def test_stats_reports_the_program_supervisor(
    make_sup: Callable[..., _supervisor.Supervisor],
) -> None:
    sup = make_sup()
    h = mpchan.go(square, 7)
    assert h.result(timeout=30) == 49
    snap = mpchan.stats()
    assert snap["processes"] is not None
    assert snap["processes"]["start_method"] == sup.start_method
    assert h.pid in {w["pid"] for w in snap["processes"]["workers"]}


# --------------------------------------------------------------------------- text format


def test_render_merges_families_sums_equal_labels_and_escapes() -> None:
    fams = [
        _metrics.Family("m_total", "counter", "help with \\ and\nnewline", [({"a": "1"}, 2)]),
        _metrics.Family("m_total", "counter", "ignored", [({"a": "1"}, 3), ({"a": "2"}, 1.5)]),
        _metrics.Family("m_total", "gauge", "wrong type: dropped", [({"a": "1"}, 100)]),
        _metrics.Family("g", "gauge", "odd label", [({"v": 'x"y\\z\nw'}, float("nan"))]),
        _metrics.Family("empty", "gauge", "no samples: left out", []),
        _metrics.Family("plain", "gauge", "no labels", [({}, float("inf"))]),
    ]
    text = _metrics.render(fams)
    assert text.splitlines() == [
        "# HELP m_total help with \\\\ and\\nnewline",
        "# TYPE m_total counter",
        'm_total{a="1"} 5',
        'm_total{a="2"} 1.5',
        "# HELP g odd label",
        "# TYPE g gauge",
        'g{v="x\\"y\\\\z\\nw"} NaN',
        "# HELP plain no labels",
        "# TYPE plain gauge",
        "plain +Inf",
    ]
    types, samples = parse_exposition(text)
    assert types == {"m_total": "counter", "g": "gauge", "plain": "gauge"}
    assert value(samples, "m_total", a="1") == 5


class _Owner:
    def families(self) -> list[_metrics.Family]:
        return []


def _good_source(owner: _Owner) -> list[_metrics.Family]:
    return [_metrics.Family("test_owner_metric", "gauge", "a test source", [({}, 42)])]


def _bad_source(owner: _Owner) -> list[_metrics.Family]:
    raise RuntimeError("broken source")


def test_sources_are_weak_and_a_raising_one_is_skipped() -> None:
    good, bad = _Owner(), _Owner()
    _metrics.register(good, _good_source)
    _metrics.register(bad, _bad_source)
    try:
        _types, samples = parse_exposition(_metrics.render(_metrics.collect()))
        assert value(samples, "test_owner_metric") == 42
        bound: Any = good.families
        with pytest.raises(TypeError, match="bound method"):
            _metrics.register(good, bound)  # it would keep its owner alive for ever
        del bound
        del good
        gc.collect()
        _types, samples = parse_exposition(_metrics.render(_metrics.collect()))
        assert ("test_owner_metric", ()) not in samples
    finally:
        _metrics.unregister(bad)


# --------------------------------------------------------------------------- the endpoint


def test_supervisor_serves_metrics_of_workers_pools_and_channels(
    make_sup: Callable[..., _supervisor.Supervisor],
) -> None:
    sup = make_sup(metrics_port=0)
    address = sup.metrics_address
    assert address is not None and address[0] == "127.0.0.1" and address[1] > 0
    server_threads = [t for t in threading.enumerate() if t.name == _metrics.THREAD_NAME]
    assert len(server_threads) == 1

    h = mpchan.go(square, 5)
    assert h.result(timeout=30) == 25
    ch = mpchan.Channel(8)
    for i in range(3):
        ch.send(i)
    with mpchan.Pool(2) as pool:
        assert list(pool.map(square, range(40))) == [x * x for x in range(40)]
        assert pool.submit(boom, 1).exception(timeout=30) is not None
        types, samples = parse_exposition(scrape(sup))
        st = pool.stats()
        pool_id = pool._metrics_id

    # workers by state: the pool's two workers are busy (running its loop)
    assert types["mpchan_workers"] == "gauge"
    assert value(samples, "mpchan_workers", state="busy") >= 2
    assert {labels[0][1] for (n, labels) in samples if n == "mpchan_workers"} == {
        "held",
        "busy",
        "idle",
        "retiring",
        "lost",
    }
    # the pool: every task submitted was answered, one of them failed
    assert types["mpchan_pool_tasks_submitted_total"] == "counter"
    submitted = value(samples, "mpchan_pool_tasks_submitted_total", pool=pool_id)
    completed = value(samples, "mpchan_pool_tasks_completed_total", pool=pool_id)
    failed = value(samples, "mpchan_pool_tasks_failed_total", pool=pool_id)
    assert submitted == st["submitted"] >= 2
    assert failed == st["failed"] == 1
    assert completed == submitted - 1
    assert value(samples, "mpchan_pool_queue_depth", pool=pool_id) == 0
    assert value(samples, "mpchan_pool_workers", pool=pool_id) == 2
    # the channel made here
    assert value(samples, "mpchan_channel_length", channel=ch._name) == 3
    assert value(samples, "mpchan_channel_capacity", channel=ch._name) == 8
    assert value(samples, "mpchan_channel_sent_total", channel=ch._name) == 3
    assert value(samples, "mpchan_channel_received_total", channel=ch._name) == 0
    assert types["mpchan_channel_sent_total"] == "counter"

    # anything but /metrics is not found
    host, port = address
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{host}:{port}/", timeout=10)
    assert info.value.code == 404
    info.value.close()
    del info  # its traceback holds this frame, and so the channel

    sup.shutdown(timeout=2)
    assert sup.metrics_address is None
    for t in server_threads:
        assert not t.is_alive()
    assert not [t for t in threading.enumerate() if t.name == _metrics.THREAD_NAME]
    with pytest.raises(OSError):  # the port is closed
        socket.create_connection((host, port), timeout=2).close()


def test_stream_stages_are_reported_while_it_runs(
    make_sup: Callable[..., _supervisor.Supervisor],
) -> None:
    sup = make_sup(metrics_port=0)
    seen: dict[str, Samples] = {}

    def source() -> Iterator[int]:
        yield from range(20)
        seen["mid"] = parse_exposition(scrape(sup))[1]  # the feeder thread, mid-run
        yield from range(20, 40)

    s = mpchan.stream(source(), chunksize=1).map(square, workers=2).map(square)
    assert sorted(s.collect()) == sorted(x**4 for x in range(40))
    mid = seen["mid"]
    stream_ids = {
        dict(labels)["stream"] for (n, labels) in mid if n.startswith("mpchan_stream_stage_")
    }
    assert len(stream_ids) == 1
    (sid,) = stream_ids
    name = "mpchan_stream_stage_chunks_received_total"
    got = value(mid, name, stream=sid, stage="0", fn="map(square)")
    assert 0 <= got <= 20
    assert value(mid, "mpchan_stream_stage_queue_capacity", stream=sid, stage="1", fn="map(square)")
    # once the run is over, the pipeline is no longer reported
    _types, after = parse_exposition(scrape(sup))
    assert not with_label(after, name, "stream", sid)


def test_bad_metrics_ports_raise_clear_errors(
    make_sup: Callable[..., _supervisor.Supervisor],
) -> None:
    with pytest.raises(ValueError, match="0 to 65535"):
        make_sup(metrics_port=70000)
    with pytest.raises(ValueError, match="0 to 65535"):
        make_sup(metrics_port=-1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            make_sup(metrics_port=port)
    assert not [t for t in threading.enumerate() if t.name == _metrics.THREAD_NAME]
