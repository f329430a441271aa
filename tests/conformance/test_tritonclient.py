"""Conformance of shoal with the unmodified ``tritonclient`` (gRPC and HTTP).

Every test that talks to the server is parametrized over both protocols.
Numerical results are checked against Python onnxruntime running the same
ONNX files from the model repository.

Status conventions asserted on ``InferenceServerException.status()``:
  gRPC: ``str(grpc.StatusCode.X)``, e.g. ``"StatusCode.NOT_FOUND"``
  HTTP: the HTTP status code as a string, e.g. ``"404"``
"""

from __future__ import annotations

import functools
import queue
import time

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

PROTOCOLS = ["grpc", "http"]

FFNN_LATEST = "2"
RESULT_TIMEOUT_S = 120

# Expected InferenceServerException.status() per protocol and error class.
STATUS = {
    "grpc": {"not_found": "StatusCode.NOT_FOUND", "invalid": "StatusCode.INVALID_ARGUMENT"},
    "http": {"not_found": "404", "invalid": "400"},
}

TYPES = [
    # (suffix, KServe datatype, numpy dtype)
    ("bool", "BOOL", np.bool_),
    ("uint8", "UINT8", np.uint8),
    ("uint16", "UINT16", np.uint16),
    ("uint32", "UINT32", np.uint32),
    ("uint64", "UINT64", np.uint64),
    ("int8", "INT8", np.int8),
    ("int16", "INT16", np.int16),
    ("int32", "INT32", np.int32),
    ("int64", "INT64", np.int64),
    ("fp16", "FP16", np.float16),
    ("fp32", "FP32", np.float32),
    ("fp64", "FP64", np.float64),
    ("bytes", "BYTES", np.object_),
]

# Transport variants for inference: gRPC has one encoding; HTTP is exercised
# with the binary tensor extension on/off for inputs and outputs separately.
TRANSPORTS = [
    pytest.param("grpc", None, None, id="grpc"),
    pytest.param("http", True, True, id="http-binin-binout"),
    pytest.param("http", True, False, id="http-binin-jsonout"),
    pytest.param("http", False, True, id="http-jsonin-binout"),
    pytest.param("http", False, False, id="http-jsonin-jsonout"),
]


# --------------------------------------------------------------------------
# helpers


def _module(protocol):
    return grpcclient if protocol == "grpc" else httpclient


def _client(server, protocol, **kwargs):
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(server.grpc, **kwargs)
    return httpclient.InferenceServerClient(server.http, **kwargs)


@functools.lru_cache(maxsize=None)
def _ort_session(path):
    opts = ort.SessionOptions()
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _reference(model_repository, model, version, feeds):
    sess = _ort_session(model_repository / model / version / "model.onnx")
    return sess.run(None, feeds)


def _make_input(protocol, name, array, datatype, binary=None):
    inp = _module(protocol).InferInput(name, list(array.shape), datatype)
    if protocol == "http":
        inp.set_data_from_numpy(array, binary_data=binary)
    else:
        inp.set_data_from_numpy(array)
    return inp


def _make_outputs(protocol, names, binary):
    """Requested outputs, or None (all outputs) for gRPC."""
    if protocol == "grpc" or binary is None:
        return None
    return [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]


def _ffnn_input(seed, batch=4):
    return np.random.default_rng(seed).standard_normal((batch, 784)).astype(np.float32)


