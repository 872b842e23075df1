"""The hypervisor driver contract, built on Nova's method pairs.

Every argument and result is plain JSON data (dicts, lists, str, int, bool),
so results can sit in a flow's persisted store.  Hosts are named by their
host name; an *instance* argument is the dict made by
``migrateflow.db.api.instance_to_driver`` with at least::

    {"uuid", "name", "memory_mb", "vcpus", "disk_gb", "volume_backed"}

Every method is idempotent: a crashed controller re-runs the interrupted
step, so a method first looks at the real state and does only what is
missing.  Expected errors are subclasses of ``migrateflow.exceptions``.

Pairs (one undoes or ends the other):

* check_can_live_migrate_destination / cleanup_live_migration_destination_check
* check_can_live_migrate_source (read-only)
* pre_live_migration / rollback_live_migration_at_destination
* live_migration (start) / live_migration_abort, live_migration_force_complete
* post_live_migration_at_source, post_live_migration_at_destination

Cold migration / resize (the guest is stopped, its disk copied, and the
source copy kept until the move is confirmed or reverted):

* power_off / power_on
* check_instance_shared_storage (leaves nothing behind)
* migrate_disk_and_power_off (source) / cleanup_migration_destination
* finish_migration (destination) / cleanup_migration_destination
* confirm_migration (source) / finish_revert_migration (both)

A resize to the same host (allow_resize_to_same_host) passes the same host
as source and destination: the old disk is kept beside the resized one
until confirm (dropped) or revert (restored).

Evacuation (the source host is down):

* instance_on_disk (is the instance's disk on the destination's storage?)
* rebuild (destination) / destroy (destination)
* destroy on the source once it is back, for evacuated instances only

A *flavor* is {"name", "memory_mb", "vcpus", "disk_gb"}.
"""
import abc

from migrateflow import exceptions, lifecycle


def source_migrate_data(source, instance, dest_check_data, shared):
    """check_can_live_migrate_source's decision, the same for every driver
    once it knows whether ``source`` sees the destination's probe
    (``shared``): block migration when not requested and not shared;
    refuse block migration on shared storage and a non-block migration
    without it for an instance that is not volume-backed, and a block
    migration without the free disk on the destination."""
    uuid, dest = instance["uuid"], dest_check_data["dest"]
    block = dest_check_data["block_migration"]
    if block is None:
        block = not shared
    if block and shared:
        raise exceptions.InvalidSharedStorage(
            f"{source} and {dest} share instance storage; block migration refused")
    if not block and not shared and not instance.get("volume_backed"):
        raise exceptions.InvalidLocalStorage(
            f"{source} and {dest} do not share instance storage and instance {uuid} "
            f"is not volume-backed; block migration needed")
    if block and dest_check_data["disk_available_gb"] < (instance.get("disk_gb") or 0):
        raise exceptions.InsufficientResources(
            f"host {dest} has {dest_check_data['disk_available_gb']} GB free, "
            f"instance {uuid} needs {instance['disk_gb']} GB")
    return {"source": source, "dest": dest, "block_migration": block,
            "is_shared_instance_path": shared}


class MigrationJob(dict):
    """State of a live-migration job as seen on the source host.

    Keys: ``status`` (``running``, ``completed``, ``failed``, ``cancelled``),
    ``memory_total_mb``, ``memory_processed_mb``, ``memory_remaining_mb``,
    ``dirty_rate_mbps``, ``iteration``, ``time_elapsed`` (seconds of the
    job's own clock), ``downtime_ms`` (set when completed), ``post_copy``
    (True once switched), ``throttle_pct`` (auto-converge), ``error``;
    optionally ``bandwidth_mbps`` (the transfer rate the hypervisor
    measured; the convergence check measures it from samples otherwise).
    """


