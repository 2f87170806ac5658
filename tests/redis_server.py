"""A real redis-server for tests: its own process on a loopback port, in a temp dir, AOF on."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

REDIS_SERVER = "/usr/bin/redis-server"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process: started, stopped, killed and restarted on the same port and dir.

    Its configuration is a file in its directory (so a password is not on the command line):
    loopback only, protected mode, AOF on (`appendfsync` as asked), no RDB snapshots.
    """

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        appendfsync: str = "everysec",
        appendonly: bool = True,
    ) -> None:
        self.directory = directory
        self.password = password
        self.appendfsync = appendfsync
        self.appendonly = appendonly
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "redis.log"

    @property
    def url(self) -> str:
        """The redis:// URL of database 0, with the password when there is one."""
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A synchronous client to this server (the caller closes it)."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def _write_config(self) -> Path:
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            "protected-mode yes",
            "daemonize no",
            f'dir "{self.directory}"',
            f'logfile "{self.log}"',
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            f"appendfsync {self.appendfsync}",
        ]
        if self.password is not None:
            lines.append(f'requirepass "{self.password}"')
        config = self.directory / "redis.conf"
        config.write_text("\n".join(lines) + "\n")
        config.chmod(0o600)
        return config

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server (a free port the first time, the same one after); wait for PING."""
        if shutil.which(REDIS_SERVER) is None:
            # Not a skip: the Redis queue's tests are core; scripts/test installs it.
            raise RuntimeError(
                f"{REDIS_SERVER} is missing: install Debian's redis-server"
                " (scripts/test does: apt-get install redis-server)"
            )
        assert self.process is None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        fresh = self.port == 0
        for _ in range(5):
            if fresh:
                self.port = free_port()
            self.process = subprocess.Popen(
                [REDIS_SERVER, str(self._write_config())],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_until_ready(timeout):
                return self
            code = self.process.wait()
            self.process = None
            if not (fresh and "Address already in use" in self.output()):
                break  # only a port taken between choosing and binding is worth another try
        raise RuntimeError(f"redis-server did not start (exit {code}):\n{self.output()}")

    def _wait_until_ready(self, timeout: float) -> bool:
        """Wait for PING to answer (after the AOF is loaded); False when the process exited."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False
                # A server still loading its AOF answers LOADING (a ResponseError): not ready yet.
                with contextlib.suppress(redis.ConnectionError, redis.ResponseError):
                    if client.ping():
                        return True
                time.sleep(0.01)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        """The server's log file, for failure messages."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server with SIGTERM (it rewrites nothing: no `save`), SIGKILL if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash: only what the AOF holds survives."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process = None

    def restart(self, *, kill: bool = True) -> RedisServer:
        """Kill (or stop) the server and start it again on its port and dir: the AOF is replayed."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def flushall(self) -> None:
        """Empty every database (between tests that share one server)."""
        with self.client() as client:
            client.flushall()