def _response(result):
    """The decoded response as a dict with the same keys for both protocols."""
    resp = result.get_response()
    if isinstance(resp, dict):
        return resp
    return {
        "id": resp.id,
        "model_name": resp.model_name,
        "model_version": resp.model_version,
        "outputs": [
            {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
            for o in resp.outputs
        ],
    }


def _expect_error(protocol, kind, fn, *args, **kwargs):
    with pytest.raises(InferenceServerException) as excinfo:
        fn(*args, **kwargs)
    assert excinfo.value.status() == STATUS[protocol][kind], (
        f"status {excinfo.value.status()!r}, message {excinfo.value.message()!r}"
    )
    return excinfo.value


def _metadata(client, protocol, model, version=""):
    md = client.get_model_metadata(model, version)
    if protocol == "http":
        return md

    def tensors(ts):
        return [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts
        ]

    return {
        "name": md.name,
        "versions": list(md.versions),
        "platform": md.platform,
        "inputs": tensors(md.inputs),
        "outputs": tensors(md.outputs),
    }


def _config(client, protocol, model):
    cfg = client.get_model_config(model)
    if protocol == "http":
        return cfg
    c = cfg.config

    def tensors(ts):
        return [
            {
                "name": t.name,
                "data_type": grpcclient.model_config_pb2.DataType.Name(t.data_type),
                "dims": list(t.dims),
            }
            for t in ts
        ]

    out = {
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "max_batch_size": c.max_batch_size,
        "input": tensors(c.input),
        "output": tensors(c.output),
    }
    if c.HasField("dynamic_batching"):
        out["dynamic_batching"] = {
            "max_queue_delay_microseconds": c.dynamic_batching.max_queue_delay_microseconds
        }
    return out


def _stats(client, protocol, model, version):
    """Flattened statistics of one model version."""
    st = client.get_inference_statistics(model, version)
    if protocol == "http":
        entries = st["model_stats"]
        assert len(entries) == 1, entries
        e = entries[0]
        inf = e["inference_stats"]
        return {
            "name": e["name"],
            "version": e["version"],
            "last_inference": e["last_inference"],
            "inference_count": e["inference_count"],
            "execution_count": e["execution_count"],
            **{f"{k}_count": inf[k]["count"] for k in inf},
            **{f"{k}_ns": inf[k]["ns"] for k in inf},
        }
    entries = list(st.model_stats)
    assert len(entries) == 1, st
    e = entries[0]
    inf = e.inference_stats
    keys = ["success", "fail", "queue", "compute_input", "compute_infer", "compute_output"]
    return {
        "name": e.name,
        "version": e.version,
        "last_inference": e.last_inference,
        "inference_count": e.inference_count,
        "execution_count": e.execution_count,
        **{f"{k}_count": getattr(inf, k).count for k in keys},
        **{f"{k}_ns": getattr(inf, k).ns for k in keys},
    }


def _assert_bitwise_equal(actual, expected, what):
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    if expected.dtype == np.object_:
        assert actual.tolist() == expected.tolist(), what
    elif expected.dtype.kind == "f":
        # exact, including -0.0 vs 0.0 and NaN payloads
        uint = np.dtype(f"u{expected.dtype.itemsize}")
        np.testing.assert_array_equal(actual.view(uint), expected.view(uint), err_msg=what)
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=what)


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(params=PROTOCOLS)
def protocol(request):
    return request.param


@pytest.fixture
def client(shoal_server, protocol):
    c = _client(shoal_server, protocol)
    yield c
    c.close()


# --------------------------------------------------------------------------
# health and metadata


def test_server_live_and_ready(client):
    assert client.is_server_live() is True
    assert client.is_server_ready() is True


def test_server_metadata(client, protocol):
    md = client.get_server_metadata()
    if protocol == "grpc":
        name, version, extensions = md.name, md.version, list(md.extensions)
    else:
        name, version, extensions = md["name"], md["version"], md["extensions"]
    assert name == "shoal"
    assert version
    assert "binary_tensor_data" in extensions
    # shoal serves Triton's model config and statistics APIs (perf_analyzer needs them)
    assert "model_configuration" in extensions
    assert "statistics" in extensions


