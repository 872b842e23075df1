"""Real servers for the tests and benchmarks: a standalone ZooKeeper.

Debian's ``zookeeper`` package (``tools/test-all.sh`` installs it) provides
the jars; the server is started with ``java`` directly (no systemd, no
service scripts) on 127.0.0.1, a free port and a throwaway data directory,
and stopped by its process id.  Nothing here ever touches a process it did
not start.

    server = ZooKeeperServer(tmp_dir)
    server.start()              # returns once it serves (about 1 s)
    KazooClient(server.hosts)   # "127.0.0.1:PORT"
    server.restart()            # same port and data: znodes survive
    server.stop()

A started server is stopped at interpreter exit (``atexit``) when a test
forgets; when the interpreter is killed outright, the kernel stops it
(parent-death signal, see ``_launch_command``).
"""
import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

ZOOKEEPER_JAR = "/usr/share/java/zookeeper.jar"
# zookeeper.jar's manifest names its other jars; a logging binding (Debian's
# libslf4j-java) and the two Netty jars the Netty connection factory needs
# beyond those (libnetty-java) are added: all dependencies of the package.
SLF4J_SIMPLE_JAR = "/usr/share/java/slf4j-simple.jar"
NETTY_EXTRA_JARS = ("/usr/share/java/netty-codec.jar", "/usr/share/java/netty-resolver.jar")
#: connection factories: Netty by default, because ZooKeeper 3.8.0's NIO
#: factory leaves a client that connects while the server is still loading
#: its data (right after a restart) hanging without an answer until the
#: client's own timeout (NullPointerException in ZooKeeperServer.removeCnxn:
#: the connection is never closed); Netty closes it and the client retries.
CNXN_FACTORIES = {
    "netty": "org.apache.zookeeper.server.NettyServerCnxnFactory",
    "nio": "org.apache.zookeeper.server.NIOServerCnxnFactory",
}
INSTALL_COMMAND = ("apt-get update && DEBIAN_FRONTEND=noninteractive "
                   "apt-get install -y --no-install-recommends zookeeper")

#: four-letter-word commands the server answers; ``envi`` is what kazoo's
#: ``server_version()`` (TaskFlow's compatibility check) sends.
FOUR_LETTER_WORDS = "ruok,srvr,mntr,stat,envi,conf,cons,dump"


class ZooKeeperNotInstalled(RuntimeError):
    """ZooKeeper or Java is missing on this machine."""


class ZooKeeperStartError(RuntimeError):
    """The server did not come up; the message ends with its log's tail."""


def ensure_installed():
    """Raise ZooKeeperNotInstalled, naming the install command, when the
    ZooKeeper jars or ``java`` are missing."""
    missing = [path for path in (ZOOKEEPER_JAR, SLF4J_SIMPLE_JAR) + NETTY_EXTRA_JARS
               if not os.path.isfile(path)]
    if shutil.which("java") is None:
        missing.append("java (package default-jre-headless)")
    if missing:
        raise ZooKeeperNotInstalled(
            "ZooKeeper is not installed (missing: %s); install it with:\n  %s\n"
            "(bash tools/test-all.sh installs it before running the tests)"
            % (", ".join(missing), INSTALL_COMMAND))


def free_port(host="127.0.0.1"):
    """A TCP port nobody listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def four_letter_word(host, port, word, timeout=2.0):
    """Send a ZooKeeper four-letter command; the server's answer (text)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(word.encode("ascii"))
        chunks = []
        while True:
            chunk = sock.recv(8192)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def expire_session(hosts, client, wait=10.0):
    """Expire ``client``'s ZooKeeper session on the server, at once.

    A second client joins the session (same id and password) and closes
    it: the server drops the session and its ephemeral nodes within
    milliseconds, as if ``client`` had been silent for its whole session
    timeout.  ``hosts``: any "host:port[,...][/chroot]" of the server.
    With ``wait`` (seconds; 0 or None: do not wait) returns once ``client``
    has noticed (its session id changed: kazoo reports LOST, then opens a
    new session).  Returns the expired session id.
    """
    from kazoo.client import KazooClient

    client_id = client.client_id
    if client_id is None:
        raise ValueError("the client has no session to expire (not connected)")
    impostor = KazooClient(hosts=hosts, client_id=client_id)
    try:
        impostor.start(timeout=10)
        impostor.stop()  # closes the session: the server expires it
    finally:
        impostor.close()
    if wait:
        deadline = time.monotonic() + wait
        while client.client_id is not None and client.client_id[0] == client_id[0]:
            if time.monotonic() > deadline:
                raise TimeoutError("client did not notice its session expiry "
                                   "within %.1f s" % wait)
            time.sleep(0.005)
    return client_id[0]


