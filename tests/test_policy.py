"""Policy (issue 6): every rule allowed and refused, with the defaults in
code and with a policy file overriding them; a refusal names the rule and
changes nothing (database and fake hypervisor compared before and after).

Real oslo.policy enforcers on the real configuration; no mocks."""
import subprocess
import sys

import pytest

from helpers import snapshot
from migrateflow import api, cloud, context, policy
from migrateflow import exceptions as exc

OWNER = context.make_context("alice", "demo", ["member"])  # the instance's project
STRANGER = context.make_context("mallory", "other", ["member"])
ADMIN = context.admin_context()


@pytest.fixture
def world(db, driver):
    """vm-1 (project demo, flavor m2) on host-a; host-d is down with vm-2;
    a finished cold migration of vm-3 (project demo)."""
    db.create_flavor("m2", memory_mb=2048, vcpus=2, disk_gb=20)
    db.create_flavor("m4", memory_mb=4096, vcpus=4, disk_gb=40)
    for host in ("host-a", "host-b", "host-c", "host-d"):
        cloud.add_host(db, driver, host, shared_storage="nfs-1")
    vm1 = cloud.add_instance(db, driver, "vm-1", "host-a", flavor_name="m2")
    vm2 = cloud.add_instance(db, driver, "vm-2", "host-d", flavor_name="m2")
    vm3 = cloud.add_instance(db, driver, "vm-3", "host-b", flavor_name="m2")
    db.update_host("host-d", up=False)
    finished = api.MigrationAPI().migrate(vm3["uuid"], "host-c")
    assert finished["status"] == "finished"
    yield {"vm1": vm1, "vm2": vm2, "vm3": vm3, "finished": finished["uuid"]}
    policy.reset()


#: rule -> (what the call does, who besides an administrator may)
CALLS = {
    policy.LIVE_MIGRATE: (lambda a, w: a.live_migrate(w["vm1"]["uuid"], "host-b"), None),
    policy.MIGRATE: (lambda a, w: a.migrate(w["vm1"]["uuid"], "host-b"), None),
    policy.RESIZE: (lambda a, w: a.resize(w["vm1"]["uuid"], "m4", "host-b"), OWNER),
    policy.CONFIRM_RESIZE: (lambda a, w: a.confirm_resize(w["finished"]), OWNER),
    policy.REVERT_RESIZE: (lambda a, w: a.revert_resize(w["finished"]), OWNER),
    policy.EVACUATE: (lambda a, w: a.evacuate(w["vm2"]["uuid"], "host-c"), None),
    policy.ABORT: (lambda a, w: a.abort(w["finished"]), None),
    policy.FORCE_COMPLETE: (lambda a, w: a.force_complete(w["finished"]), None),
    policy.RESUME: (lambda a, w: a.resume(w["finished"]), None),
    policy.SHOW_MIGRATION: (lambda a, w: a.show_migration(w["finished"]), OWNER),
    policy.LIST_MIGRATIONS: (lambda a, w: a.list_migrations(), None),
    policy.HOST_DRAIN: (lambda a, w: a.drain_host("host-a"), None),
    policy.HOST_EVACUATE: (lambda a, w: a.evacuate_host("host-d"), None),
    policy.HOST_UPDATE: (lambda a, w: a.set_host_state("host-c", disabled=True), None),
    policy.HOST_LIST: (lambda a, w: a.list_hosts(), None),
    policy.INSTANCE_LIST: (lambda a, w: a.list_instances(), None),
    policy.FLAVOR_CREATE: (lambda a, w: a.create_flavor("m8", memory_mb=8192, vcpus=8,
                                                        disk_gb=80), None),
    policy.QUOTA_UPDATE: (lambda a, w: a.set_quota("demo", "cores", 100), None),
}

