"""shoal's Kafka-native serving against MLServer's Kafka mode (issue 15):
the same FFNN (model_repository/ffnn/1/model.onnx, onnxruntime, one
intra-op thread), the same broker (one tansu), the same messages (KServe v2
REST JSON bodies of 784 float32, keyless, with MLServer's `mlserver-model`
header, which shoal carries over and ignores).

Per server: the throughput on a burst of N messages produced faster than
either scores (from the first answer to the last) and the end-to-end latency at a constant
RATE (from each request's send to its answer's receipt, matched by id:
MLServer carries no input header over). Run by
scripts/mlserver_kafka_bench.sh, which prepares MLServer's virtualenv.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("SHOAL_HOME", Path.home() / ".cache/shoal"))
N = int(os.environ.get("N", "20000"))
RATE = float(os.environ.get("RATE", "400"))
SECS = float(os.environ.get("SECS", "15"))
PARTITIONS = 4
SERVERS = os.environ.get("SERVERS", "shoal,mlserver").split(",")

RUNTIME = '''
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class FFNN(MLModel):
    async def load(self) -> bool:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self._session = ort.InferenceSession(self.settings.parameters.uri, so)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        (y,) = self._session.run(None, {"input": x})
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output("output", y)],
        )
'''


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, secs: float = 60) -> None:
    t = time.time()
    while time.time() - t < secs:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def templates():
    """Request bodies split around their id (ids must be unique: MLServer
    carries no input header over, so latency is matched by id)."""
    out = []
    for v in range(16):
        x = ((np.arange(784) * (v + 1)) % 255 / 255.0).astype(np.float32)
        b = json.dumps({
            "id": "@ID@",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": x.tolist()}],
        })
        head, tail = b.split("@ID@")
        out.append((head.encode(), tail.encode()))
    return out


def produce(brokers: str, topic: str, n: int, rate: float | None, sent: dict) -> None:
    """n requests with ids 0..n, as fast as possible or at `rate`; their
    send times go to `sent`."""
    p = Producer({"bootstrap.servers": brokers, "linger.ms": 2, "queue.buffering.max.messages": 1000000})
    bodies = templates()
    headers = [("mlserver-model", b"ffnn")]
    start = time.time()
    for i in range(n):
        if rate:
            due = start + i / rate
            while (d := due - time.time()) > 0:
                time.sleep(min(d, 0.005))
        head, tail = bodies[i % len(bodies)]
        value = head + str(i).encode() + tail
        sent[str(i)] = time.time()
        while True:
            try:
                p.produce(topic, value, headers=headers, partition=i % PARTITIONS)
                break
            except BufferError:
                p.poll(0.005)
        p.poll(0)
    p.flush(60)


def read_answers(brokers: str, topic: str, n: int, stall: float = 30.0):
    """(receipt time, request id) of the first n answers; stops after
    `stall` seconds with nothing new."""
    c = Consumer({
        "bootstrap.servers": brokers,
        "group.id": f"reader-{topic}",
        "enable.auto.commit": False,
        "fetch.wait.max.ms": 5,
    })
    c.assign([TopicPartition(topic, 0, 0)])
    got = []
    last = time.time()
    while len(got) < n and time.time() - last < stall:
        for m in c.consume(1000, 0.1):
            if m.error():
                continue
            got.append((time.time(), json.loads(m.value()).get("id")))
            last = time.time()
    c.close()
    return got


def start_shoal(brokers: str, inp: str, out: str, repo: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            str(ROOT / "target/release/shoal"),
            "--model-repository", str(repo),
            "--http-port", str(free_port()), "--grpc-port", str(free_port()),
            "--metrics-port", str(free_port()),
            "--kafka-brokers", brokers, "--kafka-input-topic", inp, "--kafka-output-topic", out,
            "--kafka-model", "ffnn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_mlserver(brokers: str, inp: str, out: str, work: Path) -> subprocess.Popen:
    models = work / "models"
    (models / "ffnn").mkdir(parents=True)
    (work / "ffnn_runtime.py").write_text(RUNTIME)
    (models / "ffnn" / "model-settings.json").write_text(json.dumps({
        "name": "ffnn",
        "implementation": "ffnn_runtime.FFNN",
        "parameters": {"uri": str(ROOT / "model_repository/ffnn/1/model.onnx")},
    }))
    (models / "settings.json").write_text(json.dumps({
        "http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port(),
        "kafka_enabled": True, "kafka_servers": brokers,
        "kafka_topic_input": inp, "kafka_topic_output": out,
        "parallel_workers": 0, "debug": False,
    }))
    env = dict(os.environ, PYTHONPATH=str(work))
    mlserver = Path(sys.executable).parent / "mlserver"
    return subprocess.Popen([str(mlserver), "start", str(models)], env=env, cwd=work,
                            stdout=subprocess.DEVNULL, stderr=open(work / "mlserver.log", "w"))


def percentiles(lat_ms):
    a = np.sort(np.array(lat_ms))
    return a[len(a) // 2], a[int(len(a) * 0.99) - 1]


def main() -> int:
    port = free_port()
    tansu = subprocess.Popen(
        [str(HOME / "tansu/bin/tansu"), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{port}", "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    brokers = f"127.0.0.1:{port}"
    rows = []
    try:
        wait_port(port)
        admin = AdminClient({"bootstrap.servers": brokers})
        for server in SERVERS:
            work = Path(tempfile.mkdtemp(prefix=f"bench-{server}-"))
            repo = work / "repo"
            if server == "shoal":
                repo.mkdir()
                os.symlink(ROOT / "model_repository/ffnn", repo / "ffnn")
            for phase in ("drain", "rate"):
                inp, out = f"{server}-{phase}-in", f"{server}-{phase}-out"
                for f in admin.create_topics([NewTopic(inp, PARTITIONS, 1), NewTopic(out, 1, 1)]).values():
                    f.result()
                proc = (start_shoal(brokers, inp, out, repo) if server == "shoal"
                        else start_mlserver(brokers, inp, out, work / phase))
                try:
                    # Joined the group, model loaded, consuming from the
                    # end (MLServer's consumer has no group and starts at
                    # the latest offset).
                    time.sleep(15)
                    sent: dict = {}
                    n = N if phase == "drain" else int(RATE * SECS)
                    producer = threading.Thread(
                        target=produce, args=(brokers, inp, n, None if phase == "drain" else RATE, sent))
                    producer.start()
                    got = read_answers(brokers, out, n, stall=60 if phase == "drain" else 30)
                    producer.join()
                    if phase == "drain":
                        # A burst produced faster than either server scores:
                        # from the first answer to the last.
                        span = got[-1][0] - got[0][0] if len(got) > 1 else float("nan")
                        drain = (len(got) - 1) / span if len(got) > 1 else 0.0
                        print(f"{server}: {len(got)} of {n} answers of a burst at {drain:.0f} msg/s", flush=True)
                    else:
                        lat = [(r - sent[i]) * 1000 for r, i in got if i in sent]
                        p50, p99 = percentiles(lat) if lat else (float("nan"),) * 2
                        print(f"{server}: {len(got)} of {n} at {RATE:.0f} msg/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms", flush=True)
                        rows.append((server, drain, p50, p99, len(got), n))
                finally:
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    finally:
        tansu.kill()
    print()
    print(f"| server | burst of {N}: msg/s | p50 / p99 at {RATE:.0f} msg/s | answered |")
    print("|---|---:|---:|---:|")
    for server, drain, p50, p99, got, n in rows:
        print(f"| {server} | {drain:,.0f} | {p50:.1f} / {p99:.1f} ms | {got} of {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
