"""Live migration, phase 2: prepare the destination (ports, volumes,
hypervisor).  Every revert here is part of the documented rollback."""
import logging

from migrateflow import exceptions as exc
from migrateflow.tasks import base


class BindDestinationPorts(base.MigrationTask):
    """An INACTIVE binding of every port on the destination (the source
    binding stays ACTIVE until the guest runs on the destination).

    Reverts by: deleting the destination's INACTIVE bindings.
    """

    NAME = "bind-destination-ports"
    default_provides = "network_info"

    def execute(self, migration_id, instance_id, dest_host):
        ports = self.db.list_ports(instance_id)
        self.db.add_port_bindings([p["id"] for p in ports], dest_host, "INACTIVE",
                                  migration_uuid=migration_id)
        return [{"port_id": p["id"], "mac": p["mac"], "network_id": p["network_id"]}
                for p in ports]

    def revert(self, result, migration_id, instance_id, dest_host, **kwargs):
        ports = self.db.list_ports(instance_id)
        self.db.delete_port_bindings([p["id"] for p in ports], dest_host, status="INACTIVE")


class ConnectDestinationVolumes(base.MigrationTask):
    """Export every attached volume to the destination host as well.

    Reverts by: terminating the destination's connections, unless the
    instance already lives there.
    """

    NAME = "connect-destination-volumes"
    default_provides = "block_device_info"

    def execute(self, migration_id, instance_id, dest_host):
        bdms = self.db.list_block_devices(instance_id)
        self.db.add_volume_connections(instance_id, [b["volume_id"] for b in bdms],
                                       dest_host, migration_uuid=migration_id)
        return [{"volume_id": b["volume_id"], "device": b["device_name"]} for b in bdms]

    def revert(self, result, migration_id, instance_id, dest_host, **kwargs):
        if self.db.get_instance(instance_id)["host"] == dest_host:
            return
        bdms = self.db.list_block_devices(instance_id)
        self.db.delete_volume_connections([b["volume_id"] for b in bdms], dest_host)


class PreLiveMigration(base.MigrationTask):
    """pre_live_migration on the destination: instance directory, volumes
    connected to the hypervisor, VIFs plugged into the integration bridge.

    Provides the migrate_data the move uses: the source check's, as the
    destination extended it.
    Reverts by: rollback_live_migration_at_destination (idempotent); a
    driver error there is logged, the source side still rolls back.
    """

    NAME = "pre-live-migration"

    def execute(self, migration_id, instance_id, dest_host, block_device_info,
                network_info, source_check_data):
        migrate_data = self.driver.pre_live_migration(
            dest_host, self.instance(instance_id), block_device_info, network_info,
            source_check_data)
        return migrate_data or source_check_data

    def revert(self, result, migration_id, instance_id, dest_host, block_device_info,
               network_info, source_check_data, **kwargs):
        migrate_data = source_check_data if base.is_failure(result) or not result else result
        try:
            self.driver.rollback_live_migration_at_destination(
                dest_host, self.instance(instance_id), block_device_info, network_info,
                migrate_data)
        except exc.DriverError as err:
            self.log(logging.ERROR, f"cleanup on destination failed, left for the "
                     f"operator: {err}", migration_id, dest=dest_host)
