"""Cold migration, resize, confirm, revert and auto-confirm: the part of
``MigrationAPI`` that drives the resize flows (a mixin; it uses the API's
``db``, ``conf``, ``_launch`` and ``wait``).

Every request is validated before anything changes; a refused request
raises a ``migrateflow.exceptions`` error naming the reason.
"""
import logging
import time

from migrateflow import exceptions as exc
from migrateflow import policy, scheduler
from migrateflow.db.resizes import flavor_of
from migrateflow.flows import confirm_resize, resize, revert_resize
from migrateflow.keys import StoreKey
from migrateflow.states import MigrationType, MoveStatus, PowerState, TaskState, VmState

LOG = logging.getLogger(__name__)

#: migration types the resize flows move
RESIZE_TYPES = (MigrationType.RESIZE, MigrationType.COLD)


class ResizeOps:
    """migrate, resize, confirm_resize, revert_resize, confirm_expired_resizes."""

    def migrate(self, instance_id, host=None, wait=True):
        """Cold-migrate ``instance_id`` (active or stopped) to ``host`` or the
        best candidate; its flavor is kept.  The record ends ``finished``
        (confirm or revert it) or ``error`` (rolled back to the source)."""
        with self._caller(policy.MIGRATE):
            return self._resize(instance_id, None, host, wait)

    def resize(self, instance_id, flavor, host=None, wait=True):
        """Resize ``instance_id`` to the flavor named ``flavor`` (on another
        host, or the same one with allow_resize_to_same_host)."""
        with self._caller(policy.RESIZE, self._instance_project(instance_id)):
            if not isinstance(flavor, str) or not flavor:
                raise exc.InvalidRequest(f"malformed flavor name {flavor!r}")
            return self._resize(instance_id, flavor, host, wait)

    def _resize(self, instance_id, flavor_name, host, wait):
        mig, store = self._accept_resize(instance_id, flavor_name, host)
        return self._launch(resize.build, store, mig, wait,
                            on_refused=lambda reason: self.db.abandon_resize(
                                mig["uuid"], instance_id, MoveStatus.ERROR,
                                expected_statuses=[MoveStatus.PRE_MIGRATING], error=reason))

    def _accept_resize(self, instance_id, flavor_name, host):
        db = self.db
        if host is not None:
            scheduler.validate_host_name(host)
        inst = db.get_instance(instance_id)
        old = flavor_of(inst)
        new = db.get_flavor(flavor_name) if flavor_name is not None else old
        kind = "migrate" if flavor_name is None else "resize"
        scheduler.check_idle(inst)
        if inst["vm_state"] not in (VmState.ACTIVE, VmState.STOPPED):
            raise exc.InstanceInvalidState(
                f"instance {instance_id} is {inst['vm_state']}: only an active or stopped "
                f"instance can {kind}")
        if flavor_name is not None:
            if new["name"] == old["name"]:
                raise exc.InvalidRequest(
                    f"instance {instance_id} already has flavor {new['name']!r}: a resize "
                    "must change the flavor")
            if not inst["volume_backed"] and new["disk_gb"] < old["disk_gb"]:
                raise exc.InvalidRequest(
                    f"flavor {new['name']!r} does not fit instance {instance_id}: its disk "
                    f"({new['disk_gb']} GB) is smaller than the instance's "
                    f"({old['disk_gb']} GB) and disks cannot shrink")
        source = db.get_host(inst["host"])
        scheduler.check_host_usable(source, "source")
        candidates, refused = self._resize_candidates(inst, new, source, host,
                                                      same_host_ok=flavor_name is not None)
        mig = db.start_migration(
            instance_id, task_state=TaskState.RESIZE_PREP, source_host=source["name"],
            migration_type=MigrationType.RESIZE if flavor_name else MigrationType.COLD,
            status=MoveStatus.PRE_MIGRATING, requested_dest=host,
            memory_total_mb=new["memory_mb"], disk_total_gb=new["disk_gb"],
            scheduler_notes=refused, old_flavor=old, new_flavor=new,
            quota={"project_id": inst["project_id"],
                   "cores": new["vcpus"] - old["vcpus"],
                   "ram_mb": new["memory_mb"] - old["memory_mb"]})
        store = {
            StoreKey.MIGRATION_ID: mig["uuid"],
            StoreKey.INSTANCE_ID: instance_id,
            StoreKey.SOURCE_HOST: source["name"],
            StoreKey.CANDIDATES: candidates,
            StoreKey.OLD_FLAVOR: old,
            StoreKey.NEW_FLAVOR: new,
            StoreKey.POWER_ON: inst["power_state"] == PowerState.RUNNING,
        }
        LOG.info("%s accepted migration=%s instance=%s source=%s flavor=%s->%s "
                 "candidates=%s", kind, mig["uuid"], instance_id, source["name"],
                 old["name"], new["name"], ",".join(map(str, candidates)))
        return mig, store

    def _resize_candidates(self, inst, flavor, source, host, same_host_ok):
        """(up to three destinations then None, {refused host: reason})."""
        sized = dict(inst, memory_mb=flavor["memory_mb"], vcpus=flavor["vcpus"],
                     disk_gb=flavor["disk_gb"])
        allow_same = same_host_ok and self.conf.allow_resize_to_same_host
        if host is not None:
            dest = self.db.get_host(host)
            if host == source["name"]:
                if not allow_same:
                    why = ("a cold migration must change host" if not same_host_ok else
                           "resize to the same host needs allow_resize_to_same_host")
                    raise exc.InvalidRequest(
                        f"destination {host} is the instance's current host: {why}")
                self._check_same_host(sized, inst, dest)
            else:
                scheduler.check_destination(sized, source, dest)
            return [host], {}
        usable, refused = [], {}
        for dest in self.db.list_hosts():
            try:
                if dest["name"] == source["name"]:
                    if not allow_same:
                        continue
                    self._check_same_host(sized, inst, dest)
                else:
                    scheduler.check_destination(sized, source, dest)
            except exc.MigrateflowError as err:
                refused[dest["name"]] = err.message
            else:
                usable.append(dest)
        usable.sort(key=lambda h: (-scheduler.free_memory_mb(h), h["name"]))
        names = [h["name"] for h in usable][:resize.MAX_ATTEMPTS]
        if not names:
            detail = "; ".join(f"{h}: {r}" for h, r in refused.items()) or "no other hosts"
            raise exc.NoValidHost(
                f"no valid host for instance {inst['uuid']} with flavor "
                f"{flavor['name']!r}: {detail}")
        return names + [None], refused

    @staticmethod
    def _check_same_host(sized, inst, host):
        """The source holds the old flavor until confirm: the new one must
        fit beside it."""
        scheduler.check_host_usable(host, "destination")
        if scheduler.free_memory_mb(host) < sized["memory_mb"]:
            raise exc.InsufficientResources(
                f"not enough memory on {host['name']} for the new flavor beside the old "
                f"one: {sized['memory_mb']} MB needed, {scheduler.free_memory_mb(host)} "
                "MB free")

    # -- confirm / revert -------------------------------------------------------
    def confirm_resize(self, migration_id, wait=True):
        """finished → confirming → confirmed: the source guest is destroyed
        and the source's resources released."""
        with self._caller(policy.CONFIRM_RESIZE, self._migration_project(migration_id)):
            return self._confirm_resize(migration_id, wait)

    def _confirm_resize(self, migration_id, wait):
        mig = self._claim_finished(migration_id, MoveStatus.CONFIRMING, "confirmed")
        store = {StoreKey.MIGRATION_ID: migration_id,
                 StoreKey.INSTANCE_ID: mig["instance_uuid"],
                 StoreKey.SOURCE_HOST: mig["source_host"],
                 StoreKey.DEST_HOST: mig["dest_host"]}
        return self._launch(confirm_resize.build, store, self.db.get_migration(migration_id),
                            wait, on_refused=lambda reason: self._unclaim(mig, reason))

    def revert_resize(self, migration_id, wait=True):
        """finished → reverting → reverted: the destination guest is
        destroyed, the source guest restarted with the old flavor."""
        with self._caller(policy.REVERT_RESIZE, self._migration_project(migration_id)):
            return self._revert_resize(migration_id, wait)

    def _revert_resize(self, migration_id, wait):
        mig = self._claim_finished(migration_id, MoveStatus.REVERTING, "reverted")
        inst = self.db.get_instance(mig["instance_uuid"])
        self.db.update_instance(mig["instance_uuid"], task_state=TaskState.RESIZE_REVERTING)
        store = {StoreKey.MIGRATION_ID: migration_id,
                 StoreKey.INSTANCE_ID: mig["instance_uuid"],
                 StoreKey.SOURCE_HOST: mig["source_host"],
                 StoreKey.DEST_HOST: mig["dest_host"],
                 StoreKey.OLD_FLAVOR: mig["old_flavor"],
                 StoreKey.POWER_ON: inst["power_state"] == PowerState.RUNNING}
        return self._launch(revert_resize.build, store, self.db.get_migration(migration_id),
                            wait, on_refused=lambda reason: self._unclaim(mig, reason))

    def _claim_finished(self, migration_id, status, verb):
        mig = self.db.get_migration(migration_id)
        if mig["migration_type"] not in RESIZE_TYPES:
            raise exc.InvalidMigrationState(
                f"migration {migration_id} is a {mig['migration_type']}: only a resize or "
                f"cold migration can be {verb}")
        inst = self.db.get_instance(mig["instance_uuid"])
        if mig["status"] != MoveStatus.FINISHED:
            raise exc.InvalidMigrationState(
                f"migration {migration_id} is {mig['status']}: only a finished resize or "
                f"cold migration can be {verb}")
        scheduler.check_idle(inst)
        if not self.db.update_migration(migration_id, expected_statuses=[MoveStatus.FINISHED],
                                        status=status, error=None):
            raise exc.InvalidMigrationState(
                f"migration {migration_id} is being confirmed or reverted already")
        LOG.info("resize %s requested migration=%s", status, migration_id)
        return mig

    def _unclaim(self, mig, reason):
        self.db.update_migration(mig["uuid"], status=MoveStatus.FINISHED, error=reason)
        self.db.update_instance(mig["instance_uuid"], task_state=None)

    def confirm_expired_resizes(self, now=None):
        """Confirm every resize finished more than ``resize_confirm_window``
        seconds ago (nothing when the window is 0).  Returns [(migration,
        status or error)]; one failure does not stop the others."""
        window = self.conf.resize_confirm_window
        if window <= 0:
            return []
        bound = (now or time.time()) - window
        done = []
        for mig in self.db.list_migrations(status=MoveStatus.FINISHED):
            if mig["migration_type"] not in RESIZE_TYPES or (mig["finished_at"] or 0) > bound:
                continue
            try:
                outcome = self.confirm_resize(mig["uuid"], wait=True)["status"]
            except exc.MigrateflowError as err:
                outcome = f"{type(err).__name__}: {err}"
            LOG.info("auto-confirm migration=%s outcome=%s", mig["uuid"], outcome)
            done.append((mig["uuid"], outcome))
        return done
