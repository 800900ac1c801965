"""Run the real executables as subprocesses for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def executable(name: str) -> list[str]:
    """The installed console script next to this Python, else the checkout's bin/."""
    installed = Path(sys.executable).parent / name
    if installed.exists():
        return [str(installed)]
    return [sys.executable, str(ROOT / "bin" / name)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A subprocess whose stdout/stderr go to temp files we can poll."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self._out = tempfile.NamedTemporaryFile(prefix="revconn-out-", delete=False)
        self._err = tempfile.NamedTemporaryFile(prefix="revconn-err-", delete=False)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("REVCONN_")}
        full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        # A session of its own, so stop() also reaches its children (hypercorn
        # runs its workers as child processes).
        self.popen = subprocess.Popen(
            args,
            stdout=self._out,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
        )

    @property
    def stdout(self) -> str:
        return Path(self._out.name).read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return Path(self._err.name).read_text(errors="replace")

    def wait_for(
        self, pattern: str, *, stream: str = "both", timeout: float = 10.0
    ) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            text = {"out": self.stdout, "err": self.stderr}.get(stream, self.stdout + self.stderr)
            match = regex.search(text)
            if match:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} not seen within {timeout} s\n"
                    f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
                )
            if self.popen.poll() is not None and not regex.search(self.stdout + self.stderr):
                raise AssertionError(
                    f"process exited ({self.popen.returncode}) before {pattern!r}\n"
                    f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
                )
            time.sleep(0.02)

    def wait_listening(self, port: int, what: str, timeout: float = 15.0) -> None:
        """Until 127.0.0.1:``port`` accepts connections (``what`` names the
        server in the failure, with its stderr); fails at once if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                if self.popen.poll() is not None:
                    break
                time.sleep(0.05)
        raise AssertionError(f"{what} is not listening on {port}\n{self.stderr}")

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.stdout + self.stderr))

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=10)
        for f in (self._out, self._err):
            f.close()
            Path(f.name).unlink(missing_ok=True)
