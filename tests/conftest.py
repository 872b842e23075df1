"""Shared fixtures: a fresh SQLite state database and fake hypervisor per
test, configured the way the embedded default runs (real SQLite files,
real TaskFlow engines, no mocks)."""
import os
import shutil

import pytest

from migrateflow import cloud, drivers, engine
from migrateflow.conf import CONF
from migrateflow.db import api as db_api

#: a real ZooKeeper server for the jobboard and ZooKeeper persistence tests; the
#: crash matrices' fork server of conductors; the libvirt + QEMU lab; the
#: evacuation tests' dead host
pytest_plugins = ["zk_fixtures", "crash_harness", "libvirt_lab", "evacuation_world"]


@pytest.fixture(scope="session")
def template_db(tmp_path_factory):
    """A database migrated to head once; each test copies it (alembic
    takes a few hundred milliseconds per run)."""
    path = tmp_path_factory.mktemp("template") / "state.sqlite"
    url = f"sqlite:///{path}"
    CONF.set_override("connection", url, group="database")
    db_api.get_db()
    db_api.forget_db(url)
    CONF.clear_override("connection", group="database")
    return path


@pytest.fixture
def conf(tmp_path, template_db):
    """Configuration pointing at this test's own files, zero delays."""
    db_path = tmp_path / "state.sqlite"
    shutil.copy(template_db, db_path)
    url = f"sqlite:///{db_path}"
    overrides = [
        ("connection", url, "database"),
        ("state_file", str(tmp_path / "fake-hypervisor.sqlite"), "fake_driver"),
        ("state_path", str(tmp_path), None),
        ("live_migration_poll_interval", 0.0, "migration"),
        ("post_migration_retry_interval", 0.0, "migration"),
        # sql (the default) unless a run asks otherwise, to tell a
        # persistence problem from an orchestration one
        ("backend", os.environ.get("MIGRATEFLOW_TEST_PERSISTENCE", "sql"), "persistence"),
    ]
    for name, value, group in overrides:
        CONF.set_override(name, value, group=group)
    yield CONF
    engine.reset()
    drivers.reset_cache()
    db_api.forget_db(url)
    for name, _value, group in overrides:
        CONF.clear_override(name, group=group)
    CONF.reset()


@pytest.fixture
def db(conf):
    return db_api.get_db(conf)


@pytest.fixture
def driver(conf):
    return drivers.get_driver(conf)


@pytest.fixture
def small_cloud(db, driver):
    """Three hosts (shared storage between the first two) and one instance
    on host-a with two ports and one volume."""
    cloud.add_host(db, driver, "host-a", shared_storage="nfs-1")
    cloud.add_host(db, driver, "host-b", shared_storage="nfs-1")
    cloud.add_host(db, driver, "host-c")
    inst = cloud.add_instance(db, driver, "vm-1", "host-a", ports=2, volumes=1)
    return {"instance": inst}


@pytest.fixture
def run(capsys):
    """Run the ``migrateflow`` command in-process: (exit status, stdout, stderr)."""
    from migrateflow import cli

    def call(*argv):
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err
    return call
