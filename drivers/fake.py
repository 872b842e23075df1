"""FakeDriver: deterministic model hypervisors shared by several processes.

All state (hosts, guests, files, VIFs, volume connections, migration jobs,
faults, side-effect counters, timeline) lives in one SQLite file
(``fake_model.StateStore``) so a controller, its workers and a test see the
same cloud.  Every contract method is idempotent, counts a side effect only
when it changed something, and passes through a fault hook at entry
("before") and after its side effect was committed ("after").  Cold
migration and evacuation are in ``fake_cold`` and ``fake_evac``, the test and
demo helpers (building the cloud, looking into it, faults) in
``fake_helpers``.
"""
import json
import logging
import os

from migrateflow import exceptions, lifecycle
from migrateflow.drivers import base
from migrateflow.drivers import fake_cold, fake_evac, fake_helpers
from migrateflow.drivers import fake_jobs as jobs
from migrateflow.drivers import fake_model as model

LOG = logging.getLogger(__name__)

RUNNING, PAUSED, SHUTDOWN = model.RUNNING, model.PAUSED, model.SHUTDOWN


_hooked = model.hooked
_probe_path = model.probe_path


def _check_cpu(host, source_cpu):
    missing = sorted(set(source_cpu["cpu_features"]) - set(json.loads(host["cpu_features"])))
    if missing:
        raise exceptions.CPUIncompatible(
            f"host {host['name']} lacks CPU features {', '.join(missing)} of "
            f"source CPU {source_cpu.get('cpu_model')}")


