#!/usr/bin/env python3
"""Generate the ONNX models of shoal's model repository.

Usage:
    python models/generate.py --out model_repository [--seed 42]
                              [--only ffnn,resnet50,types] [--force]

Writes, with seeded random weights (numpy default_rng) and only the `onnx`
package (no torch):

    ffnn/1/model.onnx          Crayfish FFNN 784-32-32-32-10 + softmax (seed)
    ffnn/2/model.onnx          same architecture, seed + 1
    ffnn_nobatch/1/model.onnx  copy of ffnn/1 (served with another config)
    resnet50/1/model.onnx      ResNet50 v1 (torchvision layout), ~100 MB
    types/1/model.onnx         one Identity per KServe datatype
    decay/1/model.onnx         keyed state h = 0.5 h + x: answers depend on event order
    identity_600k/1/model.onnx Identity on a ResNet50-sized input [N,3,224,224]
                               fp32 (~600 KB a row): transport cost, no compute

Each version directory gets a `.seed` marker; a model whose file exists with
the same seed is not regenerated unless --force. Every model is checked with
onnx.checker and then run once in onnxruntime with a batch of 2.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9
BATCH = "batch"
MODELS = ("ffnn", "resnet50", "types", "accumulator", "decay", "trajectory", "identity_600k", "sequence", "slow")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def make_model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="shoal-models-generate",
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(arr), name)


def he_normal(rng: np.random.Generator, shape, fan_in: int) -> np.ndarray:
    std = np.sqrt(2.0 / fan_in)
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)


# --------------------------------------------------------------------------
# FFNN (Crayfish): 784 -> 32 -> 32 -> 32 -> 10, ReLU, softmax
# --------------------------------------------------------------------------


def build_ffnn(seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    dims = [784, 32, 32, 32, 10]
    nodes, inits = [], []
    x = "input"
    for i in range(len(dims) - 1):
        fan_in, fan_out = dims[i], dims[i + 1]
        w = he_normal(rng, (fan_in, fan_out), fan_in)
        b = (rng.standard_normal(fan_out, dtype=np.float32) * np.float32(0.01)).astype(np.float32)
        inits += [init(f"dense{i}.weight", w), init(f"dense{i}.bias", b)]
        y = f"dense{i}"
        nodes.append(helper.make_node("Gemm", [x, f"dense{i}.weight", f"dense{i}.bias"], [y], name=f"dense{i}"))
        x = y
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"relu{i}"], name=f"relu{i}"))
            x = f"relu{i}"
    nodes.append(helper.make_node("Softmax", [x], ["output"], name="softmax", axis=1))
    graph = helper.make_graph(
        nodes,
        "ffnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [BATCH, 784])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [BATCH, 10])],
        initializer=inits,
    )
    return make_model(graph, f"Crayfish FFNN 784-32-32-32-10 + softmax, random weights seed={seed}")


# --------------------------------------------------------------------------
# ResNet50 v1 (torchvision layout)
# --------------------------------------------------------------------------


class ResNetBuilder:
    # gamma of the last BN in each bottleneck (before the residual add).
    # 1.0 makes activations grow ~2x in variance per block; a small value keeps
    # the random network numerically tame (cf. torchvision zero_init_residual).
    RESIDUAL_GAMMA = 0.2

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def conv_bn(self, x: str, name: str, cin: int, cout: int, k: int, stride: int,
                relu: bool, gamma: float = 1.0) -> str:
        w = he_normal(self.rng, (cout, cin, k, k), cin * k * k)
        self.inits.append(init(f"{name}.weight", w))
        p = k // 2
        self.nodes.append(helper.make_node(
            "Conv", [x, f"{name}.weight"], [f"{name}.conv"], name=f"{name}.conv",
            kernel_shape=[k, k], strides=[stride, stride], pads=[p, p, p, p]))
        self.inits += [
            init(f"{name}.bn.scale", np.full(cout, gamma, np.float32)),
            init(f"{name}.bn.bias", np.zeros(cout, np.float32)),
            init(f"{name}.bn.mean", np.zeros(cout, np.float32)),
            init(f"{name}.bn.var", np.ones(cout, np.float32)),
        ]
        out = f"{name}.bn"
        self.nodes.append(helper.make_node(
            "BatchNormalization",
            [f"{name}.conv", f"{name}.bn.scale", f"{name}.bn.bias", f"{name}.bn.mean", f"{name}.bn.var"],
            [out], name=out, epsilon=1e-5))
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], [f"{name}.relu"], name=f"{name}.relu"))
            out = f"{name}.relu"
        return out

    def bottleneck(self, x: str, name: str, cin: int, width: int, stride: int) -> str:
        cout = width * 4
        y = self.conv_bn(x, f"{name}.conv1", cin, width, 1, 1, relu=True)
        y = self.conv_bn(y, f"{name}.conv2", width, width, 3, stride, relu=True)
        y = self.conv_bn(y, f"{name}.conv3", width, cout, 1, 1, relu=False, gamma=self.RESIDUAL_GAMMA)
        if stride != 1 or cin != cout:
            sc = self.conv_bn(x, f"{name}.downsample", cin, cout, 1, stride, relu=False)
        else:
            sc = x
        self.nodes.append(helper.make_node("Add", [y, sc], [f"{name}.add"], name=f"{name}.add"))
        self.nodes.append(helper.make_node("Relu", [f"{name}.add"], [f"{name}.out"], name=f"{name}.out"))
        return f"{name}.out"

    def build(self, seed: int) -> onnx.ModelProto:
        x = self.conv_bn("input", "conv1", 3, 64, 7, 2, relu=True)
        self.nodes.append(helper.make_node(
            "MaxPool", [x], ["maxpool"], name="maxpool",
            kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
        x, cin = "maxpool", 64
        for li, (blocks, width) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512]), start=1):
            for bi in range(blocks):
                stride = 2 if (bi == 0 and li > 1) else 1
                x = self.bottleneck(x, f"layer{li}.{bi}", cin, width, stride)
                cin = width * 4
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], ["avgpool"], name="avgpool"))
        self.nodes.append(helper.make_node("Flatten", ["avgpool"], ["flatten"], name="flatten", axis=1))
        fc_w = (self.rng.uniform(-1, 1, (1000, 2048)).astype(np.float32) / np.float32(np.sqrt(2048)))
        self.inits += [init("fc.weight", fc_w), init("fc.bias", np.zeros(1000, np.float32))]
        self.nodes.append(helper.make_node(
            "Gemm", ["flatten", "fc.weight", "fc.bias"], ["output"], name="fc", transB=1))
        graph = helper.make_graph(
            self.nodes,
            "resnet50",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [BATCH, 3, 224, 224])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, [BATCH, 1000])],
            initializer=self.inits,
        )
        return make_model(graph, f"ResNet50 v1 (torchvision layout), random weights seed={seed}")


def build_resnet50(seed: int) -> onnx.ModelProto:
    return ResNetBuilder(seed).build(seed)


# --------------------------------------------------------------------------
# types: one Identity per KServe datatype
# --------------------------------------------------------------------------

# suffix -> (onnx elem type, numpy dtype, KServe datatype)
TYPES = [
    ("bool", TensorProto.BOOL, np.bool_, "BOOL"),
    ("uint8", TensorProto.UINT8, np.uint8, "UINT8"),
    ("uint16", TensorProto.UINT16, np.uint16, "UINT16"),
    ("uint32", TensorProto.UINT32, np.uint32, "UINT32"),
    ("uint64", TensorProto.UINT64, np.uint64, "UINT64"),
    ("int8", TensorProto.INT8, np.int8, "INT8"),
    ("int16", TensorProto.INT16, np.int16, "INT16"),
    ("int32", TensorProto.INT32, np.int32, "INT32"),
    ("int64", TensorProto.INT64, np.int64, "INT64"),
    ("fp16", TensorProto.FLOAT16, np.float16, "FP16"),
    ("fp32", TensorProto.FLOAT, np.float32, "FP32"),
    ("fp64", TensorProto.DOUBLE, np.float64, "FP64"),
    ("bytes", TensorProto.STRING, np.object_, "BYTES"),
]


def build_types(seed: int) -> onnx.ModelProto:
    nodes, inputs, outputs = [], [], []
    for t, elem, _, _ in TYPES:
        inputs.append(helper.make_tensor_value_info(f"in_{t}", elem, [BATCH, 4]))
        outputs.append(helper.make_tensor_value_info(f"out_{t}", elem, [BATCH, 4]))
        nodes.append(helper.make_node("Identity", [f"in_{t}"], [f"out_{t}"], name=f"identity_{t}"))
    graph = helper.make_graph(nodes, "types", inputs, outputs)
    return make_model(graph, "Identity per datatype (in_<t> -> out_<t>), for end-to-end datatype tests")


def build_identity_600k(seed: int) -> onnx.ModelProto:
    """A ResNet50-sized tensor in and out with no compute, so a benchmark
    sees what moving it costs."""
    del seed
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [BATCH, 3, 224, 224])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [BATCH, 3, 224, 224])
    node = helper.make_node("Identity", ["input"], ["output"], name="identity")
    graph = helper.make_graph([node], "identity_600k", [x], [y])
    return make_model(graph, "Identity on [N,3,224,224] fp32, for transport benchmarks")


def keyed_state_io():
    """The inputs and outputs of the keyed-state models: x and h_in in,
    y and h_out out, each [BATCH, 4] float32."""
    return tuple(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [BATCH, 4])
        for n in ("x", "h_in", "h_out", "y")
    )


def build_accumulator(seed: int) -> onnx.ModelProto:
    """Keyed sequence state: h_out = h_in + x, y = h_out. The server feeds
    h_in from the key's stored h_out, so y is the running sum of the key's x."""
    del seed
    x, h_in, h_out, y = keyed_state_io()
    nodes = [
        helper.make_node("Add", ["h_in", "x"], ["h_out"], name="accumulate"),
        helper.make_node("Identity", ["h_out"], ["y"], name="emit"),
    ]
    graph = helper.make_graph(nodes, "accumulator", [x, h_in], [y, h_out])
    return make_model(graph, "Accumulator with keyed state: h_out = h_in + x, y = h_out")


def build_decay(seed: int) -> onnx.ModelProto:
    """Keyed sequence state that depends on the order of a key's events,
    not only on their sum: h_out = 0.5 * h_in + x, y = h_out. Replaying a
    key's events in another order, twice, or from a reset state gives
    other answers, so the Kafka tests can check order and state exactly
    (every value is a float32 sum of dyadic fractions: no rounding noise
    for small integer inputs)."""
    del seed
    x, h_in, h_out, y = keyed_state_io()
    nodes = [
        helper.make_node("Mul", ["h_in", "half"], ["kept"], name="decay"),
        helper.make_node("Add", ["kept", "x"], ["h_out"], name="accumulate"),
        helper.make_node("Identity", ["h_out"], ["y"], name="emit"),
    ]
    graph = helper.make_graph(nodes, "decay", [x, h_in], [y, h_out],
                              initializer=[init("half", np.full((1, 4), 0.5, np.float32))])
    return make_model(graph, "Order-sensitive keyed state: h_out = 0.5 * h_in + x, y = h_out")


def build_sequence(seed: int) -> onnx.ModelProto:
    """A Triton sequence model in the shape of Triton's `simple_sequence`
    example, with implicit state: the server feeds START, READY (INT32 0/1),
    CORRID (UINT64) and the state ACC_IN; acc = (START ? 0 : ACC_IN) +
    READY * INPUT, OUTPUT = ACC_OUT = acc, CORRID_OUT = CORRID (so a test
    sees which id the server fed)."""
    del seed
    def vi(name, t):
        return helper.make_tensor_value_info(name, t, [BATCH, 1])
    ins = [vi("INPUT", TensorProto.FLOAT), vi("START", TensorProto.INT32),
           vi("READY", TensorProto.INT32), vi("CORRID", TensorProto.UINT64),
           vi("ACC_IN", TensorProto.FLOAT)]
    outs = [vi("OUTPUT", TensorProto.FLOAT), vi("CORRID_OUT", TensorProto.INT64),
            vi("ACC_OUT", TensorProto.FLOAT)]
    nodes = [
        helper.make_node("Cast", ["START"], ["start_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["READY"], ["ready_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "start_f"], ["keep"]),
        helper.make_node("Mul", ["ACC_IN", "keep"], ["carried"]),
        helper.make_node("Mul", ["INPUT", "ready_f"], ["step"]),
        helper.make_node("Add", ["carried", "step"], ["ACC_OUT"]),
        helper.make_node("Identity", ["ACC_OUT"], ["OUTPUT"]),
        helper.make_node("Cast", ["CORRID"], ["CORRID_OUT"], to=TensorProto.INT64),
    ]
    graph = helper.make_graph(nodes, "sequence", ins, outs,
                              initializer=[init("one", np.ones((1, 1), np.float32))])
    return make_model(graph, "Sequence accumulator with START/READY/CORRID controls and implicit state")


def build_trajectory(seed: int) -> onnx.ModelProto:
    """The paper's trajectory step: the last 8 2-D positions of an agent
    ([N,8,2]) to 12 future positions ([N,12,2]), one seeded linear layer."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((16, 24)) / 4.0).astype(np.float32)
    b = (rng.standard_normal(24) / 10.0).astype(np.float32)
    positions = helper.make_tensor_value_info("positions", TensorProto.FLOAT, [BATCH, 8, 2])
    future = helper.make_tensor_value_info("future", TensorProto.FLOAT, [BATCH, 12, 2])
    nodes = [
        helper.make_node("Flatten", ["positions"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "w", "b"], ["dense"], name="dense"),
        helper.make_node("Reshape", ["dense", "out_shape"], ["future"], name="reshape"),
    ]
    inits = [init("w", w), init("b", b), init("out_shape", np.array([-1, 12, 2], dtype=np.int64))]
    graph = helper.make_graph(nodes, "trajectory", [positions], [future], inits)
    return make_model(graph, "Trajectory: last 8 positions [N,8,2] -> next 12 positions [N,12,2]")


