"""Writes the fuzz targets' seeds (fuzz/seeds/<target>/seed-*): valid
inputs each target should get past its decoder with, so the fuzzer starts
from the inside. The protobuf seeds come from tritonclient's own messages.

    cd fuzz && ~/.cache/shoal/venv/bin/python seeds.py
"""
import glob
import json
import os
import shutil
import struct

from tritonclient.grpc import service_pb2 as pb

os.chdir(os.path.dirname(os.path.abspath(__file__)))
d = "seeds"


def w(t, n, b):
    os.makedirs(f"{d}/{t}", exist_ok=True)
    open(f"{d}/{t}/seed-{n}", "wb").write(b)


for kind in ("toml", "pbtxt"):
    for f in glob.glob(f"../model_repository/*/config.{kind}"):
        os.makedirs(f"{d}/config_{kind}", exist_ok=True)
        model = os.path.basename(os.path.dirname(f))
        shutil.copy(f, f"{d}/config_{kind}/seed-{model}.{kind}")

x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
reqs = {
 "fp32": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x}]},
 "nested": {"id": "7", "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [[1, 2, 3, 4]]}], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]},
 "params": {"parameters": {"timeout": 1000, "priority": 1, "correlation_key": "k", "sequence_id": 3, "sequence_start": True}, "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
 "shm": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": {"shared_memory_region": "r", "shared_memory_offset": 16, "shared_memory_byte_size": 16}}], "outputs": [{"name": "y", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 16}}]},
 "bytes": {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "data": ["ab", "c"]}]},
}
for n, r in reqs.items():
    w("rest_json", n, json.dumps(r).encode())
raw = struct.pack("<8f", *x)
h = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "parameters": {"binary_data_size": len(raw)}}], "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
w("rest_binary", "fp32", b"\0" + h + b"\n" + raw)
bt = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c"
h = json.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(bt)}}]}).encode()
w("rest_binary", "bytes", b"\0" + h + b"\n" + bt)
w("bytes_tensor", "two", bt)
w("bytes_tensor", "empty-element", struct.pack("<I", 0))
def g(n, **kw):
    r = pb.ModelInferRequest(model_name="m", **kw)
    w("grpc_infer", n, r.SerializeToString())
t = pb.ModelInferRequest.InferInputTensor
o = pb.ModelInferRequest.InferRequestedOutputTensor
g("raw", inputs=[t(name="x", datatype="FP32", shape=[2, 4])], raw_input_contents=[raw])
g("typed", inputs=[t(name="x", datatype="FP32", shape=[2, 4], contents=pb.InferTensorContents(fp32_contents=x))])
r = pb.ModelInferRequest(model_name="m", inputs=[t(name="x", datatype="FP32", shape=[1, 4])], outputs=[o(name="y")])
r.inputs[0].parameters["shared_memory_region"].string_param = "r"
r.inputs[0].parameters["shared_memory_byte_size"].int64_param = 16
r.outputs[0].parameters["shared_memory_region"].string_param = "r"
r.outputs[0].parameters["shared_memory_offset"].int64_param = 32
r.outputs[0].parameters["shared_memory_byte_size"].int64_param = 16
w("grpc_infer", "shm", r.SerializeToString())
r = pb.ModelInferRequest(model_name="m", id="q", inputs=[t(name="x", datatype="FP32", shape=[1, 4])], raw_input_contents=[raw[:16]])
r.parameters["sequence_id"].uint64_param = 9
r.parameters["sequence_start"].bool_param = True
r.parameters["timeout"].int64_param = 100000
r.parameters["priority"].uint64_param = 1
w("grpc_infer", "params", r.SerializeToString())
g("bytes", inputs=[t(name="x", datatype="BYTES", shape=[2], contents=pb.InferTensorContents(bytes_contents=[b"ab", b"c"]))])
