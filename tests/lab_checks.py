"""What the libvirt lab's tests check of a guest (tests/libvirt_lab.py has
the lab and its fixtures): where the two daemons run it, what its serial
console prints ("GUEST UP", then "tick N" every second), how busy its vCPU is.
"""
import re
import time

import pytest

from libvirt_lab import HOSTS
from migrateflow import cloud

#: a TCG guest boots in 3-5 s and ticks every second; on a loaded machine
#: (other jobs on its two cores) it can be several times slower
BOOT_TIMEOUT_S = 90
#: a guest that moved prints its next tick within this (45 s once was not
#: enough under load: see guest_report in the failure for why)
TICK_TIMEOUT_S = 90


def ticks(console):
    """The last "tick N" the guest printed on its serial console (0: none)."""
    try:
        with open(console, errors="replace") as f:
            found = re.findall(r"tick (\d+)", f.read())
    except FileNotFoundError:
        return 0
    return int(found[-1]) if found else 0


def boots(console):
    """How many times the guest booted on this console ("GUEST UP"): a
    guest that crashed on arrival (panic=-1) boots again and ticks anew."""
    try:
        with open(console, errors="replace") as f:
            return f.read().count("GUEST UP")
    except FileNotFoundError:
        return 0


def wait_for_ticks(console, above, timeout=BOOT_TIMEOUT_S, diagnose=None):
    """The guest's last tick once above ``above``; on timeout the failure
    shows the console's end and what ``diagnose()`` says of the guest."""
    deadline = time.monotonic() + timeout
    while ticks(console) <= above:
        if time.monotonic() > deadline:
            try:
                with open(console, errors="replace") as f:
                    tail = f.read()[-600:]
            except FileNotFoundError:
                tail = "(no console file)"
            pytest.fail(f"guest console {console} shows no tick above {above} after "
                        f"{timeout} s; {diagnose() if diagnose else ''}\n"
                        f"it ends with:\n{tail}")
        time.sleep(0.2)
    return ticks(console)


def assert_ticks_on(lab, host, uuid, console, above=None, booted=1):
    """The guest on ``host`` prints a tick above ``above`` (default: its
    last one) on ``console``, which shows ``booted`` boots: it did not crash
    and boot again."""
    wait_for_ticks(console, ticks(console) if above is None else above, TICK_TIMEOUT_S,
                   diagnose=lambda: guest_report(lab, host, uuid))
    assert boots(console) == booted, f"the guest booted again on {host}: it crashed"


def boot_instance(db, driver, lab, instances, name, host="lab-a"):
    """Record an instance on ``host`` and boot its guest (until it ticks)."""
    inst = cloud.add_instance(db, driver, name, host, memory_mb=256, vcpus=1, disk_gb=1,
                              flavor_name="lab.tiny")
    wait_for_ticks(lab.console(instances.replace("{host}", host), inst["uuid"]), 1)
    return inst


def assert_runs_on_lab_b(lab, db, uuid, still_ticking=False):
    """The guest runs (persistent) on lab-b only, as both daemons and the
    database say; ``still_ticking``: and its console goes on."""
    assert where(lab, uuid) == {"lab-b": ("running", True)}
    moved = db.get_instance(uuid)
    assert (moved["host"], moved["power_state"], moved["task_state"]) == \
        ("lab-b", "running", None)
    if still_ticking:
        assert_ticks_on(lab, "lab-b", uuid, lab.console(lab.shared_instances, uuid))


def guest_report(lab, host, instance_uuid):
    """What ``host``'s daemon and QEMU say of a guest (for a failure
    message: a guest that stopped printing, running or stuck?)."""
    import libvirt
    import libvirt_qemu
    conn = libvirt.open(lab.uri(host))
    try:
        dom = conn.lookupByUUIDString(instance_uuid)
        state, reason = dom.state()
        status = libvirt_qemu.qemuMonitorCommand(dom, "info status", 1).strip()
        return (f"on {host}: state {state} reason {reason}, QEMU {status!r}, vCPU used "
                f"{vcpu_seconds(lab, host, instance_uuid, 2.0):.2f} s in 2 s")
    except libvirt.libvirtError as err:
        return f"on {host}: {err}"
    finally:
        conn.close()


def where(lab, instance_uuid):
    """{host: (state, persistent)} of the guest in both daemons, read
    through connections of this test (not the driver's)."""
    import libvirt
    seen = {}
    for host in HOSTS:
        conn = libvirt.open(lab.uri(host))
        try:
            dom = conn.lookupByUUIDString(instance_uuid)
            seen[host] = ({libvirt.VIR_DOMAIN_RUNNING: "running",
                           libvirt.VIR_DOMAIN_PAUSED: "paused",
                           libvirt.VIR_DOMAIN_SHUTOFF: "shutoff"}.get(dom.state()[0]),
                          bool(dom.isPersistent()))
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
        finally:
            conn.close()
    return seen


def vcpu_seconds(lab, host, instance_uuid, over):
    """CPU seconds the guest's vCPU used during ``over`` seconds."""
    import libvirt
    conn = libvirt.open(lab.uri(host))
    try:
        dom = conn.lookupByUUIDString(instance_uuid)
        before = dom.info()[4]
        time.sleep(over)
        return (dom.info()[4] - before) / 1e9
    finally:
        conn.close()


def escalate_at_once(lab_conf):
    """Escalation on, post-copy permitted, one stuck pass enough (TCG passes
    are slow); returns the overrides, for the test to clear."""
    overrides = [("live_migration_permit_post_copy", True),
                 ("live_migration_escalation", True),
                 ("live_migration_escalation_iterations", 1)]
    for name, value in overrides:
        lab_conf.set_override(name, value, "migration")
    return overrides
