"""Bad input: the codec round-trips every valid message and rejects every malformed
one with ProtocolError (property-based), and a live broker fed thousands of
malformed frame lists on both ROUTER ports answers each with an ERROR and keeps
serving."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dsage.protocol import (
    CLIENT_REQUESTS, MONITOR_REQUESTS, SCHEMAS, VERSION, FINAL, Encoding, ErrorItem, JobSpec, Kind,
    M, Message, MonitorInfo, ProtocolError, Record, ResultFrom, ResultSpec, RunSpec, Status,
    WorkerInfo, decode, encode, is_job_id, new_job_id,
)

from .conftest import Procs, done, raw_dealer as _dealer, wait_for

ALL = frozenset(M)
Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"

# --- strategies for valid values, by field name (with per-schema overrides below)

job_id = st.text("0123456789abcdef", min_size=32, max_size=32)
z85_key = st.text(Z85, min_size=40, max_size=40)
short = st.text(max_size=40)
text = st.text(max_size=200)
finite = st.floats(allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-9, max_value=1e12)
nonneg = st.integers(min_value=0, max_value=2**53)
pos_int = st.integers(min_value=1, max_value=2**53)
tags = st.lists(short, max_size=5)
ids = st.lists(job_id, max_size=5)
sha256 = st.text("0123456789abcdef", min_size=64, max_size=64)


def _enum(e: Any) -> st.SearchStrategy[str]:
    return st.sampled_from([x.value for x in e])


FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "req": nonneg, "id": job_id, "name": st.none() | short, "kind": _enum(Kind),
    "timeout": st.none() | positive, "priority": st.integers(0, 9),
    "memory": st.none() | pos_int, "anonymous_ok": st.booleans(), "requires": tags,
    "isolate": st.booleans(), "retries": st.integers(0, 100), "retry_on": tags,
    "attempt": pos_int, "retry": st.booleans(), "attempts": st.lists(pos_int, max_size=5),
    "queued_only": st.booleans(), "shared": st.lists(sha256, max_size=3),
    "missing_blobs": st.lists(sha256, max_size=3),
    "owner": z85_key, "trusted": st.booleans(), "error": st.none() | text,
    "encoding": _enum(Encoding), "result_from": _enum(ResultFrom), "sealed": st.booleans(),
    "started": st.none() | finite, "finished": finite, "created": finite, "failures": nonneg,
    "host": short, "anonymous": st.booleans(), "key": z85_key,
    "pid": st.integers(-2**31, 2**31), "slots": pos_int, "busy": nonneg, "tags": tags,
    "ids": ids, "acked": ids, "missing": ids, "code": short, "message": text, "client": short,
    "version": short, "epoch": short, "heartbeat": positive, "max_message_size": pos_int,
    "monitor": short, "running": ids, "liveness": pos_int, "cancel": ids, "prefetch": nonneg,
    "reason": short,
    "seq": nonneg, "count_failure": st.booleans(), "more": st.booleans(),
    "staged": st.booleans(), "next": nonneg, "gone": st.booleans(), "quiet": finite,
    "uptime": finite, "queued": nonneg, "processing": nonneg, "count": nonneg, "after": nonneg,
    "limit": st.integers(1, 10_000), "since": st.none() | finite, "before": st.none() | finite,
    "jobs": st.fixed_dictionaries({s.value: nonneg for s in Status}),
    "part": st.sampled_from(["result", "output"]), "offset": nonneg, "total": nonneg,
}


def _fixed(typed: Any, **override: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid values of the TypedDict ``typed``."""
    return st.fixed_dictionaries({k: override[k] if k in override else FIELDS[k]
                                  for k in typed.__annotations__})


worker_info = _fixed(WorkerInfo, id=short)
ITEMS: dict[int, st.SearchStrategy[Any]] = {
    id(JobSpec): _fixed(JobSpec),
    id(RunSpec): _fixed(RunSpec),
    id(ResultSpec): _fixed(ResultSpec, status=st.sampled_from(sorted(s.value for s in FINAL))),
    id(Record): _fixed(Record, status=_enum(Status), finished=st.none() | finite,
                       worker=st.none() | worker_info, reason=st.none() | short, by_ref=st.booleans()),
}
HEADER_OVERRIDES: dict[M, dict[str, st.SearchStrategy[Any]]] = {
    M.LIST: {"status": st.none() | _enum(Status)},
    M.JOBS: {"next": st.none() | nonneg},
    M.ERROR: {"req": st.none() | nonneg},
    M.ACK: {"errors": st.lists(_fixed(ErrorItem), max_size=3)},
    M.WORKER_LIST: {"workers": st.lists(_fixed(MonitorInfo, id=short, key=st.none() | z85_key),
                                        max_size=3)},
    M.STATE: {"workers": st.lists(_fixed(MonitorInfo, id=short, key=st.none() | z85_key),
                                  max_size=3)},
}
blob = st.binary(max_size=64)


