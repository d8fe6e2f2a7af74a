"""Work beside decoding on a base's one work loop, and the rule that shares the loop's time.

Everything that runs a loaded base's weights runs on its work loop (core.generate.scheduler): decode steps
and prefills, and, as units of side work, each chunk of an evaluation or of token differences, each shared
training micro-step, and each change of the model's structure (an adapter added or removed). The loop
owns the model: no computation can see an adapter appear or vanish under it, and the loop takes no lock.

The policy, at every iteration of the loop:
1. structure changes first (they are short, and a request may be waiting for its adapter);
2. admit what fits in the KV pool and prefill it, then one decode step for every running row;
3. at most one unit of side work, taken round-robin over its owners (each user's evaluations; the
   training jobs, which share one micro-step, as one owner): a long evaluation does not make someone
   else's short one wait for its end, and training gets its turn beside evaluations;
4. while requests decode, side work gets at most 1 - share of the loop's time: after a unit that took c
   seconds, the next waits until decoding has had share / (1 - share) * c seconds (2c at the default 2/3).
   With nothing to decode, units run back to back. So a Compare beside an evaluation or a training job
   takes about 1 / share of its time alone, plus at most one unit.

That is one lane, for a GPU, which runs one thing at a time anyway. On a CPU with two or more cores the
loop has a second lane: side units run there one at a time (owners in turn, step 3) beside the decode
steps, which use one thread and would leave the other cores idle; step 4 is then the cores' split. A
structure change runs on that lane between two units while the decode lane waits at an iteration boundary,
so decoding waits for the change alone, and no computation ever sees an adapter appear or vanish.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Callable

SHARE = 2 / 3  # the loop's time that decoding gets at least, while requests decode
MAX_OWNERS = 1024  # owners remembered for their turn (owners are user names, or one object per anonymous call)


class Unit:
    """One piece of side work: fn() run once on one of the loop's threads; its result or error goes back to
    the caller waiting in `wait`."""

    def __init__(self, fn: Callable[[], object], owner: object, urgent: bool = False):
        self.fn, self.owner, self.urgent = fn, owner, urgent
        self.result: object = None
        self.error: BaseException | None = None
        self._done = threading.Event()

    def run(self) -> float:
        """Run fn (on the loop's thread); returns the seconds it took."""
        start = time.perf_counter()
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - the caller's error, raised again on the caller's thread
            self.error = e
        self._done.set()
        return time.perf_counter() - start

    def end(self, error: BaseException) -> None:
        """End a unit that will not run (the loop closed)."""
        self.error = error
        self._done.set()

    def wait(self):
        self._done.wait()
        if self.error is not None:
            raise self.error
        return self.result


class SideWork:
    """The loop's queue of side work and its share of the time (not thread-safe: the scheduler holds its
    own lock around every call). clock: seconds (tests pass a fake)."""

    def __init__(self, share: float = SHARE):
        if not 0 < share < 1:
            raise ValueError(f"decoding's share of the loop must be between 0 and 1 (got {share}).")
        self.ratio = share / (1 - share)
        self._units: deque[Unit] = deque()
        self._served: dict[object, int] = {}  # owner -> when it was last served (a counter)
        self._turns = itertools.count(1)
        self._owed = 0.0  # decoding seconds still owed before the next unit, while requests decode

    def __len__(self) -> int:
        return len(self._units)

    def put(self, unit: Unit) -> None:
        self._units.append(unit)

    def take_urgent(self) -> Unit | None:
        """The oldest urgent unit (a change of the model's structure), or None."""
        urgent = next((u for u in self._units if u.urgent), None)
        if urgent is not None:
            self._units.remove(urgent)
        return urgent

    def waiting(self, urgent_only: bool) -> bool:
        """Whether a unit (an urgent one, with urgent_only) waits."""
        return any(u.urgent or not urgent_only for u in self._units)

    def take(self, decoding: bool) -> Unit | None:
        """The side unit to run now (urgent ones are taken with `take_urgent`), or None: unless decoding is
        still owed its share, the oldest unit of the owner served longest ago."""
        units = [u for u in self._units if not u.urgent]
        if not units or (decoding and self._owed > 0):
            return None
        unit = min(units, key=lambda u: self._served.get(u.owner, 0))  # min keeps queue order on ties
        self._units.remove(unit)
        # remembered while it has nothing queued: an evaluation queues its next chunk only once this one is done
        self._served[unit.owner] = next(self._turns)
        if len(self._served) > MAX_OWNERS:  # forget the owner served longest ago
            del self._served[min(self._served, key=self._served.get)]
        return unit

    def ran(self, unit: Unit, seconds: float) -> None:
        """A unit took `seconds`: decoding is owed its share of that before the next one."""
        if not unit.urgent:
            self._owed = self.ratio * seconds

    def decoded(self, seconds: float) -> None:
        """Decoding ran `seconds` (a step or a prefill)."""
        self._owed = max(0.0, self._owed - seconds)

    def idle(self) -> None:
        """Nothing is decoding: nothing is owed."""
        self._owed = 0.0

    def drain(self) -> list[Unit]:
        units, self._units = list(self._units), deque()
        return units
