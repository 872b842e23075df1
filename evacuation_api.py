"""Evacuation off a dead host, a whole host's evacuation (Masakari's
host-failure recovery) and what a host does when it comes back: the part of
``MigrationAPI`` that drives the evacuation flow (a mixin; it uses the
API's ``db``, ``conf``, ``_launch``, ``_candidates`` and ``wait``).

Every request is validated before anything changes; a refused request
raises a ``migrateflow.exceptions`` error naming the reason.  Which stale
copies a returning host destroys is decided only from the evacuation
records, never from the host names of instances.
"""
import logging

from migrateflow import drivers
from migrateflow import exceptions as exc
from migrateflow import policy, scheduler
from migrateflow.db import api as db_api
from migrateflow.flows import evacuation
from migrateflow.keys import StoreKey
from migrateflow.states import MigrationType, MoveStatus, PowerState, TaskState, VmState

LOG = logging.getLogger(__name__)

#: evacuate_host's recovery methods (Masakari's)
RECOVERY_METHODS = ("auto", "reserved_host", "rh_priority")
#: vm_states an instance may be evacuated in (Nova's)
EVACUABLE = (VmState.ACTIVE, VmState.STOPPED, VmState.ERROR)
#: evacuations whose source copy is stale: in flight, or done and not
#: yet cleaned up by the source (Nova's _destroy_evacuated_instances)
SOURCE_COPY_STALE = (MoveStatus.ACCEPTED, MoveStatus.PRE_MIGRATING, MoveStatus.DONE)
#: evacuation statuses after which the instance lives on the destination
SUCCEEDED = (MoveStatus.DONE, MoveStatus.COMPLETED)


def check_source_down(host):
    """An evacuation needs its source host down (host row from the DB)."""
    if host["up"] and not host["forced_down"]:
        raise exc.InvalidRequest(
            f"source host {host['name']} is up: evacuation needs it down "
            "(forced down or fenced)")


def _entry(inst, action, **values):
    entry = {"instance": inst["uuid"], "name": inst["name"], "action": action,
             "migration": None, "status": None, "reason": None, "error": None}
    entry.update(values)
    return entry