class ComputeDriver(abc.ABC):
    """A hypervisor reached by host name."""

    #: False: a call may wait on a hypervisor daemon, so a migration thread
    #: that takes turns gives its turn away during it (lifecycle.Turns);
    #: True: calls only do local work (their own waits give the turn away)
    LOCAL_CALLS = False

    # -- host facts -------------------------------------------------------
    @abc.abstractmethod
    def get_host_info(self, host):
        """Return {hypervisor_type, hypervisor_version (int), cpu_model,
        cpu_features (list), memory_mb, memory_free_mb, disk_gb,
        disk_free_gb}.  Raises HostNotFound."""

    @abc.abstractmethod
    def compare_cpu(self, host, source_cpu):
        """Raise CPUIncompatible unless ``host`` can run a guest started on a
        CPU described by ``source_cpu`` ({cpu_model, cpu_features})."""

    @abc.abstractmethod
    def get_guest(self, host, instance_uuid):
        """Return {uuid, name, state, persistent} of the guest on ``host``,
        or None when the host has no such guest.  ``state`` is one of
        migrateflow.states.PowerState."""

    @abc.abstractmethod
    def list_guests(self, host):
        """Return the guests of ``host`` as get_guest dicts."""

    # -- checks ---------------------------------------------------------------
    @abc.abstractmethod
    def check_can_live_migrate_destination(self, dest, instance, source_host_info,
                                           block_migration):
        """Run on the destination: CPU compatibility against the source, a
        shared-storage probe file in the instances directory, free disk for
        block migration.  Returns dest_check_data {dest, probe_file,
        disk_available_gb, block_migration}.  Raises MigrationPreCheckError
        subclasses."""

    @abc.abstractmethod
    def cleanup_live_migration_destination_check(self, dest, instance, dest_check_data):
        """Remove the probe file made by the destination check.

        ``dest_check_data`` may be None when the check's reply was lost (it
        failed after making the probe): the probe of ``instance`` is found
        by its name, which is derived from the instance uuid."""

    @abc.abstractmethod
    def check_can_live_migrate_source(self, source, instance, dest_check_data):
        """Run on the source: is the probe file visible (shared instance
        path)?  Decide block migration when it was not requested; refuse
        block migration on shared storage (InvalidSharedStorage) and a
        non-block migration without shared storage for an instance that is
        not volume-backed (InvalidLocalStorage).  Returns migrate_data
        {source, dest, block_migration, is_shared_instance_path}."""

    # -- destination preparation -------------------------------------------
    @abc.abstractmethod
    def pre_live_migration(self, dest, instance, block_device_info, network_info,
                           migrate_data):
        """On the destination: make the instance directory (unless shared),
        connect the volumes to the hypervisor, plug the VIFs into the
        integration bridge.  Returns migrate_data (possibly extended)."""

    @abc.abstractmethod
    def rollback_live_migration_at_destination(self, dest, instance, block_device_info,
                                               network_info, migrate_data):
        """Undo pre_live_migration and any partial guest on the destination:
        destroy and undefine a destination guest that is not the only running
        copy, unplug VIFs, disconnect volumes, remove the instance directory
        unless shared."""

    # -- the move -----------------------------------------------------------
    @abc.abstractmethod
    def live_migration(self, source, instance, dest, migrate_data, params):
        """Start copying the running guest from ``source`` to ``dest``.

        Returns at once; the job runs on the hypervisors and is watched with
        get_migration_job.  ``params``: {bandwidth_mbps (0: default),
        downtime_ms, auto_converge, post_copy (permitted)}.  If a job for the
        instance already runs, or the guest already runs on ``dest``, does
        nothing (re-attach)."""

    @abc.abstractmethod
    def get_migration_job(self, source, instance):
        """Return the MigrationJob of the instance's migration from source,
        or None when the source has no job for it (never started, or ended
        and forgotten)."""

    def wait_for_migration_job(self, source, instance, timeout):
        """Wait ``timeout`` seconds before the engine looks at the job
        again; a driver that knows when a job ends may return sooner (the
        move is then noticed at once).  Default: sleep."""
        lifecycle.sleep(timeout)

    @abc.abstractmethod
    def live_migration_set_downtime(self, source, instance, downtime_ms):
        """Raise the maximum downtime of the running job."""

    @abc.abstractmethod
    def live_migration_abort(self, source, instance):
        """Cancel the running job; the guest keeps running on the source.
        No job: nothing to do.  After the switch to post-copy it cannot be
        aborted: raises InvalidMigrationState."""

    @abc.abstractmethod
    def live_migration_force_complete(self, source, instance):
        """Make the job finish now: switch to post-copy when the job was
        started with post_copy permitted, else pause the guest so the copy
        converges."""

    # -- after the guest runs on the destination -------------------------------
    @abc.abstractmethod
    def post_live_migration_at_source(self, source, instance, block_device_info,
                                      network_info):
        """On the source: disconnect the volumes, unplug the VIFs, undefine
        any leftover guest definition.  Never touches the destination."""

    @abc.abstractmethod
    def post_live_migration_at_destination(self, dest, instance, network_info,
                                           block_migration):
        """On the destination: make the guest definition persistent and
        running there.  Returns the guest's power state."""

    @abc.abstractmethod
    def cleanup(self, host, instance, destroy_disks):
        """Release what the instance left on ``host`` (instance directory and
        local disks when ``destroy_disks``), after it moved away."""

    # -- lifecycle used to build clouds and by later operations --------------
    @abc.abstractmethod
    def spawn(self, host, instance, network_info, block_device_info):
        """Create and start the guest on ``host`` (idempotent)."""

    @abc.abstractmethod
    def destroy(self, host, instance, destroy_disks=True):
        """Stop and undefine the guest on ``host`` (idempotent)."""

    # -- power -------------------------------------------------------------------
    @abc.abstractmethod
    def power_off(self, host, instance):
        """Stop the guest on ``host``; it stays defined (idempotent).
        Raises DriverError when the host has no such guest."""

    @abc.abstractmethod
    def power_on(self, host, instance):
        """Start the defined guest on ``host`` (idempotent).  Raises
        DriverError when the host has no such guest."""

    # -- cold migration / resize ----------------------------------------------------
    @abc.abstractmethod
    def check_instance_shared_storage(self, source, dest, instance):
        """Return True when ``source`` and ``dest`` share the instance path:
        a test file is written in the destination's instances directory and
        looked for from the source, then removed in the same call."""

    @abc.abstractmethod
    def migrate_disk_and_power_off(self, source, instance, dest, flavor, network_info,
                                   block_device_info, shared_storage):
        """On the source: power the guest off (it stays defined there until
        confirm or revert), copy the instance's disk to the destination's
        storage with ``flavor["disk_gb"]`` unless ``shared_storage``,
        disconnect the volumes from the source hypervisor and unplug the
        VIFs.  Refuses before changing anything a flavor whose disk is smaller
        than the instance's (MigrationPreCheckError: disks cannot shrink;
        not checked for volume-backed instances) and a destination without
        the free disk for the copy (InsufficientResources).  A re-run finds
        the copy done.  Returns {"disk_info": [{"path", "disk_gb",
        "copied"}]} (the same on every run)."""

    @abc.abstractmethod
    def finish_migration(self, dest, instance, flavor, network_info, block_device_info,
                         power_on):
        """On the destination: define the guest with the flavor's memory_mb,
        vcpus and disk_gb, connect the volumes, plug the VIFs, and leave it
        running when ``power_on`` (else shut down).  The instance's disk must
        already be on the destination's storage (DriverError otherwise).
        Returns the guest's power state."""

    @abc.abstractmethod
    def confirm_migration(self, source, instance, shared_storage, dest=None):
        """On the source after a finished cold migration: destroy and
        undefine the old guest, release what it still holds there and remove
        its disk unless ``shared_storage``.  Refuses (DriverError) while the
        source guest runs: it would be the copy a revert brought back.  With
        ``dest`` equal to ``source`` (same-host resize) only the kept old
        disk is dropped: the guest is the resized one."""

    @abc.abstractmethod
    def finish_revert_migration(self, dest, source, instance, old_flavor, network_info,
                                block_device_info, power_on):
        """Undo a cold migration that was not confirmed: destroy and undefine
        the guest on ``dest``, unplug its VIFs, disconnect its volumes there
        and remove its disk copy unless the storage is shared with
        ``source``; then on ``source`` give the kept guest ``old_flavor``,
        reconnect the volumes, replug the VIFs and start it when
        ``power_on``.  Raises DriverError when ``source`` no longer has the
        guest (the migration was confirmed).  Returns the source guest's
        power state."""

    @abc.abstractmethod
    def cleanup_migration_destination(self, dest, instance, shared_storage):
        """Roll a failed cold migration back on the destination: remove what
        migrate_disk_and_power_off and finish_migration left there (guest
        definition, VIFs, volume connections, the disk copy unless
        ``shared_storage``).  Touches nothing when no other host still
        defines the guest: the destination copy is then the only one."""

    # -- evacuation ------------------------------------------------------------------
    @abc.abstractmethod
    def instance_on_disk(self, host, instance):
        """Return True when the instance's disk is on the storage of
        ``host`` (shared storage with the dead source): an evacuation then
        reuses it instead of rebuilding from the image."""

    @abc.abstractmethod
    def rebuild(self, host, instance, image_ref, network_info, block_device_info,
                on_shared_storage, power_on):
        """Recreate the guest of an evacuated instance on ``host``: reuse its
        disk when ``on_shared_storage``, else create a fresh disk from
        ``image_ref``; connect the volumes, plug the VIFs, start it when
        ``power_on``.  Idempotent: a re-run finds the guest defined.
        Returns the guest's power state."""

