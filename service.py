"""The conductor process: claims migration jobs from the ZooKeeper
jobboard and runs them, sweeps stuck migrations, confirms resizes older
than ``resize_confirm_window`` (when above 0), stops cleanly on SIGTERM.

A stopped conductor suspends its running flows at the next step boundary
and abandons their jobs, so another conductor resumes them; a killed one
loses its claims when its ZooKeeper session expires, with the same result.
"""
import logging
import signal
import threading

from migrateflow import api, engine, lifecycle, sweeper
from migrateflow.conf import CONF

LOG = logging.getLogger(__name__)


def run_conductor(conf=CONF, stop_event=None, sweep=True):
    """Run until SIGTERM/SIGINT (or ``stop_event``); returns 0."""
    stop_event = stop_event or threading.Event()
    name = engine.conductor_name(conf)
    conductor = engine.make_conductor(conf)
    conductor.notifier.register("job_consumed", _log_event("job consumed"))
    conductor.notifier.register("job_abandoned", _log_event("job abandoned"))

    def request_stop(signum=None, _frame=None):
        if signum is not None:
            LOG.info("conductor=%s signal=%s: stopping after the current steps",
                     name, signum)
        stop_event.set()
        lifecycle.STOPPING.set()  # long steps detach instead of holding the stop
        conductor.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    watcher = threading.Thread(target=_watch_stop, args=(stop_event, request_stop),
                               name="conductor-stop", daemon=True)
    watcher.start()
    if sweep:
        threading.Thread(target=_sweep_loop, args=(conf, stop_event), name="sweeper",
                         daemon=True).start()
    threading.Thread(target=_auto_confirm_loop, args=(conf, stop_event),
                     name="auto-confirm", daemon=True).start()
    LOG.info("conductor=%s workers=%s board=%s started", name,
             conf.jobboard.conductor_workers, ",".join(conf.jobboard.hosts))
    lifecycle.STOPPING.clear()
    try:
        conductor.run()
    finally:
        conductor.wait(timeout=60)
        conductor.close()
        lifecycle.STOPPING.clear()
        LOG.info("conductor=%s stopped", name)
    return 0


def _watch_stop(stop_event, request_stop):
    stop_event.wait()
    request_stop()


def _sweep_loop(conf, stop_event):
    interval = max(1.0, conf.jobboard.stuck_after / 2.0)
    while not stop_event.wait(interval):
        try:
            sweeper.sweep(conf)
        except Exception:  # noqa: BLE001 - the next round tries again
            LOG.exception("sweep failed")


def auto_confirm_interval(conf):
    """How often finished resizes are checked against resize_confirm_window
    (Nova polls every 60 s; a short window is checked more often)."""
    window = conf.resize_confirm_window
    return 60.0 if window <= 0 else max(1.0, min(60.0, window / 2.0))


def _auto_confirm_loop(conf, stop_event):
    while not stop_event.wait(auto_confirm_interval(conf)):
        if conf.resize_confirm_window <= 0:
            continue
        try:
            api.MigrationAPI(conf).confirm_expired_resizes()
        except Exception:  # noqa: BLE001 - the next round tries again
            LOG.exception("auto-confirm failed")


def _log_event(what):
    def receiver(state, details):
        job = details.get("job")
        LOG.info("%s job=%s", what, getattr(job, "uuid", job))
    return receiver