class EvacuationOps:
    """evacuate, evacuate_host, host_started."""

    # -- one instance -------------------------------------------------------------
    def evacuate(self, instance_id, host=None, wait=True):
        """Rebuild ``instance_id`` of a dead host on ``host`` (or the best
        candidate, trying the next on failure).  The instance may be active,
        stopped or in error.  The record ends ``done`` (``completed`` once the
        source destroyed its copy) or ``failed`` (rolled back: the instance
        in vm_state error on its source, to be evacuated again)."""
        with self._caller(policy.EVACUATE):
            mig, store = self._accept_evacuation(instance_id, host)
            return self._launch(evacuation.build, store, mig, wait)

    def _accept_evacuation(self, instance_id, host, reserved=(), reserved_only=False):
        db = self.db
        if host is not None:
            scheduler.validate_host_name(host)
        inst = db.get_instance(instance_id)
        scheduler.check_idle(inst)
        if inst["vm_state"] not in EVACUABLE:
            raise exc.InstanceInvalidState(
                f"instance {instance_id} is {inst['vm_state']}: only an active, stopped or "
                "error instance can be evacuated")
        if not inst["host"]:
            raise exc.InstanceInvalidState(f"instance {instance_id} has no host")
        source = db.get_host(inst["host"])
        check_source_down(source)
        candidates, refused = self._evacuation_candidates(inst, source, host, reserved,
                                                          reserved_only)
        mig = db.start_migration(
            instance_id, migration_type=MigrationType.EVACUATION,
            task_state=TaskState.REBUILDING, source_host=source["name"],
            requested_dest=host, status=MoveStatus.ACCEPTED,
            memory_total_mb=inst["memory_mb"], disk_total_gb=inst["disk_gb"],
            scheduler_notes=refused)
        store = {
            StoreKey.MIGRATION_ID: mig["uuid"],
            StoreKey.INSTANCE_ID: instance_id,
            StoreKey.SOURCE_HOST: source["name"],
            StoreKey.CANDIDATES: candidates,
            # as Nova's rebuild: only an instance that was stopped stays off
            StoreKey.POWER_ON: inst["vm_state"] != VmState.STOPPED,
        }
        LOG.info("evacuation accepted migration=%s instance=%s source=%s candidates=%s",
                 mig["uuid"], instance_id, source["name"], ",".join(map(str, candidates)))
        return mig, store

    def _evacuation_candidates(self, inst, source, host, reserved, reserved_only):
        """(destinations to try then None, {refused host: reason}): the
        reserved hosts first (in the order given), then, unless
        ``reserved_only``, every other host the scheduler accepts."""
        if host is not None or not reserved:
            return self._candidates(inst, source, host, None)
        others = [h for h in self.db.list_hosts() if h["name"] != source["name"]]
        groups = [sorted((h for h in others if h["name"] in reserved),
                         key=lambda h: reserved.index(h["name"]))]
        if not reserved_only:
            groups.append([h for h in others if h["name"] not in reserved])
        names, refused = [], {}
        for index, group in enumerate(groups):
            usable = []
            for dest in group:
                try:
                    scheduler.check_destination(inst, source, dest)
                except exc.MigrateflowError as err:
                    refused[dest["name"]] = err.message
                else:
                    usable.append(dest)
            names += ([h["name"] for h in usable] if index == 0
                      else scheduler.candidate_hosts(inst, source, usable))
        if self.conf.migrate_max_retries >= 0:
            names = names[:self.conf.migrate_max_retries + 1]
        if not names:
            detail = "; ".join(f"{h}: {r}" for h, r in refused.items()) or "no other hosts"
            raise exc.NoValidHost(f"no valid host for instance {inst['uuid']}: {detail}")
        return names + [None], refused

    # -- a whole host ---------------------------------------------------------------
    def evacuate_host(self, host, *, recovery_method="auto", reserved_hosts=(),
                      progress=None):
        """Evacuate every instance of the dead ``host``, one after another.

        ``recovery_method``: ``auto`` (the scheduler chooses),
        ``reserved_host`` (only onto ``reserved_hosts``, enabled first if
        disabled) or ``rh_priority`` (reserved hosts first, then any).
        ``progress(done, total, result)`` is called after each instance.
        Returns {host, recovery_method, total, succeeded, failed, results:
        [{instance, name, migration, status, dest, error}]}; an instance
        refused before anything started has status ``refused``.
        """
        with self._caller(policy.HOST_EVACUATE):
            return self._evacuate_host(host, recovery_method, reserved_hosts, progress)

    def _evacuate_host(self, host, recovery_method, reserved_hosts, progress):
        reserved = self._accept_host_evacuation(host, recovery_method, reserved_hosts)
        if recovery_method != "auto":
            for name in reserved:
                if self.db.get_host(name)["disabled"]:
                    # Masakari enables a reserved host's compute service first
                    self.db.update_host(name, disabled=False, disabled_reason=None)
                    LOG.info("reserved host %s enabled for the evacuation of %s", name, host)
        instances = self.db.list_instances(host=host)
        results = []
        for inst in instances:
            result = self._evacuate_one(inst, reserved, recovery_method == "reserved_host")
            results.append(result)
            if progress is not None:
                progress(len(results), len(instances), result)
        succeeded = sum(r["status"] in SUCCEEDED for r in results)
        LOG.info("host %s evacuated: %d of %d instances", host, succeeded, len(results))
        return {"host": host, "recovery_method": recovery_method, "total": len(results),
                "succeeded": succeeded, "failed": len(results) - succeeded,
                "results": results}

    def _accept_host_evacuation(self, host, recovery_method, reserved_hosts):
        scheduler.validate_host_name(host)
        if recovery_method not in RECOVERY_METHODS:
            raise exc.InvalidRequest(
                f"unknown recovery method {recovery_method!r}: one of "
                f"{', '.join(RECOVERY_METHODS)}")
        if isinstance(reserved_hosts, str):
            raise exc.InvalidRequest(
                f"reserved_hosts must be a list of host names, not {reserved_hosts!r}")
        reserved = list(dict.fromkeys(reserved_hosts or ()))
        for name in reserved:
            scheduler.validate_host_name(name)
        check_source_down(self.db.get_host(host))
        for name in reserved:
            self.db.get_host(name)
        if host in reserved:
            raise exc.InvalidRequest(f"reserved host {host} is the host to evacuate")
        if recovery_method == "reserved_host" and not reserved:
            raise exc.InvalidRequest("recovery method reserved_host needs reserved_hosts")
        if recovery_method == "auto" and reserved:
            raise exc.InvalidRequest(
                "reserved_hosts are only used by the reserved_host and rh_priority "
                "recovery methods")
        return reserved

    def _evacuate_one(self, inst, reserved, reserved_only):
        result = {"instance": inst["uuid"], "name": inst["name"], "migration": None,
                  "status": "refused", "dest": None, "error": None}
        try:
            mig, store = self._accept_evacuation(inst["uuid"], None, reserved, reserved_only)
            mig = self._launch(evacuation.build, store, mig, True)
        except exc.MigrateflowError as err:
            result["error"] = err.message
            return result
        result.update(migration=mig["uuid"], status=mig["status"], error=mig["error"],
                      dest=mig["dest_host"] if mig["status"] in SUCCEEDED else None)
        return result

    # -- the dead host comes back -------------------------------------------------
    def host_started(self, host):
        """What a compute host does when it starts again: destroy the stale
        copy of every instance its evacuation records name (in flight or
        done), mark those records cleaned (done → completed), start the
        guests of the instances that live there and should run, and mark the
        host up (forced_down is left to the operator).  The hypervisor must
        answer (HostUnavailable otherwise, nothing changed).  Returns one
        report per instance: {instance, name, action, migration, status,
        reason, error}; action is destroyed, started, running, left or
        failed."""
        with self._caller(policy.HOST_UPDATE):
            return self._host_started(host)

    def _host_started(self, host):
        scheduler.validate_host_name(host)
        db = self.db
        source = db.get_host(host)
        driver = drivers.get_driver(self.conf)
        try:
            driver.get_host_info(host)
        except exc.DriverError as err:
            raise exc.HostUnavailable(
                f"host {host} cannot start: its hypervisor does not answer ({err})") from err
        report, stale = [], set()
        for mig in db.list_migrations(migration_type=MigrationType.EVACUATION,
                                      source_host=host):
            if mig["status"] in SOURCE_COPY_STALE:
                stale.add(mig["instance_uuid"])
                report.append(self._destroy_evacuated(driver, source, mig))
        for inst in db.list_instances(host=host):
            if inst["uuid"] not in stale:
                report.append(self._resume_guest(driver, host, inst))
        db.update_host(host, up=True)
        LOG.info("host %s started: %s", host,
                 ", ".join(f"{e['name']}={e['action']}" for e in report) or "no instances")
        return report

    def _destroy_evacuated(self, driver, source, mig):
        inst = self.db.get_instance(mig["instance_uuid"])
        keep_disk = self._shares_disk(source, mig["dest_host"])
        try:
            driver.destroy(source["name"], db_api.instance_to_driver(inst),
                           destroy_disks=not keep_disk)
        except exc.DriverError as err:
            LOG.error("stale copy of %s on %s not destroyed: %s", inst["uuid"],
                      source["name"], err)
            return _entry(inst, "failed", migration=mig["uuid"], status=mig["status"],
                          error=f"destroying the evacuated copy failed: {err}")
        status = self.db.mark_source_cleaned(mig["uuid"])
        kept = " (disk kept: the destination shares it or is not chosen yet)"
        return _entry(inst, "destroyed", migration=mig["uuid"], status=status,
                      reason="evacuated" + (kept if keep_disk else ""))

    def _shares_disk(self, source, dest_name):
        """Keep the instance's disk on the source's storage: the destination
        is not known yet, or it shares that storage (DB storage groups)."""
        dest = self.db.find_host(dest_name) if dest_name else None
        if dest is None:
            return True
        return bool(source["shared_storage"]) and \
            dest["shared_storage"] == source["shared_storage"]

    @staticmethod
    def _resume_guest(driver, host, inst):
        if inst["task_state"] is not None:
            return _entry(inst, "left", reason=f"busy: task_state {inst['task_state']}")
        if inst["vm_state"] != VmState.ACTIVE or inst["power_state"] != PowerState.RUNNING:
            return _entry(inst, "left", reason=f"{inst['vm_state']}/{inst['power_state']}: "
                          "not meant to run")
        try:
            guest = driver.get_guest(host, inst["uuid"])
            if guest is None:
                return _entry(inst, "failed", error=f"no guest of the instance on {host}")
            if guest["state"] == PowerState.RUNNING:
                return _entry(inst, "running")
            driver.power_on(host, db_api.instance_to_driver(inst))
        except exc.DriverError as err:
            return _entry(inst, "failed", error=f"could not start the guest: {err}")
        return _entry(inst, "started")