#: calls whose success the test can see in the state (the others are reads
#: or refused later for a reason that is not the policy's)
EXPECTED_OUTCOME = {
    policy.LIVE_MIGRATE: lambda r: r["status"] == "completed",
    policy.MIGRATE: lambda r: r["status"] == "finished",
    policy.RESIZE: lambda r: r["status"] == "finished",
    policy.CONFIRM_RESIZE: lambda r: r["status"] == "confirmed",
    policy.REVERT_RESIZE: lambda r: r["status"] == "reverted",
    policy.EVACUATE: lambda r: r["status"] == "done",
    policy.HOST_DRAIN: lambda r: r["succeeded"] == 1,
    policy.HOST_EVACUATE: lambda r: r["succeeded"] == 1,
}
#: past the policy, these calls meet the finished migration's state
REFUSED_AFTER_POLICY = {policy.ABORT: exc.InvalidMigrationState,
                        policy.FORCE_COMPLETE: exc.InvalidMigrationState}


def _state(db, driver, world):
    return ([snapshot(db, driver, world[vm]["uuid"], ("host-a", "host-b", "host-c", "host-d"))
             for vm in ("vm1", "vm2", "vm3")],
            [{k: v for k, v in m.items() if k != "updated_at"} for m in db.list_migrations()],
            db.list_flavors(), db.quota_limits("demo"))


def test_every_rule_has_a_test():
    assert set(CALLS) == {r.name for r in policy.list_rules()} - {"admin_api",
                                                                  "admin_or_owner"}


def _run_allowed(rule, caller, world):
    call, _owner = CALLS[rule]
    client = api.MigrationAPI().for_caller(caller)
    if rule in REFUSED_AFTER_POLICY:
        with pytest.raises(REFUSED_AFTER_POLICY[rule]):
            call(client, world)
        return
    result = call(client, world)
    if rule in EXPECTED_OUTCOME:
        assert EXPECTED_OUTCOME[rule](result), result


@pytest.mark.parametrize("rule", sorted(CALLS))
def test_default_rule_allows_the_administrator(rule, world):
    _run_allowed(rule, ADMIN, world)


def _assert_refused(rule, caller, world, db, driver):
    call, _owner = CALLS[rule]
    before = _state(db, driver, world)
    with pytest.raises(exc.Forbidden,
                       match=f"policy {rule} does not allow user '{caller.user_id}'"):
        call(api.MigrationAPI(context=caller), world)
    assert _state(db, driver, world) == before


@pytest.mark.parametrize("rule", sorted(CALLS))
def test_default_rule_refuses_a_stranger_and_changes_nothing(rule, world, db, driver):
    _assert_refused(rule, STRANGER, world, db, driver)


@pytest.mark.parametrize("rule", sorted(r for r, (_c, owner) in CALLS.items() if owner))
def test_owner_rules_allow_the_instances_project(rule, world):
    _run_allowed(rule, OWNER, world)


@pytest.mark.parametrize("rule", sorted(r for r, (_c, owner) in CALLS.items() if not owner))
def test_admin_rules_refuse_the_instances_project(rule, world, db, driver):
    _assert_refused(rule, OWNER, world, db, driver)


@pytest.fixture
def policy_file(tmp_path, conf):
    """Point [oslo_policy] policy_file at a file of the test's; the
    configuration is parsed (the generators and services parse it)."""
    path = tmp_path / "policy.yaml"
    conf([], project="migrateflow")
    conf.set_override("policy_file", str(path), group="oslo_policy")
    policy.reset()
    yield path
    conf.clear_override("policy_file", group="oslo_policy")
    policy.reset()


OPERATOR = context.make_context("olga", "ops", ["operator"])


@pytest.fixture
def every_rule_to_operators(world, policy_file):
    """A policy file giving every rule to the role "operator" (and no
    longer to administrators), written once the world is built."""
    policy_file.write_text("".join(f'"{rule}": "role:operator"\n' for rule in CALLS))
    return policy_file


@pytest.mark.parametrize("rule", sorted(CALLS))
def test_policy_file_overrides_each_rule_allowing(rule, every_rule_to_operators, world):
    _run_allowed(rule, OPERATOR, world)