def test_model_metadata_ffnn(client, protocol):
    md = _metadata(client, protocol, "ffnn")
    assert md["name"] == "ffnn"
    assert md["versions"] == ["1", "2"]
    assert md["platform"] == "onnxruntime_onnx"
    assert md["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
    assert md["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]


@pytest.mark.parametrize("version", ["1", "2"])
def test_model_metadata_ffnn_version(client, protocol, version):
    md = _metadata(client, protocol, "ffnn", version)
    assert md["name"] == "ffnn"
    assert md["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
    assert md["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]


def test_model_metadata_resnet50(client, protocol):
    md = _metadata(client, protocol, "resnet50")
    assert md["versions"] == ["1"]
    assert md["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}
    ]
    assert md["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 1000]}]


def test_model_metadata_types(client, protocol):
    md = _metadata(client, protocol, "types")
    assert sorted(md["inputs"], key=lambda t: t["name"]) == sorted(
        [{"name": f"in_{s}", "datatype": dt, "shape": [-1, 4]} for s, dt, _ in TYPES],
        key=lambda t: t["name"],
    )
    assert sorted(md["outputs"], key=lambda t: t["name"]) == sorted(
        [{"name": f"out_{s}", "datatype": dt, "shape": [-1, 4]} for s, dt, _ in TYPES],
        key=lambda t: t["name"],
    )


def test_model_ready(client):
    assert client.is_model_ready("ffnn") is True
    assert client.is_model_ready("ffnn", "1") is True
    assert client.is_model_ready("ffnn", "2") is True
    assert client.is_model_ready("ffnn_nobatch") is True
    assert client.is_model_ready("resnet50") is True
    assert client.is_model_ready("types") is True


def test_model_ready_unknown(client):
    # HTTP: tritonclient returns `status_code == 200`, so any error is False.
    # gRPC: tritonclient returns `response.ready` and raises on an RPC error;
    # like Triton, shoal answers OK with ready=false, so it is False too.
    assert client.is_model_ready("no_such_model") is False
    assert client.is_model_ready("ffnn", "3") is False


def test_model_config_ffnn(client, protocol):
    cfg = _config(client, protocol, "ffnn")
    assert cfg["name"] == "ffnn"
    assert cfg["platform"] == "onnxruntime_onnx"
    assert cfg["backend"] == "onnxruntime"
    assert cfg["max_batch_size"] == 64
    assert [(i["name"], i["data_type"], list(i["dims"])) for i in cfg["input"]] == [
        ("input", "TYPE_FP32", [784])
    ]
    assert [(o["name"], o["data_type"], list(o["dims"])) for o in cfg["output"]] == [
        ("output", "TYPE_FP32", [10])
    ]
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 200


def test_model_config_nobatch_has_no_dynamic_batching(client, protocol):
    cfg = _config(client, protocol, "ffnn_nobatch")
    assert cfg["max_batch_size"] == 64
    assert "dynamic_batching" not in cfg
    # inputs/outputs come from the ONNX graph for this model
    assert [(i["name"], i["data_type"], list(i["dims"])) for i in cfg["input"]] == [
        ("input", "TYPE_FP32", [784])
    ]
    assert [(o["name"], o["data_type"], list(o["dims"])) for o in cfg["output"]] == [
        ("output", "TYPE_FP32", [10])
    ]


def test_model_config_types(client, protocol):
    cfg = _config(client, protocol, "types")
    assert cfg["max_batch_size"] == 8
    want = {
        f"in_{s}": "TYPE_STRING" if dt == "BYTES" else f"TYPE_{dt}" for s, dt, _ in TYPES
    }
    assert {i["name"]: i["data_type"] for i in cfg["input"]} == want
    assert all(list(i["dims"]) == [4] for i in cfg["input"])


# --------------------------------------------------------------------------
# statistics


def test_model_statistics(shoal_server, client, protocol):
    before = _stats(client, protocol, "ffnn", "2")
    other_before = _stats(client, protocol, "ffnn", "1")
    assert before["name"] == "ffnn" and before["version"] == "2"

    n_requests, batch = 3, 4
    for i in range(n_requests):
        x = _ffnn_input(100 + i, batch)
        client.infer("ffnn", [_make_input(protocol, "input", x, "FP32", True)])

    # Allow a moment in case statistics are recorded after the response is sent.
    deadline = time.monotonic() + 5
    while True:
        after = _stats(client, protocol, "ffnn", "2")
        if after["inference_count"] >= before["inference_count"] + n_requests * batch:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)

    # inference_count counts batch rows; the request counters count requests;
    # sequential requests cannot be batched together.
    assert after["inference_count"] - before["inference_count"] == n_requests * batch
    assert after["execution_count"] - before["execution_count"] == n_requests
    for k in ("success", "queue", "compute_infer"):
        assert after[f"{k}_count"] - before[f"{k}_count"] == n_requests, k
        assert after[f"{k}_ns"] > before[f"{k}_ns"], k
    assert after["fail_count"] == before["fail_count"]
    assert after["last_inference"] >= before["last_inference"]
    assert after["last_inference"] > 0

    # the other version saw nothing
    other_after = _stats(client, protocol, "ffnn", "1")
    assert other_after["inference_count"] == other_before["inference_count"]


def test_model_statistics_all_versions(client, protocol):
    st = client.get_inference_statistics("ffnn")
    if protocol == "grpc":
        versions = sorted((s.name, s.version) for s in st.model_stats)
    else:
        versions = sorted((s["name"], s["version"]) for s in st["model_stats"])
    assert versions == [("ffnn", "1"), ("ffnn", "2")]


# --------------------------------------------------------------------------
# inference


@pytest.mark.parametrize("protocol_, binary_in, binary_out", TRANSPORTS)
def test_infer_ffnn(shoal_server, protocol_, binary_in, binary_out):
    protocol = protocol_
    x = _ffnn_input(seed=1234)
    (expected,) = _reference(shoal_server.model_repository, "ffnn", FFNN_LATEST, {"input": x})
    with _client(shoal_server, protocol) as c:
        result = c.infer(
            "ffnn",
            [_make_input(protocol, "input", x, "FP32", binary_in)],
            outputs=_make_outputs(protocol, ["output"], binary_out),
            request_id="ffnn-req-1",
        )
    resp = _response(result)
    assert resp["id"] == "ffnn-req-1"
    assert resp["model_name"] == "ffnn"
    assert resp["model_version"] == FFNN_LATEST
    assert [(o["name"], o["datatype"], list(o["shape"])) for o in resp["outputs"]] == [
        ("output", "FP32", [4, 10])
    ]
    out = result.as_numpy("output")
    assert out.dtype == np.float32 and out.shape == (4, 10)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("version", ["1", "2"])
def test_infer_ffnn_explicit_version(shoal_server, client, protocol, version):
    x = _ffnn_input(seed=99)
    (expected,) = _reference(shoal_server.model_repository, "ffnn", version, {"input": x})
    (other,) = _reference(
        shoal_server.model_repository, "ffnn", "2" if version == "1" else "1", {"input": x}
    )
    # the two versions really differ, so this checks version routing
    assert np.abs(expected - other).max() > 1e-3

    result = client.infer(
        "ffnn", [_make_input(protocol, "input", x, "FP32", True)], model_version=version
    )
    assert _response(result)["model_version"] == version
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=0, atol=1e-5)


def test_infer_ffnn_nobatch(shoal_server, client, protocol):
    x = _ffnn_input(seed=7, batch=3)
    (expected,) = _reference(shoal_server.model_repository, "ffnn_nobatch", "1", {"input": x})
    result = client.infer("ffnn_nobatch", [_make_input(protocol, "input", x, "FP32", True)])
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=0, atol=1e-5)


def _types_inputs(rng, batch, json_safe):
    """One array per datatype. json_safe: only values JSON can carry (finite
    floats, UTF-8 strings)."""
    arrays = {}
    for suffix, _, dtype in TYPES:
        shape = (batch, 4)
        if dtype is np.bool_:
            a = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            a = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
            a.flat[0], a.flat[1] = info.min, info.max
        elif np.issubdtype(dtype, np.floating):
            info = np.finfo(dtype)
            a = (rng.standard_normal(shape) * 100).astype(dtype)
            specials = [info.max, info.min, info.tiny, -0.0, info.smallest_subnormal]
            if not json_safe:
                specials += [np.inf, -np.inf, np.nan]
            a.flat[: len(specials)] = np.array(specials, dtype=dtype)
        else:  # BYTES
            values = [
                b"",
                b"a",
                "h\u00e9llo w\u00f6rld \u2603".encode(),
                b"x" * 1000,
                b"with\x00nul",
                b"  spaces  ",
                b'{"json": [1, 2]}',
                b"\n\t",
            ]
            if not json_safe:
                values[1] = b"\xff\xfe\x80 not utf-8"
            flat = [values[i % len(values)] for i in range(batch * 4)]
            a = np.array(flat, dtype=np.object_).reshape(shape)
        arrays[suffix] = a
    return arrays


@pytest.mark.parametrize("protocol_, binary_in, binary_out", TRANSPORTS)
def test_types_roundtrip(shoal_server, protocol_, binary_in, binary_out):
    protocol = protocol_
    json_involved = protocol == "http" and not (binary_in and binary_out)
    arrays = _types_inputs(np.random.default_rng(5), batch=3, json_safe=json_involved)
    inputs = [
        _make_input(protocol, f"in_{s}", arrays[s], dt, binary_in) for s, dt, _ in TYPES
    ]
    outputs = _make_outputs(protocol, [f"out_{s}" for s, _, _ in TYPES], binary_out)
    with _client(shoal_server, protocol) as c:
        result = c.infer("types", inputs, outputs=outputs)

    resp = _response(result)
    got = {o["name"]: (o["datatype"], list(o["shape"])) for o in resp["outputs"]}
    assert got == {f"out_{s}": (dt, [3, 4]) for s, dt, _ in TYPES}
    for suffix, _, dtype in TYPES:
        out = result.as_numpy(f"out_{suffix}")
        expected = arrays[suffix]
        if dtype is np.object_ and protocol == "http" and binary_out is False:
            # tritonclient decodes JSON BYTES outputs to str
            expected = np.array(
                [v.decode() for v in expected.flat], dtype=np.object_
            ).reshape(expected.shape)
        _assert_bitwise_equal(out, expected, f"out_{suffix}")


def test_types_requested_output_subset(shoal_server, client, protocol):
    arrays = _types_inputs(np.random.default_rng(6), batch=1, json_safe=False)
    inputs = [_make_input(protocol, f"in_{s}", arrays[s], dt, True) for s, dt, _ in TYPES]
    mod = _module(protocol)
    outputs = [mod.InferRequestedOutput("out_int32"), mod.InferRequestedOutput("out_bytes")]
    result = client.infer("types", inputs, outputs=outputs)
    names = sorted(o["name"] for o in _response(result)["outputs"])
    assert names == ["out_bytes", "out_int32"]
    _assert_bitwise_equal(result.as_numpy("out_int32"), arrays["int32"], "out_int32")
    _assert_bitwise_equal(result.as_numpy("out_bytes"), arrays["bytes"], "out_bytes")
    assert result.as_numpy("out_fp32") is None


def test_infer_resnet50(shoal_server, client, protocol):
    x = np.random.default_rng(50).standard_normal((1, 3, 224, 224)).astype(np.float32)
    (expected,) = _reference(shoal_server.model_repository, "resnet50", "1", {"input": x})
    result = client.infer("resnet50", [_make_input(protocol, "input", x, "FP32", True)])
    out = result.as_numpy("output")
    assert out.shape == (1, 1000)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------
# streaming and concurrency


def test_grpc_stream_infer(shoal_server):
    n = 16
    results: queue.Queue = queue.Queue()
    inputs = {f"stream-{i}": _ffnn_input(seed=1000 + i, batch=1 + i % 4) for i in range(n)}
    with grpcclient.InferenceServerClient(shoal_server.grpc) as c:
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            for rid, x in inputs.items():
                c.async_stream_infer(
                    "ffnn", [_make_input("grpc", "input", x, "FP32")], request_id=rid
                )
            received = [results.get(timeout=RESULT_TIMEOUT_S) for _ in range(n)]
        finally:
            c.stop_stream()
    assert results.empty()

    seen = {}
    for result, error in received:
        assert error is None, error
        resp = result.get_response()
        assert resp.id in inputs and resp.id not in seen, resp.id
        seen[resp.id] = result.as_numpy("output")
    assert sorted(seen) == sorted(inputs)
    for rid, x in inputs.items():
        (expected,) = _reference(
            shoal_server.model_repository, "ffnn", FFNN_LATEST, {"input": x}
        )
        np.testing.assert_allclose(seen[rid], expected, rtol=0, atol=1e-5, err_msg=rid)


def test_grpc_stream_error_keeps_stream_open(shoal_server):
    results: queue.Queue = queue.Queue()
    x = _ffnn_input(seed=3, batch=1)
    with grpcclient.InferenceServerClient(shoal_server.grpc) as c:
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            c.async_stream_infer(
                "no_such_model", [_make_input("grpc", "input", x, "FP32")], request_id="bad"
            )
            c.async_stream_infer("ffnn", [_make_input("grpc", "input", x, "FP32")], request_id="good")
            received = [results.get(timeout=RESULT_TIMEOUT_S) for _ in range(2)]
        finally:
            c.stop_stream()

    errors = [e for r, e in received if e is not None]
    oks = [r for r, e in received if e is None]
    assert len(errors) == 1 and len(oks) == 1, received
    # a stream error arrives as ModelStreamInferResponse.error_message;
    # tritonclient wraps it without a status
    assert "no_such_model" in errors[0].message()
    assert errors[0].status() is None
    assert oks[0].get_response().id == "good"
    (expected,) = _reference(shoal_server.model_repository, "ffnn", FFNN_LATEST, {"input": x})
    np.testing.assert_allclose(oks[0].as_numpy("output"), expected, rtol=0, atol=1e-5)


N_CONCURRENT = 32


def test_concurrent_async_infer_http(shoal_server):
    inputs = {f"http-{i}": _ffnn_input(seed=2000 + i, batch=1 + i % 4) for i in range(N_CONCURRENT)}
    with httpclient.InferenceServerClient(shoal_server.http, concurrency=N_CONCURRENT) as c:
        pending = {
            rid: c.async_infer(
                "ffnn", [_make_input("http", "input", x, "FP32", True)], request_id=rid
            )
            for rid, x in inputs.items()
        }
        results = {rid: p.get_result(timeout=RESULT_TIMEOUT_S) for rid, p in pending.items()}
    for rid, x in inputs.items():
        assert results[rid].get_response()["id"] == rid
        (expected,) = _reference(
            shoal_server.model_repository, "ffnn", FFNN_LATEST, {"input": x}
        )
        np.testing.assert_allclose(
            results[rid].as_numpy("output"), expected, rtol=0, atol=1e-5, err_msg=rid
        )


def test_concurrent_async_infer_grpc(shoal_server):
    inputs = {f"grpc-{i}": _ffnn_input(seed=3000 + i, batch=1 + i % 4) for i in range(N_CONCURRENT)}
    results: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(shoal_server.grpc) as c:
        for rid, x in inputs.items():
            c.async_infer(
                "ffnn",
                [_make_input("grpc", "input", x, "FP32")],
                callback=functools.partial(lambda rid, result, error: results.put((rid, result, error)), rid),
                request_id=rid,
            )
        received = [results.get(timeout=RESULT_TIMEOUT_S) for _ in range(N_CONCURRENT)]
    got = {}
    for rid, result, error in received:
        assert error is None, (rid, error)
        assert result.get_response().id == rid
        got[rid] = result.as_numpy("output")
    assert sorted(got) == sorted(inputs)
    for rid, x in inputs.items():
        (expected,) = _reference(
            shoal_server.model_repository, "ffnn", FFNN_LATEST, {"input": x}
        )
        np.testing.assert_allclose(got[rid], expected, rtol=0, atol=1e-5, err_msg=rid)


# --------------------------------------------------------------------------
# errors


def test_error_unknown_model(client, protocol):
    x = _ffnn_input(seed=0, batch=1)
    e = _expect_error(
        protocol, "not_found", client.infer, "no_such_model", [_make_input(protocol, "input", x, "FP32", True)]
    )
    assert "no_such_model" in e.message()
    for fn in (client.get_model_metadata, client.get_model_config, client.get_inference_statistics):
        e = _expect_error(protocol, "not_found", fn, "no_such_model")
        assert "no_such_model" in e.message()


def test_error_unknown_version(client, protocol):
    x = _ffnn_input(seed=0, batch=1)
    _expect_error(
        protocol,
        "not_found",
        client.infer,
        "ffnn",
        [_make_input(protocol, "input", x, "FP32", True)],
        model_version="3",
    )
    _expect_error(protocol, "not_found", client.get_model_metadata, "ffnn", "3")


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param([4, 783], id="wrong-dim"),
        pytest.param([4, 784, 1], id="extra-dim"),
        pytest.param([65, 784], id="batch-over-max"),
    ],
)
def test_error_wrong_shape(client, protocol, shape):
    x = np.zeros(shape, np.float32)
    _expect_error(
        protocol, "invalid", client.infer, "ffnn", [_make_input(protocol, "input", x, "FP32", True)]
    )


