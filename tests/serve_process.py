"""Run `outbound-collector serve` as a real process and read the address from its banner."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

BANNER = re.compile(r"listening on (http://\S+)")


class ServeProcess:
    """A collector process with its output captured to a file, stopped by a signal."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        log: Path,
        command: Sequence[str] = (sys.executable, "-m", "collector"),
    ) -> None:
        self._log_path = log
        self._log = log.open("wb")
        full_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("COLLECTOR_", "OUTBOUND_"))
        }
        self.process = subprocess.Popen(
            [*command, "serve", "--port", "0", *args],
            env={**full_env, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.base_url = self._wait_for_banner()

    def _wait_for_banner(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = BANNER.search(self.output())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"no banner within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self._log_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._log.close()
        return code