@pytest.mark.parametrize("rule", sorted(CALLS))
def test_policy_file_overrides_each_rule_refusing(rule, every_rule_to_operators, world, db,
                                                  driver):
    _assert_refused(rule, ADMIN, world, db, driver)


def test_policy_file_opens_an_admin_rule_to_a_role(policy_file, world, db):
    policy_file.write_text(f'"{policy.LIVE_MIGRATE}": "role:migrator or rule:admin_api"\n')
    operator = context.make_context("olga", "ops", ["migrator"])
    mig = api.MigrationAPI(context=operator).live_migrate(world["vm1"]["uuid"], "host-b")
    assert mig["status"] == "completed"
    assert db.get_instance(world["vm1"]["uuid"])["host"] == "host-b"
    # the other administrator rules keep their defaults
    with pytest.raises(exc.Forbidden, match=policy.MIGRATE):
        api.MigrationAPI(context=operator).migrate(world["vm1"]["uuid"], "host-c")


def test_policy_file_closes_an_owner_rule(policy_file, world, db, driver):
    policy_file.write_text(f'"{policy.RESIZE}": "rule:admin_api"\n')
    before = _state(db, driver, world)
    with pytest.raises(exc.Forbidden, match=f"policy {policy.RESIZE} does not allow user "
                                            "'alice'"):
        api.MigrationAPI(context=OWNER).resize(world["vm1"]["uuid"], "m4", "host-b")
    assert _state(db, driver, world) == before
    # confirm keeps its default: the owner still may
    assert api.MigrationAPI(context=OWNER).confirm_resize(world["finished"])["status"] \
        == "confirmed"


def test_policy_file_with_a_bad_rule_refuses_instead_of_allowing(policy_file, world):
    policy_file.write_text(f'"{policy.SHOW_MIGRATION}": "role:"\n')
    with pytest.raises(exc.Forbidden):
        api.MigrationAPI(context=OWNER).show_migration(world["finished"])


def test_owner_rule_needs_the_owner_project(world):
    # a member of another project that happens to share the role
    with pytest.raises(exc.Forbidden, match=policy.CONFIRM_RESIZE):
        api.MigrationAPI(context=STRANGER).confirm_resize(world["finished"])


def test_bad_contexts_are_refused():
    with pytest.raises(exc.InvalidRequest, match="needs a user id"):
        context.make_context("", "demo")
    with pytest.raises(exc.InvalidRequest, match="needs a project id"):
        context.make_context("alice", None)
    with pytest.raises(exc.InvalidRequest, match="not a request context"):
        api.MigrationAPI(context={"user_id": "alice"})


def test_cli_runs_as_administrator_and_can_act_as_another_user(run, world, db, driver):
    uuid = world["vm1"]["uuid"]
    before = _state(db, driver, world)
    code, _out, err = run("live-migrate", uuid, "--host", "host-b", "--as-user", "alice",
                          "--as-project", "demo")
    assert code == 2
    assert f"error: policy {policy.LIVE_MIGRATE} does not allow user 'alice' of project " \
           "'demo' (roles: member)" in err
    assert _state(db, driver, world) == before
    code, _out, err = run("live-migrate", uuid, "--host", "host-b", "--as-user", "root2",
                          "--as-project", "ops", "--as-role", "admin")
    assert code == 0, err
    assert db.get_instance(uuid)["host"] == "host-b"
    code, out, err = run("live-migrate", uuid, "--host", "host-c")  # the default: admin
    assert code == 0, err
    assert db.get_instance(uuid)["host"] == "host-c"
    code, _out, err = run("host-list", "--as-user", "alice")
    assert code == 2 and "--as-user and --as-project go together" in err


def test_sample_generator_prints_every_rule():
    out = subprocess.run([sys.executable, "-c", "from oslo_policy import generator; "
                          "generator.generate_sample()", "--namespace", "migrateflow"],
                         check=True, capture_output=True, text=True).stdout
    for rule in policy.list_rules():
        assert f'#"{rule.name}": "{rule.check_str}"' in out
    assert "# API  MigrationAPI.live_migrate()" in out

