"""System shared memory with the unmodified ``tritonclient`` (gRPC and HTTP).

The client creates POSIX regions with ``tritonclient.utils.shared_memory``,
registers them, and passes inputs and outputs by reference; results must
equal the plain path. Bad regions, offsets and sizes must be refused with a
clear status, and a region destroyed while requests use it must not bring
the server down. CUDA shared memory is answered "unsupported".
"""

from __future__ import annotations

import base64
import os
import threading
import time
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

PROTOCOLS = ["grpc", "http"]

STATUS = {
    "grpc": {
        "not_found": "StatusCode.NOT_FOUND",
        "invalid": "StatusCode.INVALID_ARGUMENT",
        "exists": "StatusCode.ALREADY_EXISTS",
        "unsupported": "StatusCode.UNIMPLEMENTED",
    },
    "http": {"not_found": "404", "invalid": "400", "exists": "409", "unsupported": "501"},
}


def _module(protocol):
    return grpcclient if protocol == "grpc" else httpclient


@pytest.fixture(params=PROTOCOLS)
def protocol(request):
    return request.param


@pytest.fixture
def client(shoal_server, protocol):
    c = (
        grpcclient.InferenceServerClient(shoal_server.grpc)
        if protocol == "grpc"
        else httpclient.InferenceServerClient(shoal_server.http)
    )
    yield c
    # Leave no registration behind for the next test (the server is shared).
    c.unregister_system_shared_memory()
    c.close()


class Regions:
    """Client-side POSIX regions, destroyed at the end of the test."""

    def __init__(self):
        self.handles = []

    def create(self, byte_size):
        tag = uuid.uuid4().hex[:12]
        name, key = f"r_{tag}", f"/shoal_test_{tag}"
        h = shm.create_shared_memory_region(name, key, byte_size)
        self.handles.append(h)
        return name, key, h

    def destroy(self, h):
        if h in self.handles:
            self.handles.remove(h)
            shm.destroy_shared_memory_region(h)

    def close(self):
        for h in list(self.handles):
            self.destroy(h)


@pytest.fixture
def regions():
    r = Regions()
    yield r
    r.close()


def _expect_error(protocol, kind, fn, *args, **kwargs):
    with pytest.raises(InferenceServerException) as excinfo:
        fn(*args, **kwargs)
    e = excinfo.value
    assert e.status() == STATUS[protocol][kind], f"status {e.status()!r}, message {e.message()!r}"
    return e


def _status(client, protocol, name=""):
    """Registered regions as {name: (key, offset, byte_size)}."""
    if protocol == "grpc":
        st = client.get_system_shared_memory_status(name)
        return {n: (r.key, r.offset, r.byte_size) for n, r in st.regions.items()}
    st = client.get_system_shared_memory_status(name)
    return {r["name"]: (r["key"], int(r["offset"]), int(r["byte_size"])) for r in st}


def _shm_input(protocol, name, shape, region, byte_size, offset=0):
    inp = _module(protocol).InferInput(name, list(shape), "FP32")
    inp.set_shared_memory(region, byte_size, offset=offset)
    return inp


def _shm_output(protocol, name, region, byte_size, offset=0):
    if protocol == "grpc":
        out = grpcclient.InferRequestedOutput(name)
    else:
        out = httpclient.InferRequestedOutput(name, binary_data=True)
    out.set_shared_memory(region, byte_size, offset=offset)
    return out


def _plain(client, protocol, model, name, x):
    inp = _module(protocol).InferInput(name, list(x.shape), "FP32")
    if protocol == "http":
        inp.set_data_from_numpy(x, binary_data=True)
    else:
        inp.set_data_from_numpy(x)
    return client.infer(model, [inp])


