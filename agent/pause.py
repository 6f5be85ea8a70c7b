"""Pause and idle-only mode: a worker that stays connected but takes no work.

A pause is asked for by the volunteer (SIGUSR1, ``dockercomp installer pause``; SIGUSR2
resumes) or by idle-only mode when the host's load rises above a threshold. Either way the
agent, in this order:

1. publishes a retained ``paused`` presence with its connection's seq, so the coordinator
   stops sending before anything is turned away;
2. hands back its queued tasks and any task arriving later as ``released`` (no attempt used);
3. lets running tasks finish within its ``--grace`` seconds (the same bound as a shutdown: a
   short task is not worth throwing away, a long one must not keep a volunteer's machine
   busy after they asked for it back), then kills the rest and hands them back ``released``;
4. stays connected: keepalives go on, so no will fires and the coordinator does not count the
   worker lost. (``docker pause`` would freeze the client and its will would fire.)

Resuming publishes ``online`` again (same seq). The worker is paused while any reason holds:
a volunteer's pause is not lifted by the host falling idle, nor a busy host by ``resume``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from dockercomp.agent.defaults import IDLE_HYSTERESIS, IDLE_MAX_LOAD_PER_CPU, IDLE_SAMPLE_SECONDS
from dockercomp.agent.runner import Finished
from dockercomp.broker.messages import Outcome, TaskError

if TYPE_CHECKING:
    from dockercomp.agent.agent import Agent

log = logging.getLogger(__name__)

# Error type of the `released` results of a pause (a shutdown's are "Shutdown").
PAUSED_ERROR = "Paused"


class PauseReason(str, Enum):
    VOLUNTEER = "volunteer"  # SIGUSR1 / `installer pause` / Agent.pause()
    LOAD = "load"  # idle-only mode: the host is busy


def default_max_load(cpus: int | None = None) -> float:
    """The idle-only threshold when none is given: a share of the host's CPUs."""
    return round(IDLE_MAX_LOAD_PER_CPU * (cpus or os.cpu_count() or 1), 2)


class LoadWatch:
    """Idle-only mode: is the host busy? Reads the 1-minute load average from ``path``
    (/proc/loadavg; inside a container the kernel shows the host's, not the container's).

    The load this agent's own running tasks add (about 1 each) is subtracted, or a worker
    would pause itself for its own work. Busy above ``max_load``; idle again only below
    ``max_load - hysteresis``, so a load hovering at the threshold does not flap."""

    def __init__(self, path: Path, max_load: float, *, hysteresis: float = IDLE_HYSTERESIS,
                 interval: float = IDLE_SAMPLE_SECONDS) -> None:
        self.path = path
        self.max_load = max_load
        self.resume_below = max(0.0, max_load - min(hysteresis, max_load / 2))
        self.interval = interval
        self.busy = False
        self.load: float | None = None  # the last reading (host load minus our own tasks)
        self._unreadable_logged = False

    def read(self) -> float | None:
        """The 1-minute load average, or None when it cannot be read (logged once)."""
        try:
            value = float(self.path.read_text(encoding="ascii").split()[0])
        except (OSError, ValueError, IndexError, UnicodeDecodeError) as exc:
            if not self._unreadable_logged:
                log.warning("idle-only: cannot read the load from %s (%s); keeping the last verdict (%s)",
                            self.path, exc, "busy" if self.busy else "idle")
                self._unreadable_logged = True
            return None
        self._unreadable_logged = False
        return value

    def sample(self, own_tasks: int) -> bool:
        """Read the load once; returns whether the host is busy now."""
        raw = self.read()
        if raw is None:
            return self.busy
        self.load = max(0.0, raw - own_tasks)
        if not self.busy and self.load > self.max_load:
            self.busy = True
        elif self.busy and self.load < self.resume_below:
            self.busy = False
        return self.busy


