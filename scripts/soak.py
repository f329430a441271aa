"""The soak (issue 16): mixed traffic against a real shoal for a long time.

Started by scripts/soak.sh. Traffic, each kind on its own threads, with the
unmodified tritonclient:

  rest_json    REST, JSON tensors            (ffnn)
  rest_binary  REST, binary-tensor extension (ffnn)
  grpc         gRPC unary                    (ffnn)
  stream       gRPC bidirectional stream     (ffnn)
  shm          system shared memory, gRPC    (ffnn)
  sequence     keyed state over REST and gRPC: sequences of 20 steps whose
               running sums are checked exactly (sequence)
  reload       the repository API reloads ffnn every minute
  burst        every five minutes, 96 clients at once for 20 s on a model
               with a queue of 8 (burst): refusals expected, with a status

The server's RSS, open file descriptors and threads are sampled every
second. The run fails if any request is lost (neither answered nor refused
with a status), any answer is wrong, the server dies, or a resource grows
without bound: the median of the last tenth of the run against the median
of its second and third minutes (after warm-up), RSS within 10% + 32 MiB,
file descriptors within 16, threads within 8. Writes samples.csv,
summary.json and rss.svg to the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

REFUSED = ("503", "StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED", "429")


class Counts:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_kind: dict[str, dict[str, int]] = {}
        self.errors: list[str] = []

    def add(self, kind: str, outcome: str, detail: str = ""):
        with self.lock:
            d = self.by_kind.setdefault(kind, {"ok": 0, "refused": 0, "lost": 0, "wrong": 0})
            d[outcome] += 1
            if outcome in ("lost", "wrong") and len(self.errors) < 50:
                self.errors.append(f"{kind}: {detail}")

    def total(self, outcome: str) -> int:
        with self.lock:
            return sum(d[outcome] for d in self.by_kind.values())


def outcome_of(e: Exception) -> str:
    text = str(e)
    status = getattr(e, "status", lambda: None)()
    if status and any(str(status).startswith(r) for r in REFUSED):
        return "refused"
    if any(r in text for r in REFUSED):
        return "refused"
    return "lost"


def ffnn_input(rng: np.random.Generator, rows: int = 1) -> np.ndarray:
    return rng.random((rows, 784), dtype=np.float32)


def check_ffnn(out: np.ndarray, rows: int) -> bool:
    # Softmax rows: shape and each row summing to one.
    return out.shape == (rows, 10) and bool(np.allclose(out.sum(axis=1), 1.0, atol=1e-4))


def worker(kind: str, stop: threading.Event, counts: Counts, fn, pause: float = 0.0):
    while not stop.is_set():
        try:
            ok = fn()
            counts.add(kind, "ok" if ok else "wrong", "" if ok else "wrong answer")
        except InferenceServerException as e:
            o = outcome_of(e)
            counts.add(kind, o, str(e))
            if o == "refused":
                time.sleep(0.1)  # the retry hint
        except Exception as e:  # noqa: BLE001 - a transport failure is a lost request
            counts.add(kind, "lost", repr(e))
            time.sleep(0.1)
        if pause:
            time.sleep(pause)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    counts = Counts()
    threads: list[threading.Thread] = []

    def spawn(kind, fn, n=1, pause=0.0):
        for _ in range(n):
            t = threading.Thread(target=worker, args=(kind, stop, counts, fn, pause), daemon=True)
            t.start()
            threads.append(t)

    local = threading.local()

    def http_client():
        if not hasattr(local, "http"):
            local.http = httpclient.InferenceServerClient(args.http, connection_timeout=30, network_timeout=30)
            local.rng = np.random.default_rng(threading.get_ident() % 2**32)
        return local.http, local.rng

    def grpc_client():
        if not hasattr(local, "grpc"):
            local.grpc = grpcclient.InferenceServerClient(args.grpc)
            local.rng = np.random.default_rng(threading.get_ident() % 2**32)
        return local.grpc, local.rng

    def rest(binary: bool):
        def call():
            c, rng = http_client()
            rows = int(rng.integers(1, 5))
            x = ffnn_input(rng, rows)
            i = httpclient.InferInput("input", list(x.shape), "FP32")
            i.set_data_from_numpy(x, binary_data=binary)
            o = httpclient.InferRequestedOutput("output", binary_data=binary)
            r = c.infer("ffnn", [i], outputs=[o])
            return check_ffnn(r.as_numpy("output"), rows)

        return call

    def grpc_unary():
        c, rng = grpc_client()
        x = ffnn_input(rng, 2)
        i = grpcclient.InferInput("input", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        r = c.infer("ffnn", [i])
        return check_ffnn(r.as_numpy("output"), 2)

    def stream_batch():
        # One stream per call: 16 requests, each answer checked by id.
        c, rng = grpc_client()
        answers: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result, error: answers.put((result, error)))
        try:
            for k in range(16):
                x = ffnn_input(rng, 1)
                i = grpcclient.InferInput("input", [1, 784], "FP32")
                i.set_data_from_numpy(x)
                c.async_stream_infer("ffnn", [i], request_id=str(k))
            ok = True
            for _ in range(16):
                result, error = answers.get(timeout=30)
                if error is not None:
                    raise error
                ok &= check_ffnn(result.as_numpy("output"), 1)
            return ok
        finally:
            c.stop_stream()

    def shm_call():
        c, rng = grpc_client()
        if not hasattr(local, "regions"):
            tag = uuid.uuid4().hex[:8]
            local.regions = []
            for name, size in (("in", 784 * 4), ("out", 10 * 4)):
                key = f"/soak_{tag}_{name}"
                h = shm.create_shared_memory_region(f"soak_{tag}_{name}", key, size)
                c.register_system_shared_memory(f"soak_{tag}_{name}", key, size)
                local.regions.append((f"soak_{tag}_{name}", h))
                all_regions.append(h)
        (in_name, in_h), (out_name, out_h) = local.regions
        x = ffnn_input(rng, 1)
        shm.set_shared_memory_region(in_h, [x])
        i = grpcclient.InferInput("input", [1, 784], "FP32")
        i.set_shared_memory(in_name, 784 * 4)
        o = grpcclient.InferRequestedOutput("output")
        o.set_shared_memory(out_name, 10 * 4)
        c.infer("ffnn", [i], outputs=[o])
        y = shm.get_contents_as_numpy(out_h, np.float32, [1, 10])
        return check_ffnn(y, 1)

    all_regions: list = []

    seq_ids = iter(range(1_000_000, 10_000_000))
    seq_lock = threading.Lock()

    def sequence(protocol: str):
        def call():
            c, rng = (grpc_client() if protocol == "grpc" else http_client())
            mod = grpcclient if protocol == "grpc" else httpclient
            with seq_lock:
                sid = next(seq_ids)
            values = [float(v) for v in rng.integers(1, 9, 20)]
            total = 0.0
            for k, v in enumerate(values):
                x = np.array([[v]], dtype=np.float32)
                i = mod.InferInput("INPUT", [1, 1], "FP32")
                i.set_data_from_numpy(x)
                r = c.infer("sequence", [i], sequence_id=sid, sequence_start=k == 0,
                            sequence_end=k == len(values) - 1)
                total += v
                if float(r.as_numpy("OUTPUT")[0][0]) != total:
                    return False
            return True

        return call

    def reload_ffnn():
        c, _ = http_client()
        c.load_model("ffnn")
        return True

    def burst_call():
        c, rng = http_client()
        x = ffnn_input(rng, 1)
        i = httpclient.InferInput("input", [1, 784], "FP32")
        i.set_data_from_numpy(x, binary_data=True)
        r = c.infer("burst", [i])
        return check_ffnn(r.as_numpy("output"), 1)

    spawn("rest_json", rest(False), 2)
    spawn("rest_binary", rest(True), 2)
    spawn("grpc", grpc_unary, 2)
    spawn("stream", stream_batch, 1)
    spawn("shm", shm_call, 1)
    spawn("sequence_grpc", sequence("grpc"), 1)
    spawn("sequence_http", sequence("http"), 1)
    spawn("reload", reload_ffnn, 1, pause=60.0)

    samples = []  # (t, rss, fds, threads)
    start = time.monotonic()
    end = start + args.minutes * 60
    burst_stop = threading.Event()
    bursts = 0
    next_burst = start + 60 if args.minutes < 5 else start + 240
    alive = True
    while time.monotonic() < end:
        t = time.monotonic() - start
        try:
            status = Path(f"/proc/{args.pid}/status").read_text()
            rss = int(next(l for l in status.splitlines() if l.startswith("VmRSS:")).split()[1]) * 1024
            th = int(next(l for l in status.splitlines() if l.startswith("Threads:")).split()[1])
            fds = len(os.listdir(f"/proc/{args.pid}/fd"))
        except (OSError, StopIteration):
            alive = False
            break
        samples.append((round(t, 1), rss, fds, th))
        if time.monotonic() >= next_burst:
            bursts += 1
            burst_stop.clear()
            burst_threads = []
            for _ in range(96):
                bt = threading.Thread(target=worker, args=("burst", burst_stop, counts, burst_call), daemon=True)
                bt.start()
                burst_threads.append(bt)
            threading.Timer(20, burst_stop.set).start()
            next_burst += 300
        time.sleep(1)
    stop.set()
    burst_stop.set()
    for t in threads:
        t.join(timeout=60)

    for h in all_regions:
        shm.destroy_shared_memory_region(h)

    with open(out / "samples.csv", "w") as f:
        f.write("t_s,rss_bytes,fds,threads\n")
        for s in samples:
            f.write(",".join(map(str, s)) + "\n")

    def med(rows, i):
        return statistics.median(r[i] for r in rows) if rows else 0

    warm = [s for s in samples if 60 <= s[0] < 180] or samples[: max(1, len(samples) // 10)]
    tail = samples[-max(1, len(samples) // 10):]
    growth = {
        "rss_mib": [med(warm, 1) / 2**20, med(tail, 1) / 2**20],
        "fds": [med(warm, 2), med(tail, 2)],
        "threads": [med(warm, 3), med(tail, 3)],
        "rss_peak_mib": max((s[1] for s in samples), default=0) / 2**20,
    }
    bounded = (
        med(tail, 1) <= med(warm, 1) * 1.10 + 32 * 2**20
        and med(tail, 2) <= med(warm, 2) + 16
        and med(tail, 3) <= med(warm, 3) + 8
    )
    summary = {
        "minutes": args.minutes,
        "server_alive": alive,
        "bursts": bursts,
        "counts": counts.by_kind,
        "answered": counts.total("ok"),
        "refused": counts.total("refused"),
        "lost": counts.total("lost"),
        "wrong": counts.total("wrong"),
        "errors": counts.errors,
        "resources": growth,
        "bounded": bounded,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_svg(out / "rss.svg", samples)
    print(json.dumps(summary, indent=2))
    ok = alive and bounded and summary["lost"] == 0 and summary["wrong"] == 0
    print("soak:", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


def write_svg(path: Path, samples):
    """RSS (MiB) and file descriptors over time, as a dependency-free SVG."""
    if not samples:
        return
    w, h, pad = 800, 300, 40
    t_max = max(s[0] for s in samples) or 1
    rss = [s[1] / 2**20 for s in samples]
    fds = [s[2] for s in samples]
    top = max(max(rss), max(fds)) * 1.1 or 1

    def line(vals, color):
        pts = " ".join(
            f"{pad + (s[0] / t_max) * (w - 2 * pad):.1f},{h - pad - (v / top) * (h - 2 * pad):.1f}"
            for s, v in zip(samples, vals)
        )
        return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>'

    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">'
        f'<rect width="{w}" height="{h}" fill="white"/>'
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>'
        f'{line(rss, "steelblue")}{line(fds, "darkorange")}'
        f'<text x="{pad}" y="20">shoal soak: RSS MiB (blue), open fds (orange); 0 to {top:.0f}, over {t_max / 60:.1f} min</text>'
        "</svg>"
    )
    path.write_text(svg)


if __name__ == "__main__":
    sys.exit(main())
