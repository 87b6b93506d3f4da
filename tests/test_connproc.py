"""The fence's end of the connection recorder process (resolver.fence.connproc) without a lab:
names handed over a real pipe to the child's reader, lost notes counted into a real log.

The recorder process itself (conntrack, restarts after SIGKILL) runs in the namespace lab:
tests/test_connections_netns.py.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from pathlib import Path

import pytest
from sqlite_utils import Database

from resolver.core.logdb import ensure_connections_table
from resolver.fence.connproc import ConnRecorderProcess, _Control
from resolver.fence.connrec import ConnRecorder
from resolver.fence.conntrack import MARK_ALLOWED, CtEntry
from resolver.log import report as rpt


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def _parent(tmp_path: Path, fd: int, sent_max: int) -> ConnRecorderProcess:
    rec = ConnRecorderProcess(str(tmp_path / "log.db"), None, 1.0, sent_max=sent_max)
    rec._fd = fd  # the write end of the child's stdin, as start() would leave it
    return rec


def test_names_evict_the_least_recently_sent_and_both_sides_agree(tmp_path: Path, pipe) -> None:
    r, w = pipe
    parent = _parent(tmp_path, w, sent_max=4)
    child = _Control(r, None, names_max=8)
    model: dict[str, bytes] = {}  # what the child should hold: the last 8 addresses sent, in order
    for i in range(60):
        ip, name = f"2001:db8::{i % 13:x}", f"n{i % 5}.test".encode()
        was = dict(parent._sent)
        parent.note([(ip, 60)], name)
        child()
        if was.get(ip) != name:  # only a change is sent
            model.pop(ip, None)
            model[ip] = name
            while len(model) > 8:
                del model[next(iter(model))]
        assert list(child.names.items()) == list(model.items())  # oldest out, never all at once
        assert len(parent._sent) <= 4
        # every name the parent believes the child has, the child has: it is never sent again
        for sent_ip, sent_name in parent._sent.items():
            assert child.names.get(sent_ip) == sent_name
    assert len(child.names) == 8 and parent.lost_notes == 0


def test_a_restarted_child_is_handed_every_name_in_the_same_order(tmp_path: Path, pipe) -> None:
    r, w = pipe
    parent = _parent(tmp_path, w, sent_max=6)
    for i in range(10):
        parent.note([(f"2001:db8::{i:x}", 60), (f"2001:db8::1:{i:x}", 60)], f"n{i // 3}.test".encode())
    new_r, new_w = os.pipe()
    try:
        os.set_blocking(new_r, False)
        fresh = _Control(new_r, None, names_max=12)
        parent._replay(new_w)
        fresh()
        assert list(fresh.names.items()) == list(parent._sent.items())
    finally:
        os.close(new_r)
        os.close(new_w)


def test_lost_notes_are_counted_into_the_log_and_reported(tmp_path: Path, pipe) -> None:
    _, w = pipe
    parent = _parent(tmp_path, w, sent_max=65_536)
    i = 0
    while parent.lost_notes == 0:  # nobody reads: the pipe fills, notes are lost, never block
        parent.note([(f"2001:db8::{i:x}", 60)], b"\x07example\x04test\x00")
        i += 1
        assert i < 100_000, "a pipe that never fills"
    for j in range(5):
        parent.note([(f"2001:db8:1::{j:x}", 60)], b"\x07example\x04test\x00")
    lost = parent.lost_notes
    assert lost == 6
    parent.flush_lost()
    parent.flush_lost()  # nothing new: no second row
    with sqlite3.connect(tmp_path / "log.db") as conn:
        assert conn.execute("SELECT count(*), sum(lost_names), sum(dropped) FROM connection_overflow"
                            ).fetchone() == (1, lost, 0)
    db = Database(tmp_path / "log.db")
    try:
        assert rpt.connection_overflow(db, None, None)["lost_names"] == lost
    finally:
        db.close()
    gone_r, gone_w = os.pipe()  # the child is gone: EPIPE, counted the same way
    os.close(gone_r)
    parent._fd = gone_w
    try:
        parent.note([("2001:db8:2::1", 60)], b"\x01x\x00")
        assert parent.lost_notes == lost + 1
    finally:
        os.close(gone_w)


def test_a_flow_whose_name_came_after_its_first_event_gets_it_when_written_again(tmp_path: Path) -> None:
    # The name's note (the server's pipe) and the connection's first event (conntrack) are read
    # in either order by the recorder process: an unnamed row must not stay unnamed.
    names: dict[str, str] = {}
    db_path = tmp_path / "log.db"
    rec = ConnRecorder(str(db_path), name_of=names.get)
    db = sqlite3.connect(db_path)
    ensure_connections_table(db)
    new = CtEntry("new", 7, socket.AF_INET6, 6, "2001:db8:a::2", "2001:db8:b::443", 40000, 443, MARK_ALLOWED)
    rec._event(new, 1000.0)
    rec._flush(db)
    assert db.execute("SELECT name FROM connections").fetchall() == [(None,)]
    names["2001:db8:b::443"] = "late.example"  # the note arrives
    rec._event(CtEntry("destroy", 7, socket.AF_INET6, 6, "2001:db8:a::2", "2001:db8:b::443", 40000, 443,
                       MARK_ALLOWED, bytes_out=100, packets_out=1, bytes_in=50, packets_in=1), 1001.0)
    rec._flush(db)
    assert db.execute("SELECT name, end_ts, bytes_out FROM connections").fetchall() == [
        ("late.example", 1001.0, 100)]
    db.close()