@pytest.mark.parametrize(
    "model,shape,out_shape",
    [("ffnn", (3, 784), (3, 10)), ("identity_600k", (1, 3, 224, 224), (1, 3, 224, 224))],
)
def test_inputs_and_outputs_in_shared_memory_match_the_plain_path(
    client, protocol, regions, model, shape, out_shape
):
    x = np.random.default_rng(11).standard_normal(shape).astype(np.float32)
    want = _plain(client, protocol, model, "input", x).as_numpy("output")
    assert want.shape == out_shape

    in_bytes, out_bytes = x.nbytes, int(np.prod(out_shape)) * 4
    # Input and output share one region at unaligned offsets, after a gap.
    in_off, out_off = 24, 24 + in_bytes + 8
    name, key, h = regions.create(out_off + out_bytes)
    shm.set_shared_memory_region(h, [x], offset=in_off)
    client.register_system_shared_memory(name, key, out_off + out_bytes)
    assert _status(client, protocol, name) == {name: (key, 0, out_off + out_bytes)}

    result = client.infer(
        model,
        [_shm_input(protocol, "input", shape, name, in_bytes, in_off)],
        outputs=[_shm_output(protocol, "output", name, out_bytes, out_off)],
    )
    out = result.get_output("output")
    if protocol == "grpc":
        assert list(out.shape) == list(out_shape)
        assert out.parameters["shared_memory_region"].string_param == name
        assert out.parameters["shared_memory_byte_size"].int64_param == out_bytes
    else:
        assert out["shape"] == list(out_shape)
        assert out["parameters"]["shared_memory_region"] == name
        assert out["parameters"]["shared_memory_byte_size"] == out_bytes
        assert "data" not in out
    got = shm.get_contents_as_numpy(h, np.float32, list(out_shape), offset=out_off)
    np.testing.assert_array_equal(got, want)
    # The input stayed where it was.
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(h, np.float32, list(shape), offset=in_off), x
    )


def test_shared_memory_input_with_a_plain_output(client, protocol, regions):
    x = np.random.default_rng(3).standard_normal((2, 784)).astype(np.float32)
    want = _plain(client, protocol, "ffnn", "input", x).as_numpy("output")
    name, key, h = regions.create(x.nbytes + 100)
    shm.set_shared_memory_region(h, [x], offset=100)
    # The registered window starts 100 bytes into the object.
    client.register_system_shared_memory(name, key, x.nbytes, offset=100)
    assert _status(client, protocol) == {name: (key, 100, x.nbytes)}
    result = client.infer("ffnn", [_shm_input(protocol, "input", x.shape, name, x.nbytes)])
    np.testing.assert_array_equal(result.as_numpy("output"), want)


def test_register_status_unregister_errors(client, protocol, regions):
    name, key, _ = regions.create(1024)
    _expect_error(protocol, "not_found", client.register_system_shared_memory, name, "/shoal_no_such_key", 64)
    _expect_error(protocol, "invalid", client.register_system_shared_memory, name, key, 1024, offset=8)
    _expect_error(protocol, "invalid", client.register_system_shared_memory, name, key, 2048)
    assert _status(client, protocol) == {}
    client.register_system_shared_memory(name, key, 1024)
    e = _expect_error(protocol, "exists", client.register_system_shared_memory, name, key, 512)
    assert "already registered" in e.message()
    e = _expect_error(protocol, "not_found", client.get_system_shared_memory_status, "nope")
    assert "not registered" in e.message()
    client.unregister_system_shared_memory(name)
    # Unregistering is idempotent, as in Triton.
    client.unregister_system_shared_memory(name)
    assert _status(client, protocol) == {}


def test_bad_offsets_and_sizes_are_rejected(client, protocol, regions):
    x = np.ones((1, 784), np.float32)
    name, key, h = regions.create(4096)
    shm.set_shared_memory_region(h, [x])
    client.register_system_shared_memory(name, key, 4096)

    def infer(inp_region, size, offset=0, outputs=None):
        return client.infer(
            "ffnn",
            [_shm_input(protocol, "input", x.shape, inp_region, size, offset)],
            outputs=outputs,
        )

    e = _expect_error(protocol, "invalid", infer, name, x.nbytes, 4096 - 100)
    assert "exceeds shared memory region" in e.message(), e.message()
    e = _expect_error(protocol, "invalid", infer, name, 8192)
    assert "exceeds" in e.message(), e.message()
    # A window inside the region whose size does not match the shape.
    e = _expect_error(protocol, "invalid", infer, name, x.nbytes - 4)
    e = _expect_error(protocol, "not_found", infer, "unknown_region", x.nbytes)
    assert "unknown_region" in e.message()
    # An output window too small for the result.
    e = _expect_error(
        protocol, "invalid", infer, name, x.nbytes, 0, [_shm_output(protocol, "output", name, 8, 3200)]
    )
    assert "more than the 8 bytes" in e.message(), e.message()
    e = _expect_error(
        protocol, "invalid", infer, name, x.nbytes, 0, [_shm_output(protocol, "output", name, 40, 4090)]
    )
    # The server still answers normally.
    result = infer(name, x.nbytes)
    assert result.as_numpy("output").shape == (1, 10)


