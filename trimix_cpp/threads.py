"""A thread count that follows what a decode step costs, so that a busy machine slows generation by
its share of the CPU instead of stalling it.

llama.cpp's CPU threads meet at a barrier after every operation of a decode, hundreds of times a
token. When another process takes a core, a thread waits at each barrier for a sibling the OS has
descheduled: with every core in use, one CPU-bound process beside it made fused decoding 3-5 times
slower here (60 to 12 tokens/s on 2 cores), where one thread, which never waits for a sibling, kept
34. Which is faster depends on the moment, so the scheduler measures both: it decodes with the
full count, tries one thread for a couple of steps soon after it starts, every couple of seconds
and whenever a step takes twice its usual time (and the full count again while on one), and keeps
whichever decoded the same batch faster lately.

A trial costs what the slower setting loses over its steps, so trials are spaced by the step time
as well: at most about :data:`TRIAL_SHARE` of decoding goes to them. With a 7B model on two cores
(about 0.65 s a fused step) a trial every two seconds took two steps in five at one thread and cost
a fifth of the server's decode rate; spaced by the step time it costs a few per cent, while a
small model's 10-30 ms steps keep the two-second rhythm.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Seconds between trials of the other thread count (the first comes soon: a reply is short), the
# steps one trial lasts, and how much slower than its running average a step must be to call a trial
# at once (the machine just got busier).
FIRST_PROBE_S = 0.25
PROBE_EVERY_S = 2.0
PROBE_STEPS = 2
JUMP = 2.0
# About the largest share of the steps that trials may take: the next trial begins PROBE_EVERY_S after
# one began, or PROBE_STEPS / TRIAL_SHARE steps of the chosen setting later, whichever is later.
TRIAL_SHARE = 0.05
# Weight of the newest step in each setting's running average of step time.
NEW_WEIGHT = 0.5


class ThreadGovernor:
    """Chooses between ``full`` threads and one, from the measured time of each decode step.

    ``observe(size, seconds)`` is called after every step with the batch's size (steps of one size
    are compared with each other) and its decode time; it switches the thread count through
    ``set_threads`` when the other setting measured faster. With ``full`` <= 1 it does nothing.
    """

    def __init__(self, set_threads: Callable[[int], None], full: int, clock: Callable[[], float] = time.monotonic):
        self.set_threads = set_threads
        self.full = full
        self.current = full
        self.clock = clock
        self.avg: dict[tuple[int, int], float] = {}  # (threads, batch size) -> running step time
        self.chosen = full  # the setting in force outside trials
        self.trial_left = 0
        self.next_trial = clock() + FIRST_PROBE_S
        self.trial_began = 0.0
        self.switches = 0

    @property
    def active(self) -> bool:
        return self.full > 1

    def observe(self, size: int, seconds: float) -> None:
        if not self.active:
            return
        key = (self.current, size)
        old = self.avg.get(key)
        self.avg[key] = seconds if old is None else (1 - NEW_WEIGHT) * old + NEW_WEIGHT * seconds
        jumped = old is not None and seconds > JUMP * old
        if self.trial_left > 0:
            self.trial_left -= 1
            if self.trial_left == 0:  # the trial is over: keep the faster setting for this batch size
                other = self.full if self.chosen == 1 else 1
                mine, theirs = self.avg.get((self.chosen, size)), self.avg.get((other, size))
                if mine is not None and theirs is not None and theirs < mine:
                    self.chosen = other
                self._use(self.chosen)
                # the next trial: PROBE_EVERY_S after this one began, later where steps are long
                step_s = self.avg.get((self.chosen, size), seconds)
                self.next_trial = self.trial_began + max(PROBE_EVERY_S, PROBE_STEPS * step_s / TRIAL_SHARE)
            return
        if jumped or self.clock() >= self.next_trial:
            self.trial_began = self.clock()
            self.trial_left = PROBE_STEPS
            self._use(self.full if self.chosen == 1 else 1)

    def _use(self, n: int) -> None:
        if n != self.current:
            self.set_threads(n)
            self.current = n
            self.switches += 1
