"""tests/servers.py itself: what the ZooKeeper tests rely on without saying
so (missing installation fails loudly, short session timeouts are
honoured, a taken port is noticed, no server outlives its test run)."""
import os
import subprocess
import sys
import time

import pytest
from kazoo.client import KazooClient

import servers
import zk_fixtures

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def test_missing_installation_fails_with_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(servers, "ZOOKEEPER_JAR", str(tmp_path / "zookeeper.jar"))
    with pytest.raises(servers.ZooKeeperNotInstalled, match="apt-get install .*zookeeper"):
        servers.ensure_installed()
    with pytest.raises(servers.ZooKeeperNotInstalled):
        servers.ZooKeeperServer(tmp_path).start()
    # the fixtures fail (never skip): tools/test-all.sh installs ZooKeeper
    with pytest.raises(pytest.fail.Exception, match="apt-get install"):
        zk_fixtures._start(tmp_path)


def test_short_session_timeouts_are_honoured(zk_server):
    """tickTime 500 ms: a 2 s session (the jobboard's in tests) stays 2 s;
    below the 1 s minimum the server raises it to 1 s."""
    clients = [KazooClient(zk_server.hosts, timeout=t) for t in (2.0, 0.3)]
    try:
        for client in clients:
            client.start(timeout=15)
        negotiated = zk_server.session_timeouts()
        assert [negotiated[c.client_id[0]] for c in clients] == [2000, 1000]
    finally:
        for client in clients:
            client.stop()
            client.close()


def test_taken_port(zk_server, tmp_path):
    # a fixed port that another server holds: a clear error, not a false
    # "imok" from the other server
    clash = servers.ZooKeeperServer(tmp_path / "fixed", port=zk_server.port)
    with pytest.raises(servers.ZooKeeperStartError, match="Address already in use"):
        clash.start()
    assert not clash.running
    # a port it chose itself and lost meanwhile: it moves to another one
    moved = servers.ZooKeeperServer(tmp_path / "chosen")
    moved.port = zk_server.port  # as if free_port() had raced
    with moved:
        assert moved.port != zk_server.port and moved.running
        assert moved.command("ruok") == "imok"
    assert not moved.running


def _gone(pid, within=10.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie until its parent (init, after our child's death) reaps it
        try:
            with open("/proc/%d/stat" % pid) as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_no_server_outlives_the_interpreter(tmp_path, ending):
    """A test run that forgets stop() (atexit) or is killed outright
    (parent-death signal) leaves no ZooKeeper running."""
    code = ("import os, sys; sys.path.insert(0, %r); import servers; "
            "s = servers.ZooKeeperServer(%r).start(); print(s.pid, flush=True); "
            "%s" % (TESTS_DIR, str(tmp_path),
                    "os.kill(os.getpid(), 9)" if ending == "sigkill" else "sys.exit(0)"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == (-9 if ending == "sigkill" else 0), proc.stderr
    pid = int(proc.stdout.split()[0])
    if not _gone(pid):
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            if str(tmp_path).encode() in f.read():  # ours: do not leave it
                os.kill(pid, 9)
        pytest.fail("ZooKeeper pid %d outlived its interpreter" % pid)
