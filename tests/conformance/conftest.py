"""Fixtures for the conformance suite: one shoal server per test session.

The server is started on OS-assigned ports (``--http-port 0`` etc.) and the
addresses are taken from the single line it prints on stdout once ready:

    shoal listening http=127.0.0.1:PORT grpc=127.0.0.1:PORT metrics=127.0.0.1:PORT

Environment:
  SHOAL_BIN               server binary (default <repo>/target/release/shoal)
  SHOAL_MODEL_REPOSITORY  model repository (default <repo>/model_repository)
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

STARTUP_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 30

_LISTENING_RE = re.compile(
    r"^shoal listening http=(?P<http>\S+) grpc=(?P<grpc>\S+) metrics=(?P<metrics>\S+)"
    r"(?: \w+=\S+)*\s*$"
)


@dataclasses.dataclass(frozen=True)
class ShoalServer:
    """Addresses (``host:port``) of a running shoal, plus where things live."""

    http: str
    grpc: str
    metrics: str
    model_repository: Path
    process: subprocess.Popen = dataclasses.field(repr=False, compare=False)
    stderr_path: Path = dataclasses.field(repr=False, compare=False)

    def stderr_tail(self, lines: int = 40) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _binary() -> Path:
    return Path(os.environ.get("SHOAL_BIN", REPO_ROOT / "target" / "release" / "shoal"))


def _model_repository() -> Path:
    return Path(
        os.environ.get("SHOAL_MODEL_REPOSITORY", REPO_ROOT / "model_repository")
    )


@pytest.fixture(scope="session")
def model_repository() -> Path:
    repo = _model_repository()
    if not (repo / "ffnn" / "2" / "model.onnx").is_file():
        pytest.fail(
            f"model repository {repo} has no generated models; run scripts/setup.sh",
            pytrace=False,
        )
    return repo


@pytest.fixture(scope="session")
def shoal_server(model_repository: Path, tmp_path_factory) -> ShoalServer:
    binary = _binary()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(
            f"shoal binary {binary} not found; build it with "
            "`cargo build --release -p shoal` or set SHOAL_BIN",
            pytrace=False,
        )

    stderr_path = tmp_path_factory.mktemp("shoal") / "stderr.log"
    stderr_file = open(stderr_path, "wb")
    proc = subprocess.Popen(
        [
            str(binary),
            "--model-repository",
            str(model_repository),
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr_file,
        cwd=REPO_ROOT,
    )
    stderr_file.close()

    # Read stdout on a thread so the startup timeout holds even if the server
    # prints nothing, and keep draining it afterwards so it never blocks.
    first_line: list[str] = []
    got_line = threading.Event()
    extra_stdout: list[str] = []

    def pump() -> None:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            if not got_line.is_set():
                first_line.append(line)
                got_line.set()
            else:
                extra_stdout.append(line)
        got_line.set()  # EOF: the server exited

    threading.Thread(target=pump, name="shoal-stdout", daemon=True).start()

    def tail() -> str:
        try:
            return stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill() -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    if not got_line.wait(STARTUP_TIMEOUT_S):
        kill()
        pytest.fail(
            f"shoal printed no listening line within {STARTUP_TIMEOUT_S}s\n"
            f"stderr:\n{tail()}",
            pytrace=False,
        )
    m = _LISTENING_RE.match(first_line[0]) if first_line else None
    if m is None:
        got = first_line[0] if first_line else "<EOF>"
        kill()
        pytest.fail(
            f"unexpected first stdout line from shoal: {got!r} "
            f"(exit code {proc.poll()})\nstderr:\n{tail()}",
            pytrace=False,
        )

    server = ShoalServer(
        http=m["http"],
        grpc=m["grpc"],
        metrics=m["metrics"],
        model_repository=model_repository,
        process=proc,
        stderr_path=stderr_path,
    )
    try:
        yield server
    finally:
        if proc.poll() is not None:
            code = proc.returncode
            pytest.fail(
                f"shoal exited on its own during the session (code {code})\n"
                f"stderr:\n{tail()}",
                pytrace=False,
            )
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill()
            pytest.fail(
                f"shoal did not exit within {SHUTDOWN_TIMEOUT_S}s of SIGTERM\n"
                f"stderr:\n{tail()}",
                pytrace=False,
            )
        if extra_stdout:
            sys.stderr.write("shoal wrote more to stdout: " + "".join(extra_stdout))
        assert code == 0, (
            f"shoal exited with code {code} after SIGTERM, want 0\nstderr:\n{tail()}"
        )
