"""A migrateflow conductor that can be told to die: the subprocess of the
crash-matrix tests (tests/test_crash_matrix.py).  Test code, not product code.

It runs the product conductor (``service.run_conductor`` →
``engine.make_conductor`` → ``engine.MigrationConductor``) with the
configuration file given, plus one test listener attached to every engine
the conductor dispatches (a subclass of ``MigrationConductor`` overriding
``_listeners_from_job``; ``make_conductor`` builds it because this process
rebinds ``engine.MigrationConductor``):

* ``--journal FILE``: every task, retry and flow state change is appended to
  FILE as one line ``LABEL KIND NAME STATE`` (one ``write`` on an O_APPEND
  descriptor, so lines of several processes never interleave): the test
  tells from it which conductor ran or reverted which atom;
* ``--kill-at NAME:STATE``: SIGKILL this very process when the atom NAME
  (or the flow: NAME ``flow``) reaches STATE.  TaskFlow notifies listeners
  *after* the state change was saved (``TaskAction.change_state`` and
  ``RetryAction.change_state`` call ``storage.save``/``set_atom_state``
  first, ``notifier.notify`` last; the engine's ``_change_state`` saves the
  flow state before notifying), and this listener is registered after the
  product's own listeners for that state, so ``pre-live-migration:SUCCESS``
  is a true step boundary: the step's result is durable and the next step
  has not begun.  ``X:RUNNING`` = RUNNING persisted, ``execute`` not yet
  called; ``X:REVERTING`` = the revert about to be called.  The tests read
  the persisted state back after each kill to check exactly this;
* ``--kill-on-job-status STATUS``: SIGKILL when the fake driver's
  ``get_migration_job`` returns a job in STATUS (``running``: in the middle
  of the copy; ``completed``: the guest already runs on the destination,
  the live-migration step has not finished).

The conductor stops cleanly on SIGTERM (exit status 0), like
``migrateflow conductor``.  Two ways to start it:

    python tests/crash_conductor.py --config-file migrateflow.conf \\
        [--kill-at pre-live-migration:SUCCESS] [--journal FILE] [--label A]

or ``--zygote``: a fork server for the tests.  It imports everything once
(about 1.2 s of CPU a conductor would otherwise pay at each start), then
reads requests from stdin, one JSON object a line::

    {"id": 7, "argv": ["--config-file", "...", "--kill-at", "..."], "log": PATH}

forks a conductor per request (stdout and stderr to PATH) and answers on
stdout ``spawned ID PID``, and ``exited PID STATUS`` when a child ends
(STATUS as ``subprocess``: the exit code, or minus the signal number).  The
zygote stays single-threaded, so forking it is safe; it exits at EOF on
stdin, and every conductor exits by itself when its parent is gone.
"""
import argparse
import json
import os
import select
import signal
import sys
import threading
import time
import traceback

_T0 = time.monotonic()


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="crash_conductor.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", action="append", default=[])
    parser.add_argument("--kill-at", metavar="NAME:STATE",
                        help="SIGKILL self when atom NAME (or 'flow') reaches STATE")
    parser.add_argument("--kill-on-job-status", metavar="STATUS",
                        help="SIGKILL self when get_migration_job returns STATUS")
    parser.add_argument("--journal", metavar="FILE", help="append state changes here")
    parser.add_argument("--events", metavar="FILE",
                        help="append every notification (JSON, one a line) here")
    parser.add_argument("--label", default=None,
                        help="name of this conductor in the journal (default: pid)")
    parser.add_argument("--wait-timeout", type=float, default=None,
                        help="conductor idle poll period (TaskFlow's default 0.5 s)")
    parser.add_argument("--worker-idle", type=float, default=None,
                        help="futurist worker threads' idle poll (default 1 s; a stop "
                             "waits for it twice: the conductor's and the board's workers)")
    parser.add_argument("--zygote", action="store_true",
                        help="fork server: requests on stdin, see the module docstring")
    return parser.parse_args(argv)


def _log(message):
    os.write(2, ("crash_conductor[%d] +%.3fs %s\n"
                 % (os.getpid(), time.monotonic() - _T0, message)).encode())


def _warm_imports():
    """Everything a conductor imports, the flow's modules included (TaskFlow
    imports them when it rebuilds a flow from its factory).  No thread, no
    connection, no file is opened here: the zygote forks after this."""
    from stevedore import driver as stevedore_driver
    from taskflow.conductors.backends import impl_nonblocking  # noqa: F401
    from taskflow.jobs.backends import impl_zookeeper  # noqa: F401
    from taskflow.listeners import base  # noqa: F401

    from migrateflow import drivers, engine, service, sweeper  # noqa: F401
    from migrateflow.conf import CONF  # noqa: F401
    from migrateflow.drivers import fake  # noqa: F401
    from migrateflow.flows import live_migration  # noqa: F401
    for namespace, name in ((drivers.NAMESPACE, "fake"), ("taskflow.jobboards", "zookeeper"),
                            ("taskflow.engines", "serial")):
        stevedore_driver.DriverManager(namespace, name, invoke_on_load=False)


