"""Process lifecycle shared by the engine and long-running steps.

When a conductor is asked to stop, a step that can wait for a long time
(watching the memory copy) must not hold the shutdown hostage: it detaches
instead.  ``Detach`` is a BaseException so that TaskFlow does not treat it
as a failure (no rollback): the step stays RUNNING in the persisted flow,
the job is abandoned, and the next conductor re-runs the step, which
re-attaches to the copy still running on the hypervisors.
"""
import threading

#: set when this process is shutting down
STOPPING = threading.Event()


class Detach(BaseException):
    """Leave the current step for another process to resume."""
