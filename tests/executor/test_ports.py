"""free_port: a bindable port below the kernel's ephemeral range, where connect() and bind(0) never
land, so the rendezvous that takes it later does not race them."""

from __future__ import annotations

import socket

from distgen.executor import ports


def test_a_free_port_is_below_the_ephemeral_range_and_bindable():
    lo, _ = ports.ephemeral_range()
    picked = {ports.free_port() for _ in range(20)}
    assert all(lo - 12000 <= p < lo for p in picked), (picked, lo)
    assert len(picked) > 1  # drawn at random, not the first free one every time
    with socket.socket() as s:
        s.bind(("127.0.0.1", picked.pop()))


def test_a_port_in_use_is_skipped(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        # Two candidates: the busy port and the one below it.
        monkeypatch.setattr(ports, "ephemeral_range", lambda: (taken + 1, 65535))
        monkeypatch.setattr(ports, "_SPAN", 2)
        monkeypatch.setattr(ports, "_MIN_ROOM", 2)
        got = [ports.free_port() for _ in range(20)]
        assert taken not in got
        assert got.count(taken - 1) == 20 or not ports._bindable("127.0.0.1", taken - 1)


def test_no_room_below_the_range_falls_back_to_the_kernels_choice(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (1500, 65000))
    port = ports.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