@st.composite
def valid_messages(draw: st.DrawFn, types: tuple[M, ...] = tuple(M),
                   max_items: int = 4) -> Message:
    """Any well-formed message of one of ``types`` (batches of at most ``max_items``)."""
    type_ = draw(st.sampled_from(types))
    schema = SCHEMAS[type_]
    overrides = HEADER_OVERRIDES.get(type_, {})
    header = draw(st.fixed_dictionaries({
        k: overrides[k] if k in overrides else FIELDS[k] for k in schema.fields if k != schema.items}))
    if schema.items is None:
        blobs = draw(st.lists(blob, min_size=schema.blobs, max_size=schema.blobs))
    else:
        items = draw(st.lists(ITEMS[id(schema.item_type)], max_size=max_items))
        header[schema.items] = items
        n = schema.blobs_per_item * len(items)
        blobs = draw(st.lists(blob, min_size=n, max_size=n))
    if schema.shared is not None:  # one trailing blob per shared hash
        n = len(header[schema.shared])
        blobs += draw(st.lists(blob, min_size=n, max_size=n))
    return Message(type_, header, blobs)


@given(valid_messages())
@settings(max_examples=500, deadline=None)
def test_every_valid_message_round_trips(msg: Message) -> None:
    frames = encode(msg)
    again = decode(frames, ALL)
    assert (again.type, again.header, again.blobs) == (msg.type, msg.header, msg.blobs)
    assert encode(again) == frames


# --- malformed messages: each mutation of a valid message is an error


NOT_VALID_ANYWHERE = {"bogus": [None]}  # no validator accepts this value


def required_keys(header_type: Any) -> list[str]:
    """The keys a header type requires, as the decoder sees them. (Not
    ``__required_keys__``: on Python 3.11 it also lists ``NotRequired`` keys when the
    annotations are strings, as they are in dsage.protocol.)"""
    return sorted(f.name for f in msgspec.inspect.type_info(header_type).fields if f.required)


def test_a_header_type_requires_what_the_decoder_requires() -> None:
    """REGISTERED's ``prefetch`` is optional (a broker of an earlier version sends
    none), so a message missing it is not malformed."""
    assert required_keys(SCHEMAS[M.REGISTERED].header) == ["cancel", "heartbeat", "liveness"]
    frames = [VERSION, b"registered", b'{"heartbeat": 1.0, "liveness": 1, "cancel": []}']
    assert decode(frames, ALL).header == {"heartbeat": 1.0, "liveness": 1, "cancel": []}


@st.composite
def malformed(draw: st.DrawFn, allowed: frozenset[M] = ALL,
              max_items: int = 4) -> tuple[list[bytes], str]:
    """Frames of a message that is wrong in one way, and the ProtocolError code it earns."""
    msg = draw(valid_messages(tuple(allowed), max_items))
    frames = encode(msg)
    header = dict(msg.header)
    how = draw(st.sampled_from([
        "version", "type", "not_allowed", "not_json", "not_object", "nan", "missing_key",
        "bad_value", "blob_added", "blob_removed", "too_few_frames",
    ]))
    if how == "version":
        frames[0] = draw(st.binary(max_size=8).filter(lambda b: b != VERSION))
        return frames, "version"
    if how == "type":
        known = {m.value.encode() for m in M}
        frames[1] = draw(st.binary(max_size=16).filter(lambda b: b not in known))
        return frames, "type"
    if how == "not_allowed":
        others = [m for m in M if m not in allowed]
        if not others:
            frames[1] = b"no-such-type"
        else:
            frames[1] = draw(st.sampled_from(others)).value.encode()
        return frames, "type"
    if how == "not_json":
        frames[2] = draw(st.binary(min_size=1, max_size=40).filter(_not_json))
        return frames, "header"
    if how == "not_object":
        frames[2] = json.dumps(draw(st.lists(st.integers()) | st.integers() | st.text())).encode()
        return frames, "header"
    if how == "nan":
        frames[2] = b'{"req": NaN}'
        return frames, "header"
    if how == "missing_key":
        required = [k for k in required_keys(SCHEMAS[msg.type].header) if k in header]
        assume(required)
        del header[draw(st.sampled_from(required))]
        frames[2] = json.dumps(header).encode()
        return frames, "header"
    if how == "bad_value":
        assume(header)
        header[draw(st.sampled_from(sorted(header)))] = NOT_VALID_ANYWHERE
        frames[2] = json.dumps(header).encode()
        return frames, "header"
    if how == "blob_added":
        return [*frames, draw(blob)], "frames"
    if how == "blob_removed":
        assume(len(frames) > 3)
        return frames[:-1], "frames"
    return frames[:draw(st.integers(0, 2))], "frames"


