"""coordinator/inbox.py: the engine's one wait, on a transport that lends nothing (the
in-memory broker); reading a lent connection is tested with the coordinator on real brokers
(tests/system) and the owner's side of the transport in tests/contract/test_transport_owner.py."""

from __future__ import annotations

import threading
import time

from dockercomp.broker.memory import MemoryBroker
from dockercomp.coordinator.inbox import Inbox


def inbox() -> Inbox[int]:
    return Inbox(MemoryBroker().connect("engine"))


def test_an_item_put_from_another_thread_ends_the_wait_at_once() -> None:
    box = inbox()
    box.open()
    threading.Timer(0.2, box.put, (7,)).start()
    started = time.monotonic()
    box.wait(10)
    assert time.monotonic() - started < 5
    assert box.take(10) == [7]
    box.close()


def test_a_waiting_item_means_no_wait_and_take_keeps_the_order_and_the_limit() -> None:
    box = inbox()
    for i in range(5):
        box.put(i)
    started = time.monotonic()
    box.wait(10)
    assert time.monotonic() - started < 5
    assert box.take(3) == [0, 1, 2]
    assert box.take(10) == [3, 4]
    assert box.take(10) == [] and box.empty()
    box.close()


def test_without_until_item_only_a_wake_up_ends_the_wait() -> None:
    # The engine's retry after a database error: items wait, untaken, and must not make it spin.
    box = inbox()
    box.put(1)
    started = time.monotonic()
    box.wait(0.3, until_item=False)
    assert time.monotonic() - started >= 0.25
    threading.Timer(0.2, box.wake).start()
    started = time.monotonic()
    box.wait(10, until_item=False)
    assert time.monotonic() - started < 5
    assert len(box) == 1
    box.close()


def test_a_wake_up_after_close_is_harmless_and_a_closed_inbox_holds_no_descriptor() -> None:
    box = inbox()
    box.open()
    box.close()
    box.wake()  # a stop request after the engine stopped: the old descriptor may be reused
    box.close()
    assert (box._r, box._w) == (-1, -1)