def _all_states():
    from taskflow import states as st
    return (st.PENDING, st.RUNNING, st.SUCCESS, st.FAILURE, st.REVERTING, st.REVERTED,
            st.REVERT_FAILURE, st.RETRYING, st.IGNORE, st.SUSPENDING, st.SUSPENDED,
            st.RESUMING)


def _die_with_parent():
    """A conductor outliving the test run would keep its ZooKeeper session
    and SQLite files: exit when the process that started it is gone."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(0.2)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run(args):
    """Load the configuration, attach the harness, run the conductor until
    SIGTERM; returns its exit status."""
    _die_with_parent()
    _warm_imports()
    import logging

    from taskflow.listeners import base as listener_base

    from migrateflow import drivers, engine, service
    from migrateflow.conf import CONF
    from migrateflow.db import api as db_api
    from migrateflow.drivers import fake as fake_driver

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kazoo").setLevel(logging.WARNING)
    CONF(args=[], project="migrateflow", default_config_files=args.config_file)
    label = args.label or str(os.getpid())
    _log("conductor %s: %s" % (label, vars(args)))

    states = _all_states()
    kill_name = kill_state = None
    if args.kill_at:
        kill_name, _, kill_state = args.kill_at.rpartition(":")
        if not kill_name or kill_state not in states:
            raise SystemExit("bad --kill-at %r: NAME:STATE expected" % args.kill_at)
    journal_fd = (os.open(args.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                  if args.journal else None)
    if args.events:
        from migrateflow import notifications
        events_fd = os.open(args.events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        notifications.subscribe(lambda message: os.write(events_fd, (json.dumps(
            dict(message, label=label)) + "\n").encode()))

    def kill(why):
        _log("SIGKILL self: " + why)
        os.kill(os.getpid(), signal.SIGKILL)

    class CrashHarness(listener_base.Listener):
        """Journals every state change; SIGKILLs the process at the chosen one.

        Registered for explicit states, not ANY: TaskFlow calls the ANY
        callbacks before the state-specific ones (flow_events.StepMirror's), and the kill
        must come after every product listener of that transition."""

        def __init__(self, engine_):
            super().__init__(engine_, task_listen_for=states, retry_listen_for=states,
                             flow_listen_for=states)

        def _event(self, kind, name, state):
            if journal_fd is not None:
                os.write(journal_fd, ("%s %s %s %s\n" % (label, kind, name, state)).encode())
            if name == kill_name and state == kill_state:
                kill("%s %s reached %s" % (kind, name, state))

        def _task_receiver(self, state, details):
            self._event("task", details["task_name"], state)

        def _retry_receiver(self, state, details):
            self._event("retry", details["retry_name"], state)

        def _flow_receiver(self, state, details):
            self._event("flow", "flow", state)

    class CrashConductor(engine.MigrationConductor):
        if args.wait_timeout is not None:
            WAIT_TIMEOUT = args.wait_timeout

        def _listeners_from_job(self, job, engine_):
            listeners = super()._listeners_from_job(job, engine_)
            listeners.append(CrashHarness(engine_))
            return listeners

    engine.MigrationConductor = CrashConductor  # what make_conductor builds
    if args.worker_idle is not None:
        from futurist import _thread as futurist_thread
        futurist_thread.ThreadWorker.MAX_IDLE_FOR = args.worker_idle

    if args.kill_on_job_status:
        real_get_job = fake_driver.FakeDriver.get_migration_job

        def get_migration_job(self, source, instance):
            job = real_get_job(self, source, instance)
            if job is not None and job["status"] == args.kill_on_job_status:
                kill("get_migration_job returned a %s job" % job["status"])
            return job

        fake_driver.FakeDriver.get_migration_job = get_migration_job

    engine.get_board(CONF)  # the ZooKeeper session first: it is the claim
    db_api.get_db(CONF)
    drivers.get_driver(CONF)
    _log("connected as %s" % engine.conductor_name(CONF))
    status = service.run_conductor(CONF)
    _log("conductor stopped, exit status %s" % status)
    return status


# -- the fork server ------------------------------------------------------------------
def _child(request):
    """In the forked child: output to the request's log, run, never return."""
    code = 1
    try:
        global _T0
        _T0 = time.monotonic()
        fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        code = run(parse_args(request["argv"])) or 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the log, exit 1
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def zygote():
    _warm_imports()
    _log("zygote ready")

    def say(line):
        os.write(1, (line + "\n").encode())

    def reap():
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            say("exited %d %d" % (pid, os.waitstatus_to_exitcode(wait_status)))

    say("ready")
    buf = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.02)
        reap()
        if not readable:
            continue
        data = os.read(0, 65536)
        if not data:
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(request)
            say("spawned %s %d" % (request["id"], pid))
    reap()
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.zygote:
        return zygote()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