_running = set()
_running_lock = threading.Lock()


@atexit.register
def _stop_all():
    with _running_lock:
        servers = list(_running)
    for server in servers:
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class ZooKeeperServer:
    """A standalone ZooKeeper on 127.0.0.1 keeping its data in ``data_dir``.

    ``data_dir`` receives ``zoo.cfg``, ``data/`` (snapshots and transaction
    logs) and ``zookeeper.log`` (the server's output, appended across
    restarts).  ``port``: None picks a free one at the first ``start()``
    and keeps it for restarts.  ``cnxn_factory``: "netty" or "nio" (see
    CNXN_FACTORIES).
    """

    host = "127.0.0.1"
    tick_time_ms = 500  # sessions from 1 s (2 ticks) to 60 s (120 ticks)
    min_session_timeout_ms = 1000
    max_session_timeout_ms = 60000
    heap = "256m"

    def __init__(self, data_dir, port=None, log_level="info", cnxn_factory="netty"):
        self.data_dir = os.path.abspath(os.fspath(data_dir))
        self.port = port
        self._port_chosen = port is None
        self.log_level = log_level
        self.cnxn_factory = CNXN_FACTORIES[cnxn_factory]
        self.proc = None
        self._log = None
        self.start_seconds = None  # of the last start (launch to serving)

    # -- paths and addresses -------------------------------------------------
    @property
    def hosts(self):
        """"127.0.0.1:PORT" (kazoo and TaskFlow hosts string)."""
        if self.port is None:
            raise RuntimeError("server not started yet: no port")
        return "%s:%d" % (self.host, self.port)

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    @property
    def config_path(self):
        return os.path.join(self.data_dir, "zoo.cfg")

    @property
    def log_path(self):
        return os.path.join(self.data_dir, "zookeeper.log")

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def command(self, word, timeout=2.0):
        """Answer of a four-letter command (``ruok``, ``mntr``, ``dump``...)."""
        return four_letter_word(self.host, self.port, word, timeout)

    def session_timeouts(self):
        """{session id: negotiated timeout in ms} of the connected clients
        (from ``cons``; kazoo only knows the timeout it asked for)."""
        found = {}
        for match in re.finditer(r"sid=0x([0-9a-f]+),.*?\bto=(\d+)", self.command("cons")):
            found[int(match.group(1), 16)] = int(match.group(2))
        return found

    def log_tail(self, lines=40):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError as err:
            return "(no log: %s)" % err
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle -------------------------------------------------------------
    def _write_config(self):
        data = os.path.join(self.data_dir, "data")
        os.makedirs(data, exist_ok=True)
        settings = [
            ("tickTime", self.tick_time_ms),
            ("minSessionTimeout", self.min_session_timeout_ms),
            ("maxSessionTimeout", self.max_session_timeout_ms),
            ("dataDir", data),
            ("clientPort", self.port),
            ("clientPortAddress", self.host),
            ("maxClientCnxns", 0),
            ("admin.enableServer", "false"),  # else an HTTP server on :8080
            ("4lw.commands.whitelist", FOUR_LETTER_WORDS),
            ("forceSync", "no"),  # throwaway data: no fsync per write
            ("preAllocSize", 4096),  # KB per transaction log file (64 MB default)
            ("autopurge.purgeInterval", 0),
        ]
        with open(self.config_path, "w") as f:
            f.write("# written by tests/servers.py\n")
            for key, value in settings:
                f.write("%s=%s\n" % (key, value))

    def _launch_command(self):
        cmd = ["java", "-Xmx" + self.heap, "-Xms32m",
               "-XX:+UseSerialGC", "-Djava.net.preferIPv4Stack=true",
               "-Dorg.slf4j.simpleLogger.defaultLogLevel=" + self.log_level,
               "-Dorg.slf4j.simpleLogger.showDateTime=true",
               "-Dzookeeper.jmx.log4j.disable=true",
               "-Dzookeeper.serverCnxnFactory=" + self.cnxn_factory,
               "-cp", ":".join((ZOOKEEPER_JAR, SLF4J_SIMPLE_JAR) + NETTY_EXTRA_JARS),
               "org.apache.zookeeper.server.ZooKeeperServerMain", self.config_path]
        # The kernel sends the server SIGTERM when the thread that started
        # it dies (a killed test run leaves no server behind; atexit only
        # covers a normal exit).  Only from the main thread: the signal
        # follows the starting *thread*, not the process.
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            cmd = [setpriv, "--pdeathsig", "TERM", "--"] + cmd
        return cmd

    def start(self, timeout=20.0):
        """Write zoo.cfg, launch the server, wait until it answers ``ruok``
        with ``imok`` and serves requests (``conf`` names its dataDir).

        Raises ZooKeeperNotInstalled or ZooKeeperStartError (with the log's
        tail).  Returns self.
        """
        if self.running:
            return self
        ensure_installed()
        os.makedirs(self.data_dir, exist_ok=True)
        attempts = 3 if self._port_chosen else 1
        for attempt in range(attempts):
            if self.port is None or (attempt and self._port_chosen):
                self.port = free_port(self.host)
            try:
                self._start_once(timeout)
                self._port_chosen = False  # clients know this port now
                return self
            except ZooKeeperStartError as err:
                # a free port taken in the meantime (another test run):
                # a server whose port we chose may move before first use
                if attempt + 1 == attempts or "Address already in use" not in str(err):
                    raise
        return self

    def _start_once(self, timeout):
        self._write_config()
        data_dir = os.path.join(self.data_dir, "data", "version-2")
        self._log = open(self.log_path, "ab")
        self._log.write(b"=== tests/servers.py: starting on port %d ===\n" % self.port)
        self._log.flush()
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self._launch_command(), cwd=self.data_dir, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT)
        with _running_lock:
            _running.add(self)
        deadline = started + timeout
        last_error = None
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._reap()
                raise ZooKeeperStartError(
                    "ZooKeeper exited with status %s while starting on %s:%d "
                    "(log %s):\n%s" % (code, self.host, self.port, self.log_path,
                                       self.log_tail()))
            try:
                # "imok" only says the process is up; ``conf`` answers with
                # this server's dataDir once it serves requests (and not a
                # stranger's: another server may hold the port, ours then
                # exits with "Address already in use").
                answer = self.command("ruok", timeout=1.0)
                if answer == "imok":
                    answer = self.command("conf", timeout=1.0)
                    if ("dataDir=%s" % data_dir) in answer:
                        self.start_seconds = time.monotonic() - started
                        return
                last_error = "last answer: %r" % answer[:200]
            except OSError as err:
                last_error = "%s: %s" % (type(err).__name__, err)
            if time.monotonic() > deadline:
                self.stop()
                raise ZooKeeperStartError(
                    "ZooKeeper did not answer ruok on %s:%d within %.0f s (%s); "
                    "log %s:\n%s" % (self.host, self.port, timeout, last_error,
                                     self.log_path, self.log_tail()))
            time.sleep(0.05)

    def stop(self, grace=5.0):
        """SIGTERM by pid, SIGKILL after ``grace`` seconds; waits for exit."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        self._reap()

    def _reap(self):
        with _running_lock:
            _running.discard(self)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, timeout=20.0):
        """Stop, then start on the same port and data directory."""
        self.stop()
        return self.start(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def __repr__(self):
        return "<ZooKeeperServer %s pid=%s dir=%s>" % (
            "%s:%s" % (self.host, self.port), self.pid, self.data_dir)
