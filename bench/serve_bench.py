"""Load benchmark of `alpamayo-jax serve`'s NIM endpoint: N clients post /v1/infer back to back for
a fixed time; reports throughput, latency percentiles, the server's own per-stage medians, and
that no request was lost (every request sent got an HTTP answer; errors by status).

Against a running server, or one it starts itself on the embedded tiny model:

    python bench/serve_bench.py --url http://127.0.0.1:8000 [--concurrency 8] [--duration 30]
    python bench/serve_bench.py --spawn-tiny [--concurrency 4] [--duration 20] [--image-size 1080x1920] \
        [--max-batch-clips 4]

Every request carries one synthetic clip (JPEG frames of --image-size, an arc history) and its own
seed. Requests in flight when the time is up are waited for and counted.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from importlib import resources
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from alpamayo_jax.processing.synthetic import synthetic_clip

TINY = resources.files("alpamayo_jax.tiny_model")
READY = re.compile(r"ready in .* HTTP on (http://\S+?), AlpaSim")


def payload(image_size: tuple[int, int]) -> dict:
    """A /v1/infer body: a synthetic clip's 16 frames as JPEG, its (yaw-only) history as egomotion rows."""
    clip = synthetic_clip(0, image_size=image_size)
    images = []
    for camera in clip.camera_frames:
        for frame in camera:
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(frame.transpose(1, 2, 0))).save(buffer, format="JPEG", quality=90)
            images.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    yaw = np.arctan2(clip.ego_history_rot[:, 1, 0], clip.ego_history_rot[:, 0, 0]).astype(np.float64)
    rows = [[*map(float, p), 0.0, 0.0, float(np.sin(a / 2)), float(np.cos(a / 2))]
            for p, a in zip(clip.ego_history_xyz, yaw, strict=True)]
    return {"images": images, "egomotion": rows}


def spawn_tiny(image_size: tuple[int, int], max_batch_clips: int = 1) -> tuple[subprocess.Popen, str]:
    """`python -m alpamayo_jax.serving` on the tiny model, free ports; returns (process, base URL)."""
    command = [sys.executable, "-m", "alpamayo_jax.serving", "--model", str(TINY / "hf"), "--processor-dir",
               str(TINY / "vlm"), "--http-port", "0", "--alpasim-port", "0", "--log-level", "WARNING",
               "--warmup-size", f"{image_size[0]}x{image_size[1]}", "--max-batch-clips", str(max_batch_clips)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false"))
    for line in process.stdout:
        print(f"  [server] {line.rstrip()}", file=sys.stderr)
        match = READY.search(line)
        if match:
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, match[1]
    raise RuntimeError(f"the server exited ({process.wait()}) before it was ready")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run(url: str, *, concurrency: int, duration: float, image_size: tuple[int, int], timeout: float) -> dict:
    base = payload(image_size)
    lock = threading.Lock()
    sent = 0
    latencies: list[float] = []
    statuses: Counter = Counter()
    failures: Counter = Counter()
    stages: dict[str, list[float]] = {}
    start = time.perf_counter()
    deadline = start + duration

    def client(index: int) -> None:
        nonlocal sent
        with httpx.Client(base_url=url, timeout=timeout) as http:
            n = 0
            while time.perf_counter() < deadline:
                body = json.dumps(dict(base, seed=index * 1_000_000 + n))
                n += 1
                with lock:
                    sent += 1
                began = time.perf_counter()
                try:
                    response = http.post("/v1/infer", content=body, headers={"content-type": "application/json"})
                except httpx.HTTPError as error:
                    with lock:
                        failures[type(error).__name__] += 1
                    continue
                elapsed = time.perf_counter() - began
                with lock:
                    statuses[response.status_code] += 1
                    if response.status_code == 200:
                        latencies.append(elapsed)
                        for stage, seconds in response.json()["timings"].items():
                            stages.setdefault(stage, []).append(seconds)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    answered = sum(statuses.values())
    return {
        "url": url, "concurrency": concurrency, "duration_s": duration, "wall_s": round(wall, 2),
        "image_size": list(image_size), "sent": sent, "answered": answered, "ok": statuses.get(200, 0),
        "lost": sent - answered, "transport_errors": dict(failures),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "throughput_rps": round(statuses.get(200, 0) / wall, 3),
        "latency_s": {"p50": round(percentile(latencies, 50), 4), "p99": round(percentile(latencies, 99), 4),
                      "mean": round(statistics.fmean(latencies), 4) if latencies else None,
                      "max": round(max(latencies), 4) if latencies else None},
        "server_stage_median_s": {stage: round(statistics.median(v), 4) for stage, v in stages.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--spawn-tiny", action="store_true", help="start a server on the embedded tiny model")
    parser.add_argument("--concurrency", type=int, default=4, help="clients posting back to back (default: 4)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (default: 20)")
    parser.add_argument("--image-size", default="1080x1920", help="HxW of the frames (default: 1080x1920)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    parser.add_argument("--max-batch-clips", type=int, default=1,
                        help="with --spawn-tiny: the server's --max-batch-clips (default: 1, no batching)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    height, width = (int(v) for v in args.image_size.lower().split("x"))
    process = None
    url = args.url
    if args.spawn_tiny:
        process, url = spawn_tiny((height, width), args.max_batch_clips)
    try:
        report = run(url, concurrency=args.concurrency, duration=args.duration, image_size=(height, width),
                     timeout=args.timeout)
    finally:
        if process is not None:
            process.terminate()
            report_exit = process.wait(120)
            print(f"  [server] exited with {report_exit}", file=sys.stderr)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["lost"] == 0 and report["ok"] == report["sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
