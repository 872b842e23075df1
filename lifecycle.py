"""Process lifecycle shared by the engine and long-running steps.

When a conductor is asked to stop, a step that can wait for a long time
(watching the memory copy) must not hold the shutdown hostage: it detaches
instead.  ``Detach`` is a BaseException so that TaskFlow does not treat it
as a failure (no rollback): the step stays RUNNING in the persisted flow,
the job is abandoned, and the next conductor re-runs the step, which
re-attaches to the copy still running on the hypervisors.
"""
import collections
import contextlib
import os
import threading
import time

#: set when this process is shutting down
STOPPING = threading.Event()


class Detach(BaseException):
    """Leave the current step for another process to resume."""


class Turns:
    """One thread at a time runs among those that take turns; a thread
    gives its turn away while it waits (``waiting``).

    For a process whose threads run many flows over local SQLite files and
    the fake hypervisor: each sqlite3 call lets the GIL go for a few
    microseconds, and with several threads ready to run that hands the GIL
    to another thread at every call (two context switches, and the caller
    queues to get it back, holding whatever it holds: a database's write
    lock, say).  Taking turns, a thread runs until it waits for something
    slow (the copy, a copy gate, a hypervisor daemon), and the GIL is
    only handed over then.  Threads that do not take turns are not held up.

    The turn is handed from one thread to the next in the order they asked
    for it, but a thread marked urgent (``urgent``: one holding a copy gate,
    whose copy every other migration waiting at that gate waits for) goes
    before the others, and a thread that is not urgent hands the turn to a
    waiting urgent one at its next ``pause`` (between two steps of its
    flow), then comes back first.  So a copy that ended is noticed, and its
    gate given back, within a step of another flow, not after that flow
    reached its next wait.  A thread whose wait ends holding what the
    others need (its process's write lock on a database, got while it
    queued) comes back before every waiter, urgent ones included: the
    threads running meanwhile would each find the lock taken and queue.
    """

    def __init__(self):
        self._mutex = threading.Lock()
        self._busy = False  # a thread has the turn, or it is being handed over
        self._urgent, self._others = collections.deque(), collections.deque()
        self._local = threading.local()

    def holding(self):
        """True when this thread has the turn."""
        return getattr(self._local, "held", False)

    def take(self):
        """Context manager: this thread takes turns while inside."""
        return _Taking(self)

    def waiting(self, first_back=False):
        """Context manager around a wait: the turn is given away during it
        when this thread has it (else nothing happens).  ``first_back``:
        after the wait this thread gets the turn before every other waiter
        (it holds what they need: a database's write lock)."""
        if not self.holding():
            return _NOTHING
        return _WaitingFirstBack(self) if first_back else _Waiting(self)

    def set_urgent(self, urgent):
        """Mark this thread urgent (True) or not: see the class."""
        self._local.urgent = urgent

    def is_urgent(self):
        return getattr(self._local, "urgent", False)

    def pause(self):
        """A point where this thread may let an urgent one run first: it
        does when it has the turn, is not urgent and one waits."""
        if self._urgent and self.holding() and not self.is_urgent():
            self._hand_over()

    def _wakeup(self):
        """This thread's own lock, held while it waits for the turn: the
        thread handing the turn over lets it go."""
        wakeup = getattr(self._local, "wakeup", None)
        if wakeup is None:
            wakeup = self._local.wakeup = threading.Lock()
            wakeup.acquire()
        return wakeup

    def _acquire(self, first=False):
        wakeup = self._wakeup()
        with self._mutex:
            if not self._busy:
                self._busy = True
                self._local.held = True
                return
            if first:
                self._urgent.appendleft(wakeup)
            else:
                (self._urgent if self.is_urgent() else self._others).append(wakeup)
        wakeup.acquire()  # the turn is ours once it is let go
        self._local.held = True

    def _release(self):
        self._local.held = False
        with self._mutex:
            self._pass_on()

    def _pass_on(self):
        """Hand the turn to the next waiter, urgent ones first (with the
        mutex held)."""
        queue = self._urgent or self._others
        if queue:
            queue.popleft().release()  # still busy: it is that thread's now
        else:
            self._busy = False

    def _hand_over(self):
        """Give the turn to the next waiter (an urgent one) and wait for it
        back at the head of the others' queue."""
        wakeup = self._wakeup()
        self._local.held = False
        with self._mutex:
            self._others.appendleft(wakeup)
            self._pass_on()
        wakeup.acquire()
        self._local.held = True


class _Taking:
    __slots__ = ("_turns", "_nested")

    def __init__(self, turns):
        self._turns = turns

    def __enter__(self):
        self._nested = self._turns.holding()
        if not self._nested:
            self._turns._acquire()

    def __exit__(self, *exc_info):
        if not self._nested:
            self._turns._release()


class _Waiting:
    __slots__ = ("_turns",)

    def __init__(self, turns):
        self._turns = turns

    def __enter__(self):
        self._turns._release()

    def __exit__(self, *exc_info):
        self._turns._acquire()


class _WaitingFirstBack(_Waiting):
    __slots__ = ()

    def __exit__(self, *exc_info):
        self._turns._acquire(first=True)


_NOTHING = contextlib.nullcontext()  # reusable

#: the turns of this process's migration threads (see ``hostops``)
TURNS = Turns()


def _after_fork_in_child():
    global TURNS
    TURNS = Turns()  # the parent's threads, and their turn, stayed behind


os.register_at_fork(after_in_child=_after_fork_in_child)


def waiting(first_back=False):
    """Wrap a wait of a migration thread: see :class:`Turns`."""
    return TURNS.waiting(first_back)


def sleep(seconds):
    """``time.sleep``, giving this thread's turn away meanwhile."""
    with TURNS.waiting():
        time.sleep(seconds)


def set_urgent(urgent):
    """Mark this migration thread urgent or not: see :class:`Turns`."""
    TURNS.set_urgent(urgent)


def pause():
    """Between two steps: let an urgent thread run first (see :class:`Turns`)."""
    TURNS.pause()