def test_error_wrong_datatype(client, protocol):
    x = np.zeros([1, 784], np.float64)
    _expect_error(
        protocol, "invalid", client.infer, "ffnn", [_make_input(protocol, "input", x, "FP64", True)]
    )


def test_error_unknown_input(client, protocol):
    x = np.zeros([1, 784], np.float32)
    _expect_error(
        protocol, "invalid", client.infer, "ffnn", [_make_input(protocol, "bogus", x, "FP32", True)]
    )


def test_error_missing_input(client, protocol):
    a = np.zeros([1, 4], np.int32)
    _expect_error(
        protocol, "invalid", client.infer, "types", [_make_input(protocol, "in_int32", a, "INT32", True)]
    )


def test_server_healthy_after_errors(shoal_server, client, protocol):
    # errors above must not have poisoned anything
    x = _ffnn_input(seed=11, batch=2)
    (expected,) = _reference(shoal_server.model_repository, "ffnn", FFNN_LATEST, {"input": x})
    result = client.infer("ffnn", [_make_input(protocol, "input", x, "FP32", True)])
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=0, atol=1e-5)
    assert client.is_server_ready() is True


# --------------------------------------------------------------------------
# a model that exists only as Triton's config.pbtxt (model_repository/ffnn_triton)


def test_triton_config_pbtxt_metadata_and_config(client, protocol):
    md = _metadata(client, protocol, "ffnn_triton")
    # Triton's default version policy: the latest version only.
    assert list(md["versions"]) == ["2"]
    assert md["platform"] == "onnxruntime_onnx"
    assert md["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
    cfg = client.get_model_config("ffnn_triton")
    if protocol == "grpc":
        c = cfg.config
        got = {
            "max_batch_size": c.max_batch_size,
            "latest": c.version_policy.latest.num_versions,
            "groups": [(g.count, grpcclient.model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in c.instance_group],
            "preferred": list(c.dynamic_batching.preferred_batch_size),
            "delay": c.dynamic_batching.max_queue_delay_microseconds,
            "intra": c.parameters["intra_op_thread_count"].string_value,
            "levels": (c.dynamic_batching.priority_levels, c.dynamic_batching.default_priority_level),
            "queue": (c.dynamic_batching.default_queue_policy.allow_timeout_override,
                      c.dynamic_batching.default_queue_policy.max_queue_size),
            "warmup": [(w.name, w.batch_size, w.count) for w in c.model_warmup],
        }
    else:
        got = {
            "max_batch_size": cfg["max_batch_size"],
            "latest": cfg["version_policy"]["latest"]["num_versions"],
            "groups": [(g["count"], g["kind"]) for g in cfg["instance_group"]],
            "preferred": cfg["dynamic_batching"]["preferred_batch_size"],
            "delay": cfg["dynamic_batching"]["max_queue_delay_microseconds"],
            "intra": cfg["parameters"]["intra_op_thread_count"]["string_value"],
            "levels": (cfg["dynamic_batching"]["priority_levels"], cfg["dynamic_batching"]["default_priority_level"]),
            "queue": (cfg["dynamic_batching"]["default_queue_policy"]["allow_timeout_override"],
                      cfg["dynamic_batching"]["default_queue_policy"]["max_queue_size"]),
            "warmup": [(w["name"], w["batch_size"], w["count"]) for w in cfg["model_warmup"]],
        }
    assert got == {
        "max_batch_size": 16,
        "latest": 1,
        "groups": [(2, "KIND_CPU")],
        "preferred": [4, 8],
        "delay": 100,
        "intra": "1",
        "levels": (2, 2),
        "queue": (True, 512),
        "warmup": [("zeros", 8, 2)],
    }


def test_triton_config_pbtxt_infer(shoal_server, client, protocol):
    x = _ffnn_input(seed=77, batch=3)
    (expected,) = _reference(shoal_server.model_repository, "ffnn_triton", "2", {"input": x})
    result = client.infer("ffnn_triton", [_make_input(protocol, "input", x, "FP32", True)])
    assert _response(result)["model_version"] == "2"
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=0, atol=1e-5)
    # Triton's priority and timeout request parameters, as the client sends them.
    result = client.infer("ffnn_triton", [_make_input(protocol, "input", x, "FP32", True)],
                          priority=1, timeout=5_000_000)
    np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=0, atol=1e-5)
    # Version 1 is on disk but not served.
    _expect_error(protocol, "not_found", client.get_model_metadata, "ffnn_triton", "1")


