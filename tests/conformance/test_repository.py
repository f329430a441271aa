"""Model repository extension with the unmodified tritonclient, over gRPC
and HTTP: get_model_repository_index, load_model, unload_model and
is_model_ready against shoal in explicit model control mode, with and
without a bearer token.

Each test starts its own shoal on a private copy of part of the model
repository, since loading and unloading change what the server serves.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import _LISTENING_RE, STARTUP_TIMEOUT_S, SHUTDOWN_TIMEOUT_S, _binary

PROTOCOLS = ["grpc", "http"]
TOKEN = "conformance-token"

STATUS = {
    "grpc": {
        "not_found": "StatusCode.NOT_FOUND",
        "invalid": "StatusCode.INVALID_ARGUMENT",
        "unauthenticated": "StatusCode.UNAUTHENTICATED",
        "denied": "StatusCode.PERMISSION_DENIED",
    },
    "http": {"not_found": "404", "invalid": "400", "unauthenticated": "401", "denied": "403"},
}


class Shoal:
    """A shoal process with extra flags; addresses as ``host:port``."""

    def __init__(self, repo: Path, args: list[str], log: Path):
        binary = _binary()
        if not binary.is_file():
            pytest.fail(f"shoal binary {binary} not found; set SHOAL_BIN", pytrace=False)
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [str(binary), "--model-repository", str(repo), "--http-port", "0",
                 "--grpc-port", "0", "--metrics-port", "0", *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            )
        line: list[str] = []
        got = threading.Event()

        def pump() -> None:
            for raw in self.proc.stdout:
                if not got.is_set():
                    line.append(raw.decode(errors="replace"))
                    got.set()
            got.set()

        threading.Thread(target=pump, daemon=True).start()
        m = _LISTENING_RE.match(line[0]) if got.wait(STARTUP_TIMEOUT_S) and line else None
        if m is None:
            self.proc.kill()
            pytest.fail(f"shoal did not start:\n{log.read_text(errors='replace')[-4000:]}", pytrace=False)
        self.http, self.grpc = m["http"], m["grpc"]

    def client(self, protocol):
        if protocol == "grpc":
            return grpcclient.InferenceServerClient(self.grpc)
        return httpclient.InferenceServerClient(self.http)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture
def repo(model_repository: Path, tmp_path: Path) -> Path:
    """ffnn and ffnn_nobatch copied, and a model whose file is not ONNX."""
    r = tmp_path / "repo"
    for m in ("ffnn", "ffnn_nobatch"):
        shutil.copytree(model_repository / m, r / m)
    (r / "broken" / "1").mkdir(parents=True)
    (r / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    return r


@pytest.fixture
def start(repo: Path, tmp_path: Path):
    started: list[Shoal] = []

    def run(*args: str) -> Shoal:
        s = Shoal(repo, list(args), tmp_path / f"shoal{len(started)}.log")
        started.append(s)
        return s

    yield run
    for s in started:
        code = s.stop()
        assert code == 0, f"shoal exited with {code}\n{s.log.read_text(errors='replace')[-4000:]}"


@pytest.fixture(params=PROTOCOLS)
def protocol(request):
    return request.param


def _index(client, protocol):
    """The index as a list of dicts, whatever the protocol."""
    ix = client.get_model_repository_index()
    if protocol == "http":
        return ix
    out = []
    for m in ix.models:
        d = {"name": m.name}
        for k in ("version", "state", "reason"):
            if getattr(m, k):
                d[k] = getattr(m, k)
        out.append(d)
    return out


def _expect(protocol, kind, fn, *args, **kwargs):
    with pytest.raises(InferenceServerException) as e:
        fn(*args, **kwargs)
    assert e.value.status() == STATUS[protocol][kind], (e.value.status(), e.value.message())
    return e.value


def _infer(client, protocol, model):
    mod = grpcclient if protocol == "grpc" else httpclient
    x = np.zeros((1, 784), np.float32)
    inp = mod.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp])


def test_explicit_load_unload_and_index(start, protocol):
    s = start("--model-control-mode", "explicit", "--load-model", "ffnn_nobatch")
    c = s.client(protocol)
    ix = _index(c, protocol)
    assert {"name": "ffnn"} in ix, ix
    assert {"name": "ffnn_nobatch", "version": "1", "state": "READY"} in ix, ix
    assert not c.is_model_ready("ffnn")
    assert c.is_model_ready("ffnn_nobatch")

    c.load_model("ffnn")
    assert c.is_model_ready("ffnn")
    assert c.is_model_ready("ffnn", "1")
    assert _infer(c, protocol, "ffnn").as_numpy("output").shape == (1, 10)
    ready = _index(c, protocol)
    assert {"name": "ffnn", "version": "2", "state": "READY"} in ready, ready

    c.unload_model("ffnn")
    assert not c.is_model_ready("ffnn")
    _expect(protocol, "not_found", _infer, c, protocol, "ffnn")
    after = _index(c, protocol)
    assert {"name": "ffnn", "version": "2", "state": "UNAVAILABLE", "reason": "unloaded"} in after, after
    # Reloaded after an unload, it serves again.
    c.load_model("ffnn")
    assert c.is_model_ready("ffnn")
    c.close()


def test_unload_unknown_model_is_not_found(start, protocol):
    s = start("--model-control-mode", "explicit")
    c = s.client(protocol)
    e = _expect(protocol, "not_found", c.unload_model, "no_such_model")
    assert "no_such_model" in e.message()
    _expect(protocol, "not_found", c.load_model, "no_such_model")
    c.close()


def test_broken_model_reports_why_and_others_serve(start, protocol):
    s = start("--model-control-mode", "explicit", "--load-model=*")
    c = s.client(protocol)
    assert c.is_model_ready("ffnn") and c.is_model_ready("ffnn_nobatch")
    assert not c.is_model_ready("broken")
    broken = [e for e in _index(c, protocol) if e["name"] == "broken"]
    assert len(broken) == 1 and broken[0]["state"] == "UNAVAILABLE", broken
    assert "broken" in broken[0]["reason"] and broken[0]["reason"], broken
    e = _expect(protocol, "invalid", c.load_model, "broken")
    assert "broken" in e.message()
    assert _infer(c, protocol, "ffnn").as_numpy("output").shape == (1, 10)
    c.close()


def test_bearer_token(start, protocol):
    s = start("--model-control-mode", "explicit", "--repository-token", TOKEN)
    c = s.client(protocol)
    _expect(protocol, "unauthenticated", c.get_model_repository_index)
    _expect(protocol, "denied", c.load_model, "ffnn", headers={"authorization": "Bearer wrong"})
    good = {"authorization": f"Bearer {TOKEN}"}
    c.load_model("ffnn", headers=good)
    assert c.is_model_ready("ffnn"), "readiness needs no token"
    assert any(e.get("state") == "READY" for e in (
        c.get_model_repository_index(headers=good)
        if protocol == "http"
        else [{"state": m.state} for m in c.get_model_repository_index(headers=good).models]
    ))
    _expect(protocol, "unauthenticated", c.unload_model, "ffnn")
    c.unload_model("ffnn", headers=good)
    assert not c.is_model_ready("ffnn")
    c.close()
