"""Host drain with cold fallback: what cannot move live (a stopped
instance) is cold-migrated and confirmed, so the host ends empty; asserted
in the database and on the fake hypervisors."""
from migrateflow import api, cloud


def test_drain_cold_migrates_what_cannot_move_live(db, driver):
    for name in ("host-a", "host-b", "host-c"):
        cloud.add_host(db, driver, name)
    running = cloud.add_instance(db, driver, "vm-run", "host-a", volumes=1)
    stopped = cloud.add_instance(db, driver, "vm-off", "host-a", volumes=1)
    driver.power_off("host-a", {"uuid": stopped["uuid"]})
    db.update_instance(stopped["uuid"], vm_state="stopped", power_state="shutdown")
    seen = []
    report = api.MigrationAPI().drain_host("host-a", cold_fallback=True,
                                           progress=lambda *args: seen.append(args[:2]))
    assert (report["total"], report["succeeded"], report["failed"]) == (2, 2, 0)
    by_name = {r["name"]: r for r in report["results"]}
    assert (by_name["vm-run"]["method"], by_name["vm-run"]["status"]) == ("live", "completed")
    assert (by_name["vm-off"]["method"], by_name["vm-off"]["status"]) == ("cold", "confirmed")
    assert sorted(seen) == [(1, 2), (2, 2)]
    assert driver.guests("host-a") == [] and db.list_instances(host="host-a") == []
    assert driver.files("host-a") == [] and driver.vifs("host-a") == []
    usage = db.get_host("host-a")
    assert (usage["memory_used_mb"], usage["vcpus_used"], usage["disk_used_gb"]) == (0, 0, 0)
    off = db.get_instance(stopped["uuid"])
    assert (off["vm_state"], off["power_state"], off["task_state"]) == (
        "stopped", "shutdown", None)
    assert [g["state"] for g in driver.guests(off["host"]) if g["uuid"] == off["uuid"]] == [
        "shutdown"]
    on = db.get_instance(running["uuid"])
    assert [g["state"] for g in driver.guests(on["host"]) if g["uuid"] == on["uuid"]] == [
        "running"]
    assert db.list_claims() == [] and db.list_quota_reservations() == []
    assert db.get_host("host-a")["disabled"]
