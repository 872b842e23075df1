"""The libvirt driver's live migration: start a peer-to-peer job with
migrateToURI3, watch it with jobStats, steer it (downtime, abort, post-copy
or pause to converge).

migrateToURI3 blocks until the job ends, so it runs in a thread of this
process; the job itself runs in the source's libvirtd and survives this
process (peer-to-peer).  What a later process needs is in the job record
(``storage.HostStorage.job``): the destination, the flags, whether an abort
or the post-copy switch was asked for, and how the job ended.  A job that
ended while no thread of this process watched it is settled from the
hypervisors (where does the guest run?).  Every steering call (jobStats,
migrateSetMaxDowntime, abortJob, migrateStartPostCopy) works on a job some
other process started: libvirt keeps a peer-to-peer job running when the
client that started it dies (measured: tests/test_libvirt_lab.py).
"""
import contextlib
import logging
import threading
import time

import libvirt

from migrateflow import exceptions
from migrateflow.drivers.libvirt import connection, events, guests, jobs
from migrateflow.drivers.libvirt.connection import libvirt_errors

LOG = logging.getLogger(__name__)

#: how long abort / force-complete wait for a job being set up to show in libvirt
STEER_WAIT_S = 10.0
_POLL_S = 0.1


#: how long a finished job's statistics are awaited from the job-completed event
EVENT_WAIT_S = 2.0


