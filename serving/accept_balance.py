"""Spreading new connections evenly over the gateway's gunicorn workers.

Every worker accepts from the one listening socket, and whichever is awake first takes what waits:
16 keep-alive connections opened at once (a load generator, a proxy's upstream pool) landed 16/0,
14/2 and 15/1 on the 2 workers in 3 of 5 tries, and a worker that holds them all serves them with
one process: 239 req/s at 16/0 against 355 at 8/8 (the benchmark's model, 2 cores). Keep-alive
makes such a split last as long as the connections do.

So each worker publishes its open connections in a table the workers share (`ConnectionTable`, an
anonymous shared memory map the gunicorn master makes before it forks them), and a worker holding
more than SLACK connections above its least loaded live sibling pauses accepting for PAUSE_S,
leaving what waits to that sibling. After a pause it accepts the next connection whatever the counts
say (a sibling that did not take it in PAUSE_S is busy or stuck), then the counts decide again: so
balancing makes a new connection wait PAUSE_S at most, and a worker that hangs costs no more. A sibling
counts while its heartbeat, written on every turn of its event loop (at least once a second), is
under STALE_S old: one that stops, dies or is still loading its app drops out of the comparison.
"""

from __future__ import annotations

import mmap

import numpy as np

SLOTS = 64  # workers a table tracks at once: a worker's slot is its gunicorn age modulo SLOTS
SLACK = 1  # connections a worker may hold above its least loaded sibling before it pauses
PAUSE_S = 0.005  # how long a busier worker leaves new connections to its siblings
STALE_S = 3.0  # a sibling whose loop has not turned for this long is not compared with
_CONNECTIONS, _HEARTBEAT = range(2)  # a slot's fields


class ConnectionTable:
    """Open connections per worker, shared by the processes forked after it was made."""

    def __init__(self, slots: int = SLOTS) -> None:
        self._map = mmap.mmap(-1, slots * 2 * 8)  # anonymous and shared: children see one memory
        self._rows = np.frombuffer(self._map, dtype=np.float64).reshape(slots, 2)
        self.slots = slots

    def slot_for(self, age: int) -> int:
        return age % self.slots

    def publish(self, slot: int, connections: int, now: float) -> None:
        """`now`: time.monotonic(), one clock for every process on the machine."""
        self._rows[slot] = (connections, now)

    def clear(self, slot: int) -> None:
        self._rows[slot] = 0.0

    def least_loaded_sibling(self, slot: int, now: float) -> int | None:
        """The fewest connections a live worker other than `slot`'s holds; None when none is live."""
        rows = self._rows
        live = rows[:, _HEARTBEAT] > now - STALE_S
        live[slot] = False
        if not live.any():
            return None
        return int(rows[live, _CONNECTIONS].min())

    def should_yield(self, slot: int, connections: int, now: float) -> bool:
        """Whether a worker holding `connections` should leave the next one to a sibling."""
        least = self.least_loaded_sibling(slot, now)
        return least is not None and connections > least + SLACK
