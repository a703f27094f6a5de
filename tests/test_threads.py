"""The thread governor keeps whichever thread count decoded the same batch faster lately, tries the
other one soon, periodically and when a step suddenly slows, and leaves a user's count alone."""

from __future__ import annotations

import trimix_cpp as tm
from trimix_cpp.threads import PROBE_EVERY_S, PROBE_STEPS, TRIAL_SHARE, ThreadGovernor


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def drive(gov: ThreadGovernor, clock: Clock, cost: dict[int, float], steps: int) -> None:
    for _ in range(steps):
        clock.t += 0.05
        gov.observe(1, cost[gov.current])


def test_moves_to_one_thread_when_it_is_faster_and_back_when_the_machine_is_idle():
    calls: list[int] = []
    clock = Clock()
    gov = ThreadGovernor(calls.append, 4, clock=clock)
    drive(gov, clock, {4: 0.010, 1: 0.030}, 40)  # idle: every core wins every trial
    assert gov.chosen == 4 and calls and set(calls) <= {1, 4} and calls[-1] == 4
    drive(gov, clock, {4: 0.200, 1: 0.030}, 5 + PROBE_STEPS)  # busy: the slow step calls a trial at once
    assert gov.chosen == 1 and gov.current == 1
    drive(gov, clock, {4: 0.010, 1: 0.030}, int(2 * PROBE_EVERY_S / 0.05))  # idle again: found on a trial
    assert gov.chosen == 4


def test_trials_of_long_steps_take_a_small_share_of_the_time():
    """A 7B's steps last most of a second: trials every two seconds would spend two steps in five on
    the slower setting. Spaced by the step time, trials stay within TRIAL_SHARE of the steps."""
    calls: list[int] = []
    clock = Clock()
    gov = ThreadGovernor(calls.append, 2, clock=clock)
    cost = {2: 0.65, 1: 1.1}
    on_one = 0
    for _ in range(400):
        step = cost[gov.current]
        on_one += gov.current == 1
        clock.t += step
        gov.observe(1, step)
    assert gov.chosen == 2
    assert on_one / 400 <= 1.5 * TRIAL_SHARE  # trials every two seconds spent 66 % of the steps here
    assert on_one >= 2 * PROBE_STEPS  # it still tries


def test_one_core_or_a_users_thread_count_is_left_alone(tiny_trio):
    calls: list[int] = []
    gov = ThreadGovernor(calls.append, 1)
    gov.observe(1, 1.0)
    assert not gov.active and calls == []
    paths = {"large_ins": tiny_trio["large_ins"]}
    with tm.Engine(paths, tm.LoadOptions(n_ctx=64, n_threads=2, n_gpu_layers=0)) as eng:
        assert eng.scheduler.governor is None
    with tm.Engine(paths, tm.LoadOptions(n_ctx=64, n_gpu_layers=0)) as eng:
        assert eng.scheduler.governor is not None
        assert eng.generate("the cat", tm.plan("single"), max_tokens=8).run().finish_reason in ("length", "eog")