# --------------------------------------------------------------------------
# a Triton sequence model (model_repository/sequence): control inputs
# START / READY / CORRID and implicit state, driven by tritonclient's own
# sequence_id / sequence_start / sequence_end arguments


def _seq_step(client, protocol, seq_id, value, start=False, end=False):
    x = np.array([[value]], dtype=np.float32)
    r = client.infer("sequence", [_make_input(protocol, "INPUT", x, "FP32", True)],
                     sequence_id=seq_id, sequence_start=start, sequence_end=end)
    return float(r.as_numpy("OUTPUT")[0][0]), int(r.as_numpy("CORRID_OUT")[0][0])


def test_triton_sequence_batching_interleaved_sequences(shoal_server, protocol):
    import concurrent.futures

    base = 7_000 if protocol == "grpc" else 8_000
    steps = {base + i: [float(v) for v in np.random.default_rng(i).integers(1, 9, 12)] for i in range(6)}

    def run(seq_id):
        c = _client(shoal_server, protocol)
        try:
            got = []
            for i, v in enumerate(steps[seq_id]):
                got.append(_seq_step(c, protocol, seq_id, v, start=i == 0, end=i == len(steps[seq_id]) - 1))
            return got
        finally:
            c.close()

    # Six sequences at once over two replicas: their requests batch together,
    # each sequence's state stays its own and its steps run in order.
    with concurrent.futures.ThreadPoolExecutor(len(steps)) as pool:
        results = dict(zip(steps, pool.map(run, steps)))
    for seq_id, got in results.items():
        want = list(np.cumsum(steps[seq_id]))
        assert [o for o, _ in got] == want, (seq_id, got)
        assert {c for _, c in got} == {seq_id}, "CORRID is the sequence id"


def test_triton_sequence_start_resets_and_errors(client, protocol):
    seq = 9_000 if protocol == "grpc" else 9_500
    assert _seq_step(client, protocol, seq, 5, start=True) == (5.0, seq)
    assert _seq_step(client, protocol, seq, 3) == (8.0, seq)
    # START again: the state is the initial (zero) state.
    assert _seq_step(client, protocol, seq, 10, start=True) == (10.0, seq)
    assert _seq_step(client, protocol, seq, 1, end=True) == (11.0, seq)
    x = np.array([[1.0]], dtype=np.float32)
    # No sequence id: a sequence model cannot run the request.
    e = _expect_error(protocol, "invalid", client.infer, "sequence",
                      [_make_input(protocol, "INPUT", x, "FP32", True)])
    assert "correlation key" in e.message()
    # CORRID is UINT64 here, so a string id is refused, naming why.
    e = _expect_error(protocol, "invalid", client.infer, "sequence",
                      [_make_input(protocol, "INPUT", x, "FP32", True)],
                      sequence_id="abc", sequence_start=True)
    assert "UINT64" in e.message()
