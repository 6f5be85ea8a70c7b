"""The agent's heartbeat: proof of life that needs neither the broker's retained store nor wills.

Every ``interval`` seconds the agent publishes its live presence again on its presence topic,
NOT retained and at QoS 0: the retained presence stays as it is, the broker stores nothing,
and no acknowledgement comes back. A broker node that dies sends no wills, a frozen process
keeps its TCP connection open for 1.5 keepalives, and a retained presence may be replayed
long after its worker died; a worker whose beats stop is marked lost by the coordinator
within a bound (coordinator/liveness.py, docs/protocol.md "Heartbeat").

Cost per worker: one PUBLISH of the presence (~300 bytes) per interval, to the broker and on
to the coordinator only. The presence carries ``heartbeat`` (the interval), so the coordinator
knows which workers beat and how often; to an older coordinator a beat is a live presence
that changes nothing.

Run from the agent's main loop (``step``), never from the network thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from dockercomp.broker.errors import BrokerError

if TYPE_CHECKING:
    from dockercomp.agent.agent import Agent

log = logging.getLogger(__name__)


class Heartbeat:
    """Publishes the agent's presence, not retained, every ``interval`` seconds (0: never)."""

    def __init__(self, agent: "Agent", interval: float, clock: Callable[[], float]) -> None:
        self.agent = agent
        self.interval = interval
        self._clock = clock
        self._due = clock() + interval
        self.sent = 0

    def step(self) -> float:
        """Beat if one is due; returns when the next one is (the main loop's wake-up time)."""
        if self.interval <= 0:
            return float("inf")
        now = self._clock()
        if now < self._due:
            return self._due
        self._due = now + self.interval
        agent = self.agent
        with agent._presence_lock:
            # Only the presence of a connection that announced itself, before the goodbye.
            if not agent._announced or agent._left or not agent.transport.connected:
                return self._due
            payload = agent._presence(agent._live_state(), None, agent._seq).encode()
        try:
            agent.transport.publish(agent.presence_topic, payload, qos=0, retain=False)
        except BrokerError as exc:  # QoS 0 is not kept: the next beat is the retry
            log.debug("heartbeat not sent: %s", exc)
            return self._due
        self.sent += 1
        return self._due