class FakeDriver(fake_cold.ColdMigration, fake_evac.Evacuation, fake_helpers.Helpers,
                 base.ComputeDriver):
    """Model hypervisors in a SQLite file; see the module docstring."""

    LOCAL_CALLS = True  # a local file; its simulated waits give the turn away

    def __init__(self, state_file, time_scale=0.0):
        self.state_file = os.path.abspath(state_file)
        self.time_scale = float(time_scale)
        self._store = model.StateStore(self.state_file)

    @classmethod
    def cache_key(cls, conf):
        path = conf.fake_driver.state_file or os.path.join(conf.state_path,
                                                           "fake-hypervisor.sqlite")
        return (os.path.abspath(path), float(conf.fake_driver.time_scale))

    @classmethod
    def from_conf(cls, conf):
        return cls(*cls.cache_key(conf))

    def _tx(self, write=True):
        return self._store.transaction(write)

    # -- host facts --------------------------------------------------------------
    @_hooked
    def get_host_info(self, host):
        with self._tx(write=False) as db:
            return model.host_info(db, model.get_host(db, host))

    @_hooked
    def compare_cpu(self, host, source_cpu):
        with self._tx(write=False) as db:
            _check_cpu(model.get_host(db, host), source_cpu)

    @_hooked
    def get_guest(self, host, instance_uuid):
        with self._tx(write=False) as db:
            model.get_host(db, host)
            row = model.get_guest(db, host, instance_uuid)
        return _guest_view(row) if row else None

    @_hooked
    def list_guests(self, host):
        with self._tx(write=False) as db:
            model.get_host(db, host)
            rows = db.execute("SELECT * FROM guests WHERE host = ? ORDER BY uuid", (host,))
            return [_guest_view(row) for row in rows]

    # -- checks ------------------------------------------------------------------
    @_hooked
    def check_can_live_migrate_destination(self, dest, instance, source_host_info,
                                           block_migration):
        uuid = instance["uuid"]
        probe = _probe_path(uuid)
        with self._tx() as db:
            host = model.get_host(db, dest)
            _check_cpu(host, source_host_info)
            disk_free = model.host_info(db, host)["disk_free_gb"]
            if block_migration and disk_free < (instance.get("disk_gb") or 0):
                raise exceptions.InsufficientResources(
                    f"host {dest} has {disk_free} GB free, instance {uuid} needs "
                    f"{instance['disk_gb']} GB for a block migration")
            if model.ensure_file(db, model.storage_of(host), probe, uuid, 0):
                model.record_change(db, "check_can_live_migrate_destination", dest, uuid)
        return {"dest": dest, "probe_file": probe, "disk_available_gb": disk_free,
                "block_migration": block_migration}

    @_hooked
    def cleanup_live_migration_destination_check(self, dest, instance, dest_check_data):
        path = (dest_check_data or {}).get("probe_file") or _probe_path(instance["uuid"])
        with self._tx() as db:
            where = model.storage_of(model.get_host(db, dest))
            probe = model.file_row(db, where, path)
            if probe is not None:
                model.delete(db, "files", "location = ? AND path = ?", (where, probe["path"]))
                model.record_change(db, "cleanup_live_migration_destination_check", dest,
                                    probe["instance"])

    @_hooked
    def check_can_live_migrate_source(self, source, instance, dest_check_data):
        with self._tx(write=False) as db:
            where = model.storage_of(model.get_host(db, source))
            shared = model.file_row(db, where, dest_check_data["probe_file"]) is not None
        return base.source_migrate_data(source, instance, dest_check_data, shared)

    # -- destination preparation -----------------------------------------------
    @_hooked
    def pre_live_migration(self, dest, instance, block_device_info, network_info,
                           migrate_data):
        uuid = instance["uuid"]
        with self._tx() as db:
            where = model.storage_of(model.get_host(db, dest))
            changed = model.ensure_file(db, where, model.instance_dir(uuid), uuid,
                                        instance.get("disk_gb") or 0)
            changed |= model.attach_guest(db, dest, uuid, block_device_info, network_info)
            if changed:
                model.record_change(db, "pre_live_migration", dest, uuid)
        return dict(migrate_data or {})

    @_hooked
    def rollback_live_migration_at_destination(self, dest, instance, block_device_info,
                                               network_info, migrate_data):
        uuid = instance["uuid"]
        with self._tx() as db:
            host = model.get_host(db, dest)
            if self._only_running_copy(db, dest, uuid):
                LOG.warning("not rolling back %s on %s: it is the only running copy",
                            uuid, dest)
                return
            changed = model.remove_guest(db, dest, uuid)
            changed |= model.release_host_resources(db, dest, uuid)
            changed |= model.drop_instance_dir(db, host, uuid)
            if changed:
                model.record_change(db, "rollback_live_migration_at_destination", dest, uuid)

    @staticmethod
    def _only_running_copy(db, host, uuid):
        states = dict(db.execute("SELECT host, state FROM guests WHERE uuid = ?", (uuid,)))
        running = [name for name, state in states.items() if state == RUNNING]
        return running == [host]

    # -- the move ------------------------------------------------------------------
    @_hooked
    def live_migration(self, source, instance, dest, migrate_data, params):
        uuid = instance["uuid"]
        if source == dest:
            raise exceptions.DriverError(f"cannot migrate {uuid} from {source} to itself")
        with self._tx() as db:
            links = [model.get_host(db, name)["link_mbps"] for name in (source, dest)]
            job, _ = jobs.job_of(db, source, uuid)
            incoming = model.get_guest(db, dest, uuid)
            if (job is not None and job["status"] == "running") or (
                    incoming is not None and incoming["state"] == RUNNING):
                return
            guest = model.get_guest(db, source, uuid)
            if guest is None or guest["state"] != RUNNING:
                raise exceptions.DriverError(f"guest {uuid} is not running on {source}")
            if incoming is not None:
                raise exceptions.DriverError(f"guest {uuid} is already defined on {dest}")
            sim = jobs.new_simulation(guest["memory_mb"],
                                       params.get("bandwidth_mbps") or min(links), params)
            db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, 'running', NULL, ?)",
                       (uuid, source, dest, json.dumps(sim)))
            model.define_guest(db, dest, dict(guest), PAUSED, persistent=False)
            model.record_change(db, "live_migration", source, uuid)
            model.record_event(db, "migration.started", source, uuid)

    def get_migration_job(self, source, instance):
        """Advance the job by one iteration (unless stalled by a hang fault)
        and return it; hooked by hand because a hang here stalls instead."""
        uuid = instance["uuid"]
        armed = self._store.faults_armed()
        stalled = model.fire_fault(self._store, "get_migration_job", source, uuid,
                                   "before", armed) == "stall"
        duration, view = 0.0, None
        with self._tx() as db:
            model.get_host(db, source)
            row, sim = jobs.job_of(db, source, uuid)
            if row is not None:
                if row["status"] == "running" and not stalled:
                    duration = jobs.advance_job(db, row, sim)
                    row, sim = jobs.job_of(db, source, uuid)
                view = jobs.job_view(sim, row["status"], row["error"])
        if self.time_scale > 0 and duration > 0:
            lifecycle.sleep(duration * self.time_scale)  # the simulated copy
        model.fire_fault(self._store, "get_migration_job", source, uuid, "after", armed)
        return view

    @_hooked
    def live_migration_set_downtime(self, source, instance, downtime_ms):
        uuid = instance["uuid"]
        with self._tx() as db:
            model.get_host(db, source)
            row, sim = jobs.running_job(db, source, uuid)
            if sim["downtime_limit_ms"] != float(downtime_ms):
                sim["downtime_limit_ms"] = float(downtime_ms)
                jobs.save_job(db, row, sim)
                model.record_change(db, "live_migration_set_downtime", source, uuid)

    @_hooked
    def live_migration_abort(self, source, instance):
        uuid = instance["uuid"]
        with self._tx() as db:
            model.get_host(db, source)
            row, sim = jobs.job_of(db, source, uuid)
            model.bump_marker(db, f"abort:{uuid}")
            if row is None or row["status"] in ("cancelled", "failed"):
                return
            if row["status"] == "completed" or sim["post_copy"]:
                raise exceptions.InvalidMigrationState(
                    f"migration of instance {uuid} from {source} cannot be aborted: "
                    f"{'it completed' if row['status'] == 'completed' else 'post-copy'}")
            jobs.end_job(db, row, sim, "cancelled")
            model.record_change(db, "live_migration_abort", source, uuid)

    @_hooked
    def live_migration_force_complete(self, source, instance):
        uuid = instance["uuid"]
        with self._tx() as db:
            model.get_host(db, source)
            row, sim = jobs.running_job(db, source, uuid)
            if not sim["post_copy_permitted"]:
                changed = model.set_guest(db, source, uuid, state=PAUSED)
            else:
                changed = not sim["post_copy"]
                sim["post_copy"] = True
                jobs.save_job(db, row, sim)
                model.set_guest(db, row["dest"], uuid, state=RUNNING)
                model.set_guest(db, source, uuid, state=PAUSED)
            if changed:
                model.record_change(db, "live_migration_force_complete", source, uuid)

    # -- after the guest runs on the destination ------------------------------------
    @_hooked
    def post_live_migration_at_source(self, source, instance, block_device_info,
                                      network_info):
        uuid = instance["uuid"]
        with self._tx() as db:
            model.get_host(db, source)
            guest = model.get_guest(db, source, uuid)
            job, _ = jobs.job_of(db, source, uuid)
            if (guest is not None and guest["state"] == RUNNING) or (
                    job is not None and job["status"] == "running"):
                raise exceptions.DriverError(
                    f"guest {uuid} still runs or migrates on {source}; not cleaning up")
            changed = model.release_host_resources(db, source, uuid)
            changed |= model.remove_guest(db, source, uuid)
            if changed:
                model.record_change(db, "post_live_migration_at_source", source, uuid)

    @_hooked
    def post_live_migration_at_destination(self, dest, instance, network_info,
                                           block_migration):
        uuid = instance["uuid"]
        with self._tx() as db:
            model.get_host(db, dest)
            if model.get_guest(db, dest, uuid) is None:
                raise exceptions.DriverError(f"no guest {uuid} on {dest}")
            if model.set_guest(db, dest, uuid, state=RUNNING, persistent=1):
                model.record_change(db, "post_live_migration_at_destination", dest, uuid)
        return RUNNING

    @_hooked
    def cleanup(self, host, instance, destroy_disks):
        uuid = instance["uuid"]
        with self._tx() as db:
            row = model.get_host(db, host)
            if destroy_disks and model.drop_instance_dir(db, row, uuid):
                model.record_change(db, "cleanup", host, uuid)

    # -- lifecycle -------------------------------------------------------------------
    @_hooked
    def spawn(self, host, instance, network_info, block_device_info):
        uuid = instance["uuid"]
        with self._tx() as db:
            where = model.storage_of(model.get_host(db, host))
            if model.get_guest(db, host, uuid) is None:
                model.define_guest(db, host, instance, RUNNING, persistent=True)
                changed = True
            else:
                changed = model.set_guest(db, host, uuid, state=RUNNING)
            changed |= model.ensure_file(db, where, model.instance_dir(uuid), uuid,
                                         instance.get("disk_gb") or 0)
            changed |= model.attach_guest(db, host, uuid, block_device_info, network_info)
            if changed:
                model.record_change(db, "spawn", host, uuid)

    @_hooked
    def destroy(self, host, instance, destroy_disks=True):
        uuid = instance["uuid"]
        with self._tx() as db:
            row = model.get_host(db, host)
            changed = model.remove_guest(db, host, uuid)
            changed |= model.release_host_resources(db, host, uuid)
            if destroy_disks:
                changed |= model.drop_instance_dir(db, row, uuid)
            if changed:
                model.record_change(db, "destroy", host, uuid)


def _guest_view(row):
    return {"uuid": row["uuid"], "name": row["name"], "state": row["state"],
            "persistent": bool(row["persistent"])}
