"""Process lifecycle shared by the engine and long-running steps.

When a conductor is asked to stop, a step that can wait for a long time
(watching the memory copy) must not hold the shutdown hostage: it detaches
instead.  ``Detach`` is a BaseException so that TaskFlow does not treat it
as a failure (no rollback): the step stays RUNNING in the persisted flow,
the job is abandoned, and the next conductor re-runs the step, which
re-attaches to the copy still running on the hypervisors.
"""
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
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._local = threading.local()

    def holding(self):
        """True when this thread has the turn."""
        return getattr(self._local, "held", False)

    def take(self):
        """Context manager: this thread takes turns while inside."""
        return _Taking(self)

    def waiting(self):
        """Context manager around a wait: the turn is given away during it
        when this thread has it (else nothing happens)."""
        return _Waiting(self) if self.holding() else _NOTHING

    def _acquire(self):
        self._lock.acquire()
        self._local.held = True

    def _release(self):
        self._local.held = False
        self._lock.release()


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


_NOTHING = contextlib.nullcontext()  # reusable

#: the turns of this process's migration threads (see ``hostops``)
TURNS = Turns()


def _after_fork_in_child():
    global TURNS
    TURNS = Turns()  # the parent's threads, and their turn, stayed behind


os.register_at_fork(after_in_child=_after_fork_in_child)


def waiting():
    """Wrap a wait of a migration thread: see :class:`Turns`."""
    return TURNS.waiting()


def sleep(seconds):
    """``time.sleep``, giving this thread's turn away meanwhile."""
    with TURNS.waiting():
        time.sleep(seconds)
