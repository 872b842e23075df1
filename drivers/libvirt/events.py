"""libvirt events in this process: the default event loop in a daemon
thread, and the job-completed event of a domain.

The event is how a post-copy migration's statistics (its downtime) are
known: libvirt 9 keeps no completed statistics for it on the destination,
and the source's domain is gone once the job ended.
"""
import contextlib
import logging
import threading
import time

import libvirt

LOG = logging.getLogger(__name__)
RETRY_S = 0.1
_event_loop = {"started": False}
_event_loop_lock = threading.Lock()


def start_loop():
    """libvirt's default event loop, in a daemon thread of this process
    (once; connections opened before it deliver no events)."""
    with _event_loop_lock:
        if _event_loop["started"]:
            return
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_events, name="libvirt-events", daemon=True).start()
        _event_loop["started"] = True


def _run_events():
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as err:
            LOG.warning("libvirt event loop: %s", err.get_error_message())
            time.sleep(RETRY_S)


class JobCompleted:
    """The statistics libvirt sends with the job-completed event of ``dom``."""

    def __init__(self, conn, dom):
        self._conn, self._stats, self._done = conn, None, threading.Event()
        self._id = conn.domainEventRegisterAny(
            dom, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._received, None)

    def _received(self, _conn, _dom, params, _opaque):
        self._stats = dict(params)
        self._done.set()

    def wait(self, timeout):
        self._done.wait(timeout)
        return self._stats

    def close(self):
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.domainEventDeregisterAny(self._id)
