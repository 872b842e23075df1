"""Build a small cloud: hosts and instances recorded in the state database
and present on the fake hypervisors, consistently.  Used by the demo, the
tests and the benchmarks."""
import uuid as uuidlib

from migrateflow.db import api as db_api

#: facts of a typical compute host; override per host
HOST_DEFAULTS = {
    "hypervisor_type": "QEMU", "hypervisor_version": 7002000, "cpu_model": "Haswell",
    "cpu_features": ["sse4_2", "avx", "avx2", "aes"], "vcpus": 32,
    "memory_mb": 65536, "disk_gb": 1000, "shared_storage": None,
}


def add_host(db, driver, name, **facts):
    values = dict(HOST_DEFAULTS, **facts)
    db.create_host(name, **values)
    driver.add_host(name, **{k: values[k] for k in (
        "hypervisor_type", "hypervisor_version", "cpu_model", "cpu_features",
        "memory_mb", "disk_gb", "shared_storage")})
    return db.get_host(name)


def record_host(db, driver, name, *, vcpus, shared_storage=None):
    """Record a host whose hypervisor already runs (libvirt): its row from
    the hypervisor's own facts."""
    info = driver.get_host_info(name)
    db.create_host(name, hypervisor_type=info["hypervisor_type"],
                   hypervisor_version=info["hypervisor_version"],
                   cpu_model=info["cpu_model"], cpu_features=info["cpu_features"],
                   vcpus=vcpus, memory_mb=info["memory_mb"], disk_gb=info["disk_gb"],
                   shared_storage=shared_storage)
    return db.get_host(name)


def add_instance(db, driver, name, host, *, memory_mb=2048, vcpus=2, disk_gb=20,
                 volumes=0, ports=1, volume_backed=False, dirty_rate_mbps=0.0,
                 flavor_name=None):
    """Record an instance on ``host`` and start its guest there (on any
    driver: the fake's, or a real one's)."""
    volume_ids = [str(uuidlib.uuid4()) for _ in range(volumes)]
    inst = db.create_instance(
        name=name, host=host, flavor_name=flavor_name or f"m{memory_mb}",
        memory_mb=memory_mb, vcpus=vcpus, disk_gb=disk_gb, volume_ids=volume_ids,
        port_count=ports, volume_backed=volume_backed)
    network_info = [{"port_id": p["id"], "mac": p["mac"], "network_id": p["network_id"]}
                    for p in db.list_ports(inst["uuid"])]
    block_device_info = [{"volume_id": b["volume_id"], "device": b["device_name"]}
                         for b in db.list_block_devices(inst["uuid"])]
    driver.spawn(host, db_api.instance_to_driver(inst), network_info, block_device_info)
    if dirty_rate_mbps:
        driver.set_dirty_rate(inst["uuid"], dirty_rate_mbps)
    return inst