@given(valid_messages(), st.text(min_size=1, max_size=10))
@settings(max_examples=200, deadline=None)
def test_a_key_the_header_type_does_not_name_is_dropped(msg: Message, key: str) -> None:
    """A newer peer may add optional keys; they never reach the code that reads the
    header."""
    assume(key not in msg.header)
    frames = encode(msg)
    frames[2] = json.dumps({**msg.header, key: {"anything": [1, 2]}}).encode()
    assert decode(frames, ALL).header == msg.header


@pytest.mark.parametrize("enum_type, literal", [
    (Kind, "KindName"), (Status, "StatusName"), (Encoding, "EncodingName"),
    (ResultFrom, "ResultFromName"),
])
def test_header_types_accept_exactly_the_enums_values(enum_type: Any, literal: str) -> None:
    import typing

    import dsage.protocol as protocol

    assert set(typing.get_args(getattr(protocol, literal))) == {e.value for e in enum_type}
    assert set(typing.get_args(protocol.FinalStatusName)) == {s.value for s in FINAL}


def _not_json(b: bytes) -> bool:
    try:
        json.loads(b)
    except ValueError:
        return True
    return False


@given(malformed())
@settings(max_examples=700, deadline=None)
def test_every_malformed_message_is_a_protocol_error(case: tuple[list[bytes], str]) -> None:
    frames, code = case
    with pytest.raises(ProtocolError) as e:
        decode(frames, ALL)
    assert e.value.code == code


