"""pytest fixtures for a real ZooKeeper (loaded by tests/conftest.py as the
plugin ``zk_fixtures``; see tests/servers.py for the server itself).

- ``zk_server`` (session): one standalone server for the whole run.  When
  ZooKeeper is not installed the fixture FAILS naming the install command
  (``tools/test-all.sh`` installs it): these tests are never skipped.
- ``zk_hosts``: "127.0.0.1:PORT/<chroot>", a fresh chroot per test (created
  first: kazoo does not create a missing chroot), so tests never see each
  other's znodes.  Removed afterwards.
- ``zk_conf``: the ``conf`` fixture with ``[jobboard] hosts`` set to
  ``[zk_hosts]`` and ``[jobboard] session_timeout`` to 2 s.
- ``zk_private_server``: a server of the test's own (restart it, stop it,
  without disturbing the session one).
"""
import re
import uuid

import pytest

import servers


def _fail(err):
    pytest.fail("%s: %s" % (type(err).__name__, err), pytrace=False)


def _start(data_dir):
    try:
        servers.ensure_installed()
        return servers.ZooKeeperServer(data_dir).start()
    except (servers.ZooKeeperNotInstalled, servers.ZooKeeperStartError) as err:
        _fail(err)


@pytest.fixture(scope="session")
def zk_server(tmp_path_factory):
    """The session's ZooKeeperServer (``.hosts`` is "127.0.0.1:PORT")."""
    server = _start(tmp_path_factory.mktemp("zookeeper"))
    yield server
    server.stop()


@pytest.fixture
def zk_private_server(tmp_path):
    """A ZooKeeperServer for this test only (data in tmp_path/zookeeper)."""
    server = _start(tmp_path / "zookeeper")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _zk_admin(zk_server):
    """A kazoo client at the root of the session server (creates chroots)."""
    from kazoo.client import KazooClient
    client = KazooClient(hosts=zk_server.hosts, timeout=10.0)
    client.start(timeout=15)
    yield client
    client.stop()
    client.close()


@pytest.fixture
def zk_hosts(request, zk_server, _zk_admin):
    """"127.0.0.1:PORT/<chroot>" with the chroot node already created."""
    if not zk_server.running:
        pytest.fail("the session's ZooKeeper server is not running any more; "
                    "log %s:\n%s" % (zk_server.log_path, zk_server.log_tail()),
                    pytrace=False)
    label = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-.")[:60]
    chroot = "/tests/%s-%s" % (label or "test", uuid.uuid4().hex[:8])
    _zk_admin.ensure_path(chroot)
    yield zk_server.hosts + chroot
    try:
        _zk_admin.delete(chroot, recursive=True)
    except Exception:  # noqa: BLE001 - a client the test leaked may still write
        pass


@pytest.fixture
def zk_conf(zk_hosts, conf):
    """``conf`` pointing the jobboard (and the zookeeper persistence backend,
    which takes its hosts from ``[jobboard] hosts``) at this test's chroot.

    ``zk_hosts`` comes first so that its chroot outlives ``conf``'s
    teardown (which closes the engine's cached backends).
    """
    overrides = [("hosts", [zk_hosts], "jobboard"),
                 ("session_timeout", 2.0, "jobboard")]
    for name, value, group in overrides:
        conf.set_override(name, value, group=group)
    yield conf
    for name, _value, group in overrides:
        conf.clear_override(name, group=group)