class LiveMigration:
    """Needs the driver's ``settings``, ``_conn``, ``_storage`` and ``_threads``."""

    def live_migration(self, source, instance, dest, migrate_data, params):
        uuid = instance["uuid"]
        if source == dest:
            raise exceptions.DriverError(f"cannot migrate {uuid} from {source} to itself")
        src_conn, dst_conn = self._conn(source), self._conn(dest)
        dom = guests.find(src_conn, uuid)
        if self._running_stats(dom) is not None or self._thread_alive(source, uuid):
            return
        incoming = guests.find(dst_conn, uuid)
        if incoming is not None and guests.power_state(incoming) == guests.RUNNING:
            return
        if dom is None or guests.power_state(dom) != guests.RUNNING:
            raise exceptions.DriverError(f"guest {uuid} is not running on {source}")
        if incoming is not None:
            raise exceptions.DriverError(f"guest {uuid} is already defined on {dest}")
        block = bool(migrate_data.get("block_migration"))
        flags = jobs.migration_flags(self.settings, block, params)
        old_dir = self._storage(source).instance_dir(uuid)
        new_dir = self._storage(dest).instance_dir(uuid)
        dest_xml = persist_xml = None
        if old_dir != new_dir:
            with libvirt_errors(f"reading the definition of guest {uuid} on {source}"):
                dest_xml = guests.moved(dom.XMLDesc(guests.XML_MIGRATABLE), old_dir, new_dir)
                if flags & libvirt.VIR_MIGRATE_PERSIST_DEST and dom.isPersistent():
                    persist_xml = guests.moved(
                        dom.XMLDesc(guests.XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_INACTIVE),
                        old_dir, new_dir)
        typed = jobs.migration_params(connection.migration_uri(self.settings, dest), params,
                                      dest_xml, persist_xml,
                                      self.settings.migration_listen_address)
        self._storage(source).save_job(uuid, {
            "dest": dest, "flags": flags, "block_migration": block,
            "post_copy_permitted": bool(flags & libvirt.VIR_MIGRATE_POSTCOPY),
            "post_copy": False, "aborted": False, "status": None, "error": None,
            "stats": None, "started_at": time.time()})
        dest_uri = connection.host_uri(self.settings, dest)
        thread = threading.Thread(target=self._run_job, name=f"migrate-{uuid[:8]}",
                                  args=(source, dest, uuid, dest_uri, typed, flags),
                                  daemon=True)
        self._threads[(source, uuid)] = {"thread": thread,
                                         "downtime_ms": params.get("downtime_ms")}
        LOG.info("live migration of %s: %s -> %s (%s) flags=%#x", uuid, source, dest,
                 dest_uri, flags)
        thread.start()

    def _run_job(self, source, dest, uuid, dest_uri, typed, flags):
        # a connection of its own: while migrateToURI3 runs, other calls on
        # its connection (jobStats, abortJob) would wait for it to return
        conn = event = None
        try:
            events.start_loop()
            conn = libvirt.open(connection.host_uri(self.settings, source))
            dom = conn.lookupByUUIDString(uuid)
            event = events.JobCompleted(conn, dom)
            dom.migrateToURI3(dest_uri, typed, flags)
        except libvirt.libvirtError as err:
            aborted = (self._storage(source).job(uuid) or {}).get("aborted")
            status = jobs.ended_status(err, aborted)
            LOG.info("live migration of %s %s: %s", uuid, status, err.get_error_message())
            self._end_job(source, uuid, status, error=err.get_error_message())
        except Exception as err:  # noqa: BLE001 - recorded for the watcher
            LOG.exception("live migration of %s failed", uuid)
            self._end_job(source, uuid, "failed", error=f"{type(err).__name__}: {err}")
        else:
            stats = self._completed_stats(dest, uuid)
            if not (stats or {}).get("downtime"):
                # post-copy: libvirt 9 keeps no completed statistics on the
                # destination; the source's job-completed event has them
                stats = event.wait(EVENT_WAIT_S) or stats
            self._end_job(source, uuid, "completed", stats=stats)
            LOG.info("live migration of %s to %s completed", uuid, dest)
        finally:
            if event is not None:
                event.close()
            if conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()

    def _end_job(self, source, uuid, status, error=None, stats=None):
        storage = self._storage(source)
        job = storage.job(uuid)
        if job is None:       # forgotten meanwhile (the source was cleaned up)
            return
        job.update(status=status, error=error, stats=stats)
        storage.save_job(uuid, job)

    def _completed_stats(self, dest, uuid):
        """Statistics of the finished job (the destination keeps them)."""
        try:
            dom = guests.find(self._conn(dest), uuid)
            return dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED) if dom else None
        except (libvirt.libvirtError, exceptions.DriverError) as err:
            LOG.warning("no statistics of the migration of %s: %s", uuid, err)
            return None

    def _thread_alive(self, source, uuid):
        local = self._threads.get((source, uuid))
        return local is not None and local["thread"].is_alive()

    @staticmethod
    def _running_stats(dom):
        """jobStats() of the outgoing migration running on ``dom``, or None."""
        if dom is None:
            return None
        try:
            stats = dom.jobStats()
        except libvirt.libvirtError:     # no domain any more, or not supported
            return None
        return stats if jobs.is_outgoing_migration(stats) else None

    def get_migration_job(self, source, instance):
        uuid = instance["uuid"]
        storage = self._storage(source)
        dom = guests.find(self._conn(source), uuid)
        stats = self._running_stats(dom)
        if stats is not None or self._thread_alive(source, uuid):
            if stats is not None:
                self._apply_pending_downtime(source, uuid, dom)
            job = storage.job(uuid) or {}
            post_copy = job.get("post_copy") or (dom is not None and self._post_copy(dom))
            return jobs.job_view(stats, "running", post_copy, memory_mb=instance["memory_mb"])
        job = storage.job(uuid)
        if job is None:
            return None
        if job["status"] is None:
            job = self._settle(source, uuid, job, dom)
        return jobs.job_view(job["stats"], job["status"], job["post_copy"], job["error"],
                             memory_mb=instance["memory_mb"])

    def wait_for_migration_job(self, source, instance, timeout):
        """Sleep ``timeout`` seconds, or less when the job this process runs
        ends first (its migrateToURI3 returned).  A job of another process
        is not waited for: the caller looks again after ``timeout``."""
        local = self._threads.get((source, instance["uuid"]))
        if local is not None and local["thread"].is_alive():
            local["thread"].join(timeout)
        else:
            time.sleep(timeout)

    @staticmethod
    def _post_copy(dom):
        try:
            return guests.paused_for_post_copy(dom)
        except libvirt.libvirtError:
            return False

    def _settle(self, source, uuid, job, dom):
        """How a job ended that no thread of this process watched: the
        guest running on the destination (and no longer on the source)
        means completed."""
        incoming = guests.find(self._conn(job["dest"]), uuid)
        source_runs = dom is not None and guests.power_state(dom) == guests.RUNNING
        if incoming is not None and guests.power_state(incoming) == guests.RUNNING \
                and not source_runs:
            job.update(status="completed", stats=self._completed_stats(job["dest"], uuid))
        elif job["aborted"]:
            job.update(status="cancelled", error="aborted")
        else:
            job.update(status="failed", error="the job ended while no process watched "
                       f"it; the guest stays on {source}")
        self._storage(source).save_job(uuid, job)
        return job

    def _apply_pending_downtime(self, source, uuid, dom):
        local = self._threads.get((source, uuid))
        if local is None or local["downtime_ms"] is None:
            return
        downtime, local["downtime_ms"] = local["downtime_ms"], None
        try:
            dom.migrateSetMaxDowntime(int(downtime), 0)
        except libvirt.libvirtError as err:
            LOG.warning("could not set the downtime of %s: %s", uuid,
                        err.get_error_message())

    def _wait_for_job(self, source, uuid, dom):
        """The running job's statistics, waiting while this process sets it
        up; None when no job runs (any more)."""
        deadline = time.monotonic() + STEER_WAIT_S
        while True:
            stats = self._running_stats(dom)
            if stats is not None or not self._thread_alive(source, uuid):
                return stats
            if time.monotonic() > deadline:
                raise exceptions.DriverError(
                    f"the migration job of {uuid} did not start within {STEER_WAIT_S} s")
            time.sleep(_POLL_S)

    def live_migration_set_downtime(self, source, instance, downtime_ms):
        uuid = instance["uuid"]
        dom = guests.find(self._conn(source), uuid)
        if self._running_stats(dom) is None:
            local = self._threads.get((source, uuid))
            if self._thread_alive(source, uuid):
                local["downtime_ms"] = downtime_ms        # set once the job shows
                return
            raise exceptions.InvalidMigrationState(
                f"no running migration of instance {uuid} from {source}")
        with libvirt_errors(f"setting the downtime of the migration of {uuid}"):
            dom.migrateSetMaxDowntime(int(downtime_ms), 0)

    def live_migration_abort(self, source, instance):
        uuid = instance["uuid"]
        storage = self._storage(source)
        dom = guests.find(self._conn(source), uuid)
        job = storage.job(uuid)
        running = self._running_stats(dom) is not None or self._thread_alive(source, uuid)
        if not running:
            if job is not None and job["status"] is None:
                job = self._settle(source, uuid, job, dom)
            if job is not None and job["status"] == "completed":
                raise exceptions.InvalidMigrationState(
                    f"migration of instance {uuid} from {source} cannot be aborted: "
                    "it completed")
            return
        if (job or {}).get("post_copy") or (dom is not None and self._post_copy(dom)):
            raise exceptions.InvalidMigrationState(
                f"migration of instance {uuid} from {source} cannot be aborted: post-copy")
        if job is not None and not job["aborted"]:
            job["aborted"] = True
            storage.save_job(uuid, job)
        deadline = time.monotonic() + STEER_WAIT_S
        while True:
            if self._wait_for_job(source, uuid, dom) is None:
                return                       # it ended meanwhile
            try:
                dom.abortJob()
                LOG.info("migration of %s from %s aborted", uuid, source)
                return
            except libvirt.libvirtError as err:
                if time.monotonic() > deadline:
                    raise exceptions.DriverError(
                        f"aborting the migration of {uuid}: {err.get_error_message()}"
                    ) from err
                time.sleep(_POLL_S)

    def live_migration_force_complete(self, source, instance):
        uuid = instance["uuid"]
        storage = self._storage(source)
        dom = guests.find(self._conn(source), uuid)
        if self._wait_for_job(source, uuid, dom) is None:
            raise exceptions.InvalidMigrationState(
                f"no running migration of instance {uuid} from {source}")
        job = storage.job(uuid) or {}
        with libvirt_errors(f"forcing the migration of {uuid} to complete"):
            if job.get("post_copy_permitted"):
                if not job.get("post_copy"):
                    dom.migrateStartPostCopy(0)
                    job["post_copy"] = True
                    storage.save_job(uuid, job)
            elif guests.power_state(dom) == guests.RUNNING:
                dom.suspend()      # a paused guest dirties nothing: the copy converges
