"""No stuck migrations: the sweeper resumes or settles every transitional
migration nobody moves, from the facts (flow state, jobboard), and
``migration-list --stuck`` shows them."""
import contextlib
import io
import time

import pytest

from migrateflow import api, cli, engine, sweeper
from migrateflow.flows import live_migration
from migrateflow.tasks import live_prepare


class Interrupt(BaseException):
    """Stands for the controller dying in the middle of a step."""


def _interrupted_migration(small_cloud, monkeypatch, step_cls=live_prepare.PreLiveMigration):
    """A migration whose process 'died' in ``step_cls`` (the step raises a
    BaseException, as an exit would: no rollback runs, the flow stays
    RUNNING in persistence, the record transitional)."""
    inst = small_cloud["instance"]
    real = step_cls.execute

    def dying(self, *args, **kwargs):
        raise Interrupt()

    monkeypatch.setattr(step_cls, "execute", dying)
    client = api.MigrationAPI()
    mig, store = client._accept_live_migration(inst["uuid"], "host-b", None)
    with pytest.raises(Interrupt):
        engine.run(live_migration.build, store, mig["uuid"])
    monkeypatch.setattr(step_cls, "execute", real)
    return client.show_migration(mig["uuid"])


def _age(db, migration_id, seconds):
    """Pretend the record was last touched ``seconds`` ago."""
    db.update_migration(migration_id)
    from migrateflow.db import models as m
    with db.engine.begin() as conn:
        conn.execute(m.migrations.update().where(m.migrations.c.uuid == migration_id)
                     .values(updated_at=time.time() - seconds))


def test_interrupted_migration_is_stuck_only_after_the_bound(small_cloud, db, conf,
                                                           monkeypatch):
    mig = _interrupted_migration(small_cloud, monkeypatch)
    assert mig["status"] == "preparing"
    assert sweeper.find_stuck() == []  # just touched: a live flow looks the same
    _age(db, mig["uuid"], conf.jobboard.stuck_after + 1)
    assert [m["uuid"] for m in sweeper.find_stuck()] == [mig["uuid"]]


def test_sweep_resumes_an_interrupted_migration(small_cloud, db, driver, conf, monkeypatch):
    mig = _interrupted_migration(small_cloud, monkeypatch)
    _age(db, mig["uuid"], conf.jobboard.stuck_after + 1)
    assert sweeper.sweep() == [(mig["uuid"], "resumed")]
    done = db.get_migration(mig["uuid"])
    assert (done["status"], done["dest_host"]) == ("completed", "host-b")
    inst = db.get_instance(small_cloud["instance"]["uuid"])
    assert (inst["host"], inst["task_state"]) == ("host-b", None)
    assert [g["uuid"] for g in driver.guests("host-b")] == [inst["uuid"]]
    # steps finished before the interruption ran once
    assert driver.side_effects(inst["uuid"])[("check_can_live_migrate_destination",
                                              "host-b")] == 1
    assert sweeper.find_stuck() == []


def test_sweep_settles_a_migration_whose_flow_never_started(small_cloud, db, conf):
    inst = small_cloud["instance"]
    mig, _store = api.MigrationAPI()._accept_live_migration(inst["uuid"], "host-b", None)
    _age(db, mig["uuid"], conf.jobboard.stuck_after + 1)
    assert sweeper.sweep() == [(mig["uuid"], "settled")]
    done = db.get_migration(mig["uuid"])
    assert done["status"] == "failed" and "no flow" in done["error"]
    got = db.get_instance(inst["uuid"])
    assert (got["host"], got["task_state"], got["vm_state"]) == ("host-a", None, "active")


def test_migration_list_stuck(small_cloud, db, conf, monkeypatch):
    mig = _interrupted_migration(small_cloud, monkeypatch)
    _age(db, mig["uuid"], conf.jobboard.stuck_after + 1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["migration-list", "--stuck"]) == 0
    assert mig["uuid"] in out.getvalue() and "Stuck migrations" in out.getvalue()
    sweeper.sweep()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["migration-list", "--stuck"])
    assert mig["uuid"] not in out.getvalue() and ": 0" in out.getvalue()


@pytest.fixture
def jobboard(zk_conf):
    zk_conf.set_override("enabled", True, group="jobboard")
    yield zk_conf
    zk_conf.clear_override("enabled", group="jobboard")


def test_sweep_reposts_a_lost_job_and_leaves_owned_ones(small_cloud, db, driver, jobboard,
                                                        monkeypatch):
    """Jobboard mode: a stuck migration whose job is on the board is left to
    the conductors; one whose job was lost is posted again and a conductor
    resumes it from its last finished step."""
    mig = _interrupted_migration(small_cloud, monkeypatch)  # ran in-process, no job
    _age(db, mig["uuid"], jobboard.jobboard.stuck_after + 1)
    assert sweeper.sweep() == [(mig["uuid"], "reposted")]
    job_uuid = db.get_migration(mig["uuid"])["job_uuid"]
    assert job_uuid in {j.uuid for j in engine.get_board().iterjobs(ensure_fresh=True)}
    _age(db, mig["uuid"], jobboard.jobboard.stuck_after + 1)
    assert sweeper.sweep() == [(mig["uuid"], "owned")]  # on the board: not twice

    from test_infra_faults import Conductor
    with Conductor():
        done = api.MigrationAPI().wait(mig["uuid"], timeout=60)
    assert done["status"] == "completed"
    inst = db.get_instance(small_cloud["instance"]["uuid"])
    assert (inst["host"], inst["task_state"]) == ("host-b", None)
    repeated = {k: n for k, n in driver.side_effects(inst["uuid"]).items() if n > 1}
    assert repeated == {}


def test_sweep_leaves_a_migration_whose_process_is_alive(small_cloud, db, driver, conf,
                                                         monkeypatch):
    """Embedded mode: a flow blocked for longer than the bound in a live
    process of this host is slow, not stuck; it is not resumed twice."""
    import subprocess
    import sys
    mig = _interrupted_migration(small_cloud, monkeypatch)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        db.update_migration(mig["uuid"], owner=f"{__import__('socket').gethostname()}:"
                                               f"{sleeper.pid}")
        _age(db, mig["uuid"], conf.jobboard.stuck_after + 1)
        assert sweeper.sweep() == [(mig["uuid"], "owned")]
        assert db.get_migration(mig["uuid"])["status"] == "preparing"
    finally:
        sleeper.kill()
        sleeper.wait()
    _age(db, mig["uuid"], conf.jobboard.stuck_after + 1)
    assert sweeper.sweep() == [(mig["uuid"], "resumed")]  # its process is gone
    assert db.get_migration(mig["uuid"])["status"] == "completed"
