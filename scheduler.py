"""Host filtering and ordering for moves (the design's destination rules).

One set of rules serves both the request validation (refuse early, change
nothing) and the flow's own check of each candidate (state may have moved
since the request was accepted).
"""
import re

from migrateflow import exceptions as exc
from migrateflow.states import PowerState, VmState

# RFC 1123 host names: dot-separated labels of letters, digits and inner
# hyphens; these names end up in hypervisor URIs, so nothing else passes.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")


def validate_host_name(name):
    if not isinstance(name, str) or len(name) > 253 or not _HOSTNAME.match(name):
        raise exc.InvalidHostName(
            f"malformed host name {name!r}: expected RFC 1123 labels "
            "(letters, digits, inner hyphens, dot-separated, at most 253 characters)")
    return name


def version_str(version):
    """libvirt's integer versions read as people write them: 7002000 → 7.2.0."""
    return ".".join(str(version // 1000 ** k % 1000) for k in (2, 1, 0))


def check_idle(instance):
    """No other operation holds the instance (its task_state is None)."""
    if instance["task_state"] is not None:
        raise exc.InstanceBusy(
            f"instance {instance['uuid']} is busy: task_state is {instance['task_state']!r}")


def check_live_migratable(instance):
    """Only an active, running instance can be live-migrated."""
    if (instance["vm_state"] != VmState.ACTIVE
            or instance["power_state"] != PowerState.RUNNING):
        raise exc.InstanceInvalidState(
            f"instance {instance['uuid']} must be active and running to live-migrate, "
            f"it is {instance['vm_state']}/{instance['power_state']}")


def free_memory_mb(host):
    return host["memory_mb"] - host["memory_reserved_mb"] - host["memory_used_mb"]


def check_host_usable(host, role):
    if not host["up"] or host["forced_down"]:
        raise exc.HostUnavailable(f"{role} host {host['name']} is down")
    if role == "destination" and host["disabled"]:
        reason = f": {host['disabled_reason']}" if host["disabled_reason"] else ""
        raise exc.HostUnavailable(f"destination host {host['name']} is disabled{reason}")


def check_destination(instance, source, dest):
    """Raise the precise reason ``dest`` cannot take ``instance`` from
    ``source`` (host rows and an instance row from the state database)."""
    if dest["name"] == source["name"]:
        raise exc.InvalidRequest(
            f"destination {dest['name']} is the instance's current host")
    check_host_usable(dest, "destination")
    if free_memory_mb(dest) < instance["memory_mb"]:
        raise exc.InsufficientResources(
            f"not enough memory on {dest['name']}: instance needs "
            f"{instance['memory_mb']} MB, {free_memory_mb(dest)} MB free")
    if dest["hypervisor_type"] != source["hypervisor_type"]:
        raise exc.HypervisorMismatch(
            f"hypervisor type mismatch: source {source['name']} runs "
            f"{source['hypervisor_type']}, destination {dest['name']} runs "
            f"{dest['hypervisor_type']}")
    if dest["hypervisor_version"] < source["hypervisor_version"]:
        raise exc.HypervisorMismatch(
            f"destination {dest['name']} hypervisor version "
            f"{version_str(dest['hypervisor_version'])} is older than source version "
            f"{version_str(source['hypervisor_version'])}")
    missing = sorted(set(source["cpu_features"]) - set(dest["cpu_features"]))
    if missing:
        raise exc.CPUIncompatible(
            f"CPU of {dest['name']} ({dest['cpu_model']}) lacks features of "
            f"{source['name']}: {', '.join(missing)}")


def check_storage(instance, source, dest, block_migration):
    """Early refusal from the recorded shared-storage groups; the flow
    confirms with a real probe file on the hypervisors."""
    shared = bool(source["shared_storage"]) and source["shared_storage"] == dest["shared_storage"]
    if block_migration is True and shared:
        raise exc.InvalidSharedStorage(
            f"block migration requested but {source['name']} and {dest['name']} "
            "share instance storage")
    if block_migration is False and not shared and not instance["volume_backed"]:
        raise exc.InvalidLocalStorage(
            f"{source['name']} and {dest['name']} do not share instance storage and "
            "the instance is not volume-backed: block migration is required")


def candidate_hosts(instance, source, hosts, max_retries=-1):
    """Destinations worth trying, best first (most free memory).

    Only hosts passing every recorded check are listed; ``max_retries``
    (Nova's migrate_max_retries) bounds the alternates after the first.
    """
    good = []
    for host in hosts:
        try:
            check_destination(instance, source, host)
        except exc.MigrateflowError:
            continue
        good.append(host)
    good.sort(key=lambda h: (-free_memory_mb(h), h["name"]))
    names = [h["name"] for h in good]
    if max_retries >= 0:
        names = names[:max_retries + 1]
    return names