# --------------------------------------------------------------------------
# verification with onnxruntime
# --------------------------------------------------------------------------

_ORT_DTYPE = {
    "tensor(bool)": np.bool_, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(int8)": np.int8,
    "tensor(int16)": np.int16, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
    "tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(double)": np.float64,
    "tensor(string)": np.object_,
}


def _sample(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    if dtype is np.object_:
        return np.array([f"s{i}-é" for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    if dtype is np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def verify(path: Path, name: str) -> str:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = [2 if not isinstance(d, int) else d for d in i.shape]
        feeds[i.name] = _sample(rng, _ORT_DTYPE[i.type], shape)
    t0 = time.perf_counter()
    outs = sess.run(None, feeds)
    dt = time.perf_counter() - t0
    summary = []
    for meta, out in zip(sess.get_outputs(), outs):
        if out.shape[0] != 2:
            raise RuntimeError(f"{name}: output {meta.name} has shape {out.shape}, expected batch 2")
        if out.dtype != object and np.issubdtype(out.dtype, np.floating) and not np.all(np.isfinite(out)):
            raise RuntimeError(f"{name}: output {meta.name} is not finite")
        if name.startswith("identity"):
            if not np.array_equal(out, feeds["input"]):
                raise RuntimeError(f"{name}: output does not echo its input")
            summary.append(f"{meta.name}{list(out.shape)} echoes its input")
        elif name.startswith("types"):
            src = feeds["in_" + meta.name[len("out_"):]]
            if not np.array_equal(out, src):
                raise RuntimeError(f"{name}: {meta.name} does not echo its input")
        else:
            summary.append(f"{meta.name}{list(out.shape)} min={out.min():.4g} max={out.max():.4g}")
    if name.startswith("ffnn"):
        sums = outs[0].sum(axis=1)
        if not np.allclose(sums, 1.0, atol=1e-4):
            raise RuntimeError(f"{name}: softmax rows do not sum to 1: {sums}")
    if name.startswith("types"):
        summary.append(f"{len(outs)} identity outputs echo inputs")
    return f"ort ok ({dt * 1000:.1f} ms): " + "; ".join(summary)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def _up_to_date(vdir: Path, seed: int) -> bool:
    marker = vdir / ".seed"
    return (vdir / "model.onnx").is_file() and marker.is_file() and marker.read_text().strip() == str(seed)


def _write(vdir: Path, model: onnx.ModelProto, seed: int) -> None:
    vdir.mkdir(parents=True, exist_ok=True)
    tmp = vdir / "model.onnx.tmp"
    onnx.save_model(model, str(tmp))
    os.replace(tmp, vdir / "model.onnx")
    (vdir / ".seed").write_text(f"{seed}\n")


def _report(label: str, vdir: Path, status: str, gen_s: float | None, verify_msg: str) -> None:
    size = (vdir / "model.onnx").stat().st_size
    gen = f"generated in {gen_s:.1f}s" if gen_s is not None else status
    print(f"{label:<18} {size / 1e6:8.2f} MB  {gen:<20} {verify_msg}", flush=True)


def build_slow(seed: int) -> onnx.ModelProto:
    """A model whose compute dominates, for backpressure tests: x [N, 16384]
    (64 KB a row) is summed to [N, 1024], run through 220 layers of
    tanh(h W) with one orthogonal 1024x1024 W (~460 MFLOP a row: a few
    hundred rows a second on one core, batched), and averaged to y [N, 8]."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((1024, 1024)))
    nodes = [
        helper.make_node("Reshape", ["x", "to_groups"], ["groups"], name="group"),
        helper.make_node("ReduceSum", ["groups", "last_axis"], ["h0"], name="sum", keepdims=0),
    ]
    h = "h0"
    for i in range(220):
        nodes.append(helper.make_node("MatMul", [h, "w"], [f"m{i}"], name=f"matmul{i}"))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"], name=f"tanh{i}"))
        h = f"h{i + 1}"
    nodes += [
        helper.make_node("Reshape", [h, "to_eight"], ["eight"], name="split"),
        helper.make_node("ReduceMean", ["eight"], ["y"], name="mean", axes=[2], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, 16384])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [BATCH, 8])],
        initializer=[
            init("w", q.astype(np.float32)),
            init("to_groups", np.array([-1, 1024, 16], np.int64)),
            init("last_axis", np.array([2], np.int64)),
            init("to_eight", np.array([-1, 8, 128], np.int64)),
        ],
    )
    return make_model(graph, f"Slow on purpose: 220 x tanh(h W), W 1024x1024 orthogonal, seed={seed}")


def main(argv=None) -> int:
    repo_root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=repo_root / "model_repository",
                    help="model repository directory (default: <repo>/model_repository)")
    ap.add_argument("--seed", type=int, default=42, help="base random seed (default 42)")
    ap.add_argument("--only", default=",".join(MODELS),
                    help=f"comma-separated subset of {','.join(MODELS)} (ffnn also writes ffnn_nobatch)")
    ap.add_argument("--force", action="store_true", help="regenerate even if the seed marker matches")
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    args = ap.parse_args(argv)

    only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = [m for m in only if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

    out: Path = args.out
    # (label, model dir, version, seed, builder or source dir to copy)
    jobs = []
    if "ffnn" in only:
        jobs += [
            ("ffnn/1", out / "ffnn" / "1", args.seed, build_ffnn),
            ("ffnn/2", out / "ffnn" / "2", args.seed + 1, build_ffnn),
            ("ffnn_nobatch/1", out / "ffnn_nobatch" / "1", args.seed, out / "ffnn" / "1"),
            # A model that exists only as Triton's config.pbtxt.
            ("ffnn_triton/1", out / "ffnn_triton" / "1", args.seed, out / "ffnn" / "1"),
            ("ffnn_triton/2", out / "ffnn_triton" / "2", args.seed + 1, out / "ffnn" / "2"),
        ]
    if "resnet50" in only:
        jobs.append(("resnet50/1", out / "resnet50" / "1", args.seed, build_resnet50))
    if "types" in only:
        jobs.append(("types/1", out / "types" / "1", args.seed, build_types))
    if "identity_600k" in only:
        jobs.append(("identity_600k/1", out / "identity_600k" / "1", args.seed, build_identity_600k))
    if "accumulator" in only:
        jobs += [
            ("accumulator/1", out / "accumulator" / "1", args.seed, build_accumulator),
            ("accumulator_rr/1", out / "accumulator_rr" / "1", args.seed, out / "accumulator" / "1"),
            ("accumulator_random/1", out / "accumulator_random" / "1", args.seed, out / "accumulator" / "1"),
        ]
    if "decay" in only:
        jobs.append(("decay/1", out / "decay" / "1", args.seed, build_decay))
    if "sequence" in only:
        jobs.append(("sequence/1", out / "sequence" / "1", args.seed, build_sequence))
    if "slow" in only:
        jobs.append(("slow/1", out / "slow" / "1", args.seed, build_slow))
    if "trajectory" in only:
        jobs += [
            ("trajectory/1", out / "trajectory" / "1", args.seed, build_trajectory),
            ("trajectory_skip/1", out / "trajectory_skip" / "1", args.seed, out / "trajectory" / "1"),
        ]

    for label, vdir, seed, src in jobs:
        gen_s = None
        if not args.force and _up_to_date(vdir, seed):
            status = "up to date"
        elif isinstance(src, Path):
            vdir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / "model.onnx", vdir / "model.onnx")
            (vdir / ".seed").write_text(f"{seed}\n")
            status = f"copied from {src.relative_to(out)}"
        else:
            t0 = time.perf_counter()
            model = src(seed)
            _write(vdir, model, seed)
            gen_s = time.perf_counter() - t0
            del model
            status = "generated"
        msg = "not verified" if args.no_verify else verify(vdir / "model.onnx", label)
        _report(label, vdir, status, gen_s, msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