@given(st.lists(st.binary(max_size=64), max_size=8))
@settings(max_examples=300, deadline=None)
def test_garbage_is_a_protocol_error_never_another_exception(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode(frames, ALL)


@pytest.mark.parametrize("header", [
    b"[" * 100_000 + b"]" * 100_000,  # deep nesting
    b'{"req": Infinity}',
    b'{"req": 1, "req": -1}',  # a duplicate key: the last wins, and -1 is not allowed
    b"\xff\xfe",
], ids=["deep-nesting", "infinity", "duplicate-key", "not-utf8"])
def test_pathological_headers(header: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode([VERSION, b"workers", header], ALL)


def test_too_many_frames() -> None:
    with pytest.raises(ProtocolError, match="too many frames"):
        decode([VERSION, b"ping", b"{}", *([b""] * 30_000)], ALL)


# --- a live broker under fire


def _fuzz_port(sock: zmq.Socket[bytes], allowed: frozenset[M], examples: int) -> int:
    """Send ``examples`` malformed (or garbage) frame lists; each must get an ERROR
    whose code matches what the codec says. Returns how many were sent."""
    sent = [0]
    garbage = st.lists(st.binary(max_size=48), min_size=1, max_size=6).map(
        lambda fs: (fs, None))

    @given(st.one_of(malformed(allowed, max_items=1).filter(lambda c: len(c[0]) > 0), garbage))
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def feed(case: tuple[list[bytes], str | None]) -> None:
        frames, _ = case
        try:
            decode(frames, allowed)
        except ProtocolError as e:
            expected = e.code
            if allowed == MONITOR_REQUESTS and len(frames) > 1 and frames[1] == b"hello":
                expected = "wrong_port"  # a client's first message: told the client port
        else:
            assume(False)  # garbage that happens to be valid: not what this test is for
        sock.send_multipart(frames)
        reply = decode(sock.recv_multipart(), frozenset({M.ERROR}))
        assert reply.header["code"] == expected, reply.header
        sent[0] += 1

    feed()
    return sent[0]


def test_live_broker_survives_malformed_input(procs: Procs, home: Path) -> None:
    broker = procs.broker()
    procs.worker(1)
    D = procs.client()
    procs.wait_workers(D, 1)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        clients = _dealer(ctx, home, procs.port)
        monitors = _dealer(ctx, home, procs.port + 1)
        sent = _fuzz_port(clients, CLIENT_REQUESTS, 1000)
        sent += _fuzz_port(monitors, MONITOR_REQUESTS, 1000)
        assert sent >= 1500
        assert broker.alive()
        # the broker still knows these peers: a valid message is answered normally
        clients.send_multipart(encode(Message(M.PING)))
        assert decode(clients.recv_multipart(), ALL).type is M.PONG
    finally:
        ctx.destroy(linger=0)
    assert D("6 * 7").result(60) == 42


def test_oversized_frames_are_dropped_and_the_broker_goes_on(procs: Procs, home: Path) -> None:
    broker = procs.broker(max_message_size=1 << 20)
    procs.worker(1)
    D = procs.client()
    procs.wait_workers(D, 1)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        for port in (procs.port, procs.port + 1):
            sock = _dealer(ctx, home, port)
            sock.rcvtimeo = 500
            # one frame over the limit: libzmq drops the connection before it is read
            sock.send_multipart([VERSION, b"ping", b"{}", b"x" * 1_100_000])
            with pytest.raises(zmq.Again):
                sock.recv_multipart()
            sock.close(linger=0)
        ok = _dealer(ctx, home, procs.port)
        ok.send_multipart(encode(Message(M.PING)))
        assert decode(ok.recv_multipart(), ALL).type is M.PONG
    finally:
        ctx.destroy(linger=0)
    assert broker.alive()
    small = done(D("len(%r)" % ("y" * 100_000)), 60)
    assert small.result() == 100_000
    wait_for(lambda: D.workers(), 10, "the monitor still registered")


# --- bounds on values: what once reached SQLite and killed the broker


@pytest.mark.parametrize("spec_change", [
    {"name": "x\udcff"},                       # a lone surrogate cannot be stored as text
    {"memory": 10_000_000 * 10**12},           # 10,000,000 TB: past SQLite's 64-bit INTEGER
    {"requires": ["gpu\udc80"]},
    {"timeout": 10**400},                      # an int too large for a float
    {"name": "n" * 5000},
])
def test_submit_values_out_of_bounds_are_protocol_errors(spec_change: dict[str, Any]) -> None:
    spec = {"id": "0" * 32, "name": None, "kind": "python", "timeout": None, "priority": 5,
            "memory": None, "anonymous_ok": False, "requires": [], "isolate": False,
            "retries": 0, "retry_on": [], "shared": [],
            **spec_change}
    frames = [VERSION, b"submit", json.dumps({"req": 0, "jobs": [spec], "shared": []}).encode(), b"1"]
    with pytest.raises(ProtocolError):
        decode(frames, ALL)


def test_result_error_text_with_a_surrogate_is_refused_and_clip_fixes_it() -> None:
    from dsage.protocol import clip

    item = {"id": "0" * 32, "status": "failed", "error": "KeyError: '\udcff'",
            "encoding": "none", "result_from": "none", "sealed": False, "started": None,
            "finished": 1.0, "staged": False, "attempt": 1, "retry": False}
    frames = [VERSION, b"result", json.dumps({"results": [item]}).encode(), b"", b""]
    with pytest.raises(ProtocolError):
        decode(frames, ALL)
    item["error"] = clip(item["error"])
    frames[2] = json.dumps({"results": [item]}).encode()
    assert decode(frames, ALL).header["results"][0]["error"] == "KeyError: '?'"
    assert len(clip("x" * 10_000, 100)) == 100


@given(st.lists(st.integers(0, 3000), max_size=60), st.integers(1, 7), st.integers(1, 5000))
def test_batches_cover_every_item_once_within_limits(sizes: list[int], max_items: int,
                                                     max_bytes: int) -> None:
    from dsage.protocol import batches

    parts = batches(sizes, max_items, max_bytes)
    assert [i for r in parts for i in r] == list(range(len(sizes)))
    for r in parts:
        assert 1 <= len(r) <= max_items
        assert len(r) == 1 or sum(sizes[i] for i in r) <= max_bytes


def test_job_ids_are_unique_and_a_forked_child_never_gives_out_its_parents() -> None:
    """Ids are the time, then random bits read from the system many at a time; a
    child forked while some are unread draws its own, not the ones its parent gives
    out next."""
    first = new_job_id()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write its next ids, then leave at once
        os.close(r)
        os.write(w, "".join(new_job_id() for _ in range(600)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    theirs = {text[i:i + 32] for i in range(0, len(text), 32)}
    made = [new_job_id() for _ in range(600)]
    ours = set(made) | {first}
    assert len(theirs) == 600 and len(ours) == 601 and not theirs & ours
    assert all(is_job_id(i) for i in theirs | ours)
    # the time first, so that new ids sit together in the store's index
    times = [int(i[:12], 16) for i in made]
    assert times == sorted(times) and abs(times[-1] / 1000 - time.time()) < 60