class Pauser:
    """The pause state of one agent, stepped by the agent's main loop (signal handlers only
    set ``requested``)."""

    def __init__(self, agent: Agent, watch: LoadWatch | None, clock: Callable[[], float]) -> None:
        self.agent = agent
        self.watch = watch
        self._clock = clock
        # Set by signal handlers and other threads, read by the loop: True = pause, False = resume.
        self.requested: bool | None = None
        self.reasons: set[PauseReason] = set()
        self.paused = False
        self._kill_at: float | None = None  # when running tasks of a pause are handed back
        self._next_sample = clock() if watch is not None else float("inf")
        self._marker: Path | None = None  # exists while the volunteer has this worker paused
        if watch is not None:
            log.info("idle-only: pausing while the host's load (%s, minus this agent's tasks) is above %g, "
                     "resuming below %g; sampled every %g s", watch.path, watch.max_load, watch.resume_below,
                     watch.interval)

    def remember_in(self, marker: Path) -> None:
        """Keep the volunteer's pause in ``marker`` (a file that exists while paused), so that
        a pause outlives a restart of the agent (a reboot restarts the container)."""
        self._marker = marker
        if marker.exists():
            log.warning("paused by the volunteer before this start (%s exists): starting paused; "
                        "resume with SIGUSR2 (`dockercomp installer resume`)", marker)
            self.requested = True

    def _remember(self, paused: bool) -> None:
        if self._marker is None:
            return
        try:
            if paused:
                self._marker.touch()
            else:
                self._marker.unlink(missing_ok=True)
        except OSError as exc:  # the pause itself works; only a restart would forget it
            log.warning("cannot %s %s (%s): a restart will not remember this", "create" if paused else "remove",
                        self._marker, exc)

    def step(self) -> float:
        """Apply what was asked and what the load says; returns when to be stepped again."""
        now = self._clock()
        requested, self.requested = self.requested, None
        if requested is not None:
            self.reasons.discard(PauseReason.VOLUNTEER)
            if requested:
                self.reasons.add(PauseReason.VOLUNTEER)
            self._remember(requested)
        if self.watch is not None and now >= self._next_sample:
            self._next_sample = now + self.watch.interval
            if self.watch.sample(len(self.agent.runner.running)):
                self.reasons.add(PauseReason.LOAD)
            else:
                self.reasons.discard(PauseReason.LOAD)
        if requested is False and self.paused and self.reasons:
            log.warning("resume asked, but idle-only keeps this worker paused (%s)", self._why())
        if self.reasons and not self.paused:
            self._pause(now)
        elif not self.reasons and self.paused:
            self._resume()
        if self._kill_at is not None and (now >= self._kill_at or not self.agent.runner.running):
            self._kill_at = None
            self._hand_back_running()
        return min(self._next_sample, self._kill_at if self._kill_at is not None else float("inf"))

    def _why(self) -> str:
        if PauseReason.LOAD in self.reasons and self.watch is not None and self.watch.load is not None:
            load = f"host load {self.watch.load:.2f} above {self.watch.max_load:g}"
            return load if PauseReason.VOLUNTEER not in self.reasons else f"asked, and {load}"
        return "asked"

    def _pause(self, now: float) -> None:
        agent = self.agent
        self.paused = True
        agent.set_paused(True)  # presence first: the coordinator stops sending
        dropped = agent.runner.drop_queued()
        running = len(agent.runner.running)
        grace = agent.settings.grace
        log.warning("paused (%s): no new tasks; %d queued handed back unrun, %d running get up to %g s to "
                    "finish", self._why(), len(dropped), running, grace)
        if dropped:
            agent.report_all([Finished(job.key, Outcome.RELEASED, error=TaskError(
                PAUSED_ERROR, "queued on a worker that paused; never started")) for job in dropped])
        self._kill_at = now + grace if running else None

    def _resume(self) -> None:
        self.paused = False
        self._kill_at = None
        self.agent.set_paused(False)
        load = self.watch.load if self.watch is not None else None
        log.warning("resumed: taking tasks again%s", f" (host load {load:.2f})" if load is not None else "")

    def _hand_back_running(self) -> None:
        """The grace period of a pause is over: hand back what still runs, keep the pool ready."""
        runner = self.agent.runner
        if not runner.running:
            return
        killed = runner.kill_running(f"the worker paused and the task was still running after "
                                     f"{self.agent.settings.grace:g} s")
        runner.start()  # kill_running stops the pool; a resumed worker needs its processes
        killed = [Finished(f.key, Outcome.RELEASED, error=TaskError(PAUSED_ERROR, f.error.message if f.error
                                                                    else "paused"), elapsed=f.elapsed)
                  if f.outcome is Outcome.RELEASED else f for f in killed]
        log.warning("paused: %d running task(s) handed back (released, no attempt used)",
                    sum(1 for f in killed if f.outcome is Outcome.RELEASED))
        self.agent.report_all(killed)