def test_region_destroyed_while_requests_are_in_flight(shoal_server, client, protocol, regions):
    """ResNet50 takes long enough that requests are still queued or running
    when the region is unregistered and unlinked on the client side."""
    x = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)
    name, key, h = regions.create(x.nbytes)
    shm.set_shared_memory_region(h, [x])
    client.register_system_shared_memory(name, key, x.nbytes)
    results = []

    def worker():
        # One client per thread: the HTTP client is not thread-safe.
        c = (
            grpcclient.InferenceServerClient(shoal_server.grpc)
            if protocol == "grpc"
            else httpclient.InferenceServerClient(shoal_server.http)
        )
        try:
            for _ in range(2):
                inp = _shm_input(protocol, "input", x.shape, name, x.nbytes)
                t0 = time.monotonic()
                try:
                    r, e = c.infer("resnet50", [inp]), None
                except InferenceServerException as err:
                    r, e = None, err
                results.append((r, e, t0, time.monotonic()))
        finally:
            c.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    # Long enough for the first requests to be sent, shorter than one
    # ResNet50 run.
    time.sleep(0.05)
    t_unregister = time.monotonic()
    client.unregister_system_shared_memory(name)
    regions.destroy(h)
    t_destroyed = time.monotonic()
    assert not os.path.exists(f"/dev/shm{key}")
    for t in threads:
        t.join(120)
    assert len(results) == 8
    spanning = 0
    for result, error, t0, t1 in results:
        if error is None:
            assert result.as_numpy("output").shape == (1, 1000)
            # Sent before the unregister, answered after the region was gone.
            spanning += t0 < t_unregister and t1 > t_destroyed
        else:
            # Decoded after the unregister: the region is gone, cleanly.
            assert error.status() == STATUS[protocol]["not_found"], error.message()
            assert "not registered" in error.message(), error.message()
    assert spanning >= 1, "no request was in flight across the unregister"
    # The server is alive and serves plain requests.
    assert client.is_server_live()
    out = _plain(client, protocol, "ffnn", "input", np.ones((1, 784), np.float32))
    assert out.as_numpy("output").shape == (1, 10)


def test_a_shrunk_object_fails_the_request_not_the_server(client, protocol, regions):
    """A client that shrinks its object with ftruncate while it is
    registered: reading the input or writing the output fails that request
    with INVALID_ARGUMENT; a mapping would take the server down with SIGBUS."""
    x = np.random.default_rng(5).standard_normal((1, 784)).astype(np.float32)
    name, key, h = regions.create(x.nbytes + 40)
    shm.set_shared_memory_region(h, [x])
    client.register_system_shared_memory(name, key, x.nbytes + 40)
    os.truncate(f"/dev/shm{key}", 0)
    e = _expect_error(protocol, "invalid", client.infer, "ffnn",
                      [_shm_input(protocol, "input", x.shape, name, x.nbytes)])
    assert "shrank" in e.message(), e.message()
    # The output side: the input comes over the wire, the output's window
    # is gone.
    inp = _module(protocol).InferInput("input", list(x.shape), "FP32")
    if protocol == "http":
        inp.set_data_from_numpy(x, binary_data=True)
    else:
        inp.set_data_from_numpy(x)
    e = _expect_error(protocol, "invalid", client.infer, "ffnn", [inp],
                      outputs=[_shm_output(protocol, "output", name, 40, x.nbytes)])
    assert "shrank" in e.message(), e.message()
    assert client.is_server_live()
    out = _plain(client, protocol, "ffnn", "input", x)
    assert out.as_numpy("output").shape == (1, 10)


def test_cuda_shared_memory_is_unsupported(client, protocol):
    e = _expect_error(protocol, "unsupported", client.get_cuda_shared_memory_status)
    assert "CUDA shared memory is not supported" in e.message()
    _expect_error(protocol, "unsupported", client.register_cuda_shared_memory, "c", base64.b64encode(b"handle"), 0, 64)
    _expect_error(protocol, "unsupported", client.unregister_cuda_shared_memory, "c")


def test_server_metadata_lists_the_extension(client, protocol):
    md = client.get_server_metadata()
    extensions = list(md.extensions) if protocol == "grpc" else md["extensions"]
    assert "system_shared_memory" in extensions
