"""A small chain flow whose tasks log what they do to a file shared with a
resumed (or killed and restarted) process: the persistence tests of every
backend run it."""
import os

from taskflow import task
from taskflow.patterns import linear_flow as lf


class Crash(BaseException):
    """Stands for the process dying in the middle of a task."""


class LoggedStep(task.Task):
    """Appends what it does to a log file.

    ``crash``: "raise" raises Crash, "kill" SIGKILLs the process, each only
    while the flag file exists (it is removed first: a resumed run goes
    through).  The revert result is ``revert_value()``.
    """

    def __init__(self, name, log, fail=False, crash_flag=None, crash="raise", **kw):
        super().__init__(name=name, **kw)
        self._log, self._fail = log, fail
        self._crash_flag, self._crash = crash_flag, crash

    def _note(self, what):
        with open(self._log, "a") as f:
            f.write("%s %s\n" % (what, self.name))

    def execute(self, x):
        self._note("execute")
        if self._crash_flag and os.path.exists(self._crash_flag):
            os.unlink(self._crash_flag)
            if self._crash == "kill":
                os.kill(os.getpid(), 9)
            raise Crash()
        if self._fail:
            raise RuntimeError("step %s failed" % self.name)
        return x + 1

    def revert(self, x, result, flow_failures):
        self._note("revert")
        return self.revert_value()

    def revert_value(self):
        return "undo-" + self.name


class PositionStep(LoggedStep):
    """Its revert result is the position of the revert (1 = first)."""

    def revert_value(self):
        return sum(1 for line in log_lines(self._log) if line.startswith("revert"))


def chain(step_cls, log, crash_flag=None, crash="raise", fail_at=None, n=4):
    """s0 → … → s{n-1}; s2 crashes while ``crash_flag`` exists."""
    flow = lf.Flow("chain")
    for i in range(n):
        flow.add(step_cls("s%d" % i, log, fail=(i == fail_at),
                          crash_flag=crash_flag if i == 2 else None, crash=crash,
                          provides="v%d" % i,
                          rebind={"x": "x" if i == 0 else "v%d" % (i - 1)}))
    return flow


def log_lines(log):
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return f.read().split("\n")[:-1]
