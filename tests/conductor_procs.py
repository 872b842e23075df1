"""Conductor processes for the crash matrix: a warm "zygote"
(tests/crash_conductor.py --zygote) forks conductors on request, so each
case does not pay the imports again, and reports their exit statuses."""
import contextlib
import json
import os
import subprocess
import sys
import threading

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_conductor.py")


class Zygote:
    """tests/crash_conductor.py --zygote: forks warm conductors on request
    and reports their exit statuses (read by a thread of ours)."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self._log = open(os.path.join(log_dir, "zygote.log"), "ab")
        self.proc = subprocess.Popen([sys.executable, SCRIPT, "--zygote"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, cwd=os.path.dirname(SCRIPT))
        self._cond = threading.Condition()
        self._spawned, self._exited = {}, {}
        self._ready = False
        self._next_id = 0
        threading.Thread(target=self._reader, name="zygote-reader", daemon=True).start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready or self.proc.poll() is not None,
                                       timeout=60):
                raise RuntimeError("crash_conductor --zygote did not start within 60 s")
        if not self._ready:
            raise RuntimeError("crash_conductor --zygote exited: see "
                               + os.path.join(log_dir, "zygote.log"))

    def _reader(self):
        for raw in self.proc.stdout:
            words = raw.decode().split()
            with self._cond:
                if words == ["ready"]:
                    self._ready = True
                elif words[:1] == ["spawned"]:
                    self._spawned[int(words[1])] = int(words[2])
                elif words[:1] == ["exited"]:
                    self._exited[int(words[1])] = int(words[2])
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def spawn(self, label, argv, log):
        with self._cond:
            self._next_id += 1
            request_id = self._next_id
        line = json.dumps({"id": request_id, "argv": argv, "log": log}) + "\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self._spawned, timeout=30):
                raise RuntimeError("the zygote did not fork conductor %s" % label)
            return Conductor(self, label, self._spawned.pop(request_id), log)

    def wait_exit(self, pid, timeout):
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exited, timeout=timeout)
            return self._exited.get(pid)

    def close(self):
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class Conductor:
    """One forked conductor (our grandchild: signalled by its pid while the
    zygote has not reported its exit)."""

    def __init__(self, zygote, label, pid, log):
        self.zygote, self.label, self.pid, self.log = zygote, label, pid, log

    def poll(self):
        return self.zygote.wait_exit(self.pid, 0)

    def wait(self, timeout):
        return self.zygote.wait_exit(self.pid, timeout)

    def signal(self, signum):
        if self.poll() is None:
            os.kill(self.pid, signum)

    def log_tail(self, lines=40):
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as err:
            return f"(no log: {err})"


