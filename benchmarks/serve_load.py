"""Load on `captioner serve`: requests/s and p50/p95 latency for 1 and 8 concurrent clients, batching on
(batches of up to 16 within 10 ms) and off (--max-batch 1), in the same run.

    python benchmarks/serve_load.py [--requests 48] [--clients 1 8] [--threads 0]
    python benchmarks/serve_load.py --large 16 [--good 24] [--side 9400]

--large N: memory under hostile load instead. One server (the shipped ensemble) gets N concurrent uploads of
a side x side PNG (9400 x 9400 is just under the 90-megapixel limit; made in memory, a few hundred KB)
while other clients post the example photos (--good requests in all). Prints the server's resident memory
before the load and its peak (VmHWM, from /proc/PID/status), what each large upload was answered, and
whether every good request was answered with a caption.

Starts one server per setting on 127.0.0.1 (an ephemeral port), warms it up, then each client posts the
example photos in turn, one request at a time. The figures depend on the machine and on what else runs
on it: compare the rows of one run, not runs on different machines.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import select
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PHOTOS = [p.read_bytes() for p in sorted((REPO / "examples").glob("*.jpg"))]


def start(extra: list[str], threads: int):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "captioner", "serve", "--port", "0", "--device", "cpu",
           "--threads", str(threads), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stderr], [], [], 1.0)[0]:
            match = re.search(r"listening on (http://\S+/)", proc.stderr.readline())
            if match:
                return proc, match.group(1)
    proc.kill()
    raise SystemExit("the server did not start")


def load(url: str, clients: int, requests: int) -> dict:
    latencies: list[float] = []

    def client(k: int):
        with httpx.Client(base_url=url, timeout=300) as http:
            for i in range(k, requests, clients):
                t = time.perf_counter()
                answer = http.post("/caption", files={"image": ("p.jpg", PHOTOS[i % len(PHOTOS)], "image/jpeg")})
                answer.raise_for_status()
                latencies.append(time.perf_counter() - t)

    start_time = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start_time
    latencies.sort()
    return {"rps": requests / wall, "p50": statistics.median(latencies) * 1000,
            "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000}


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the peak since the process started), in MB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # kB -> MB
    return fields


def large_png(side: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (side, side), (90, 140, 200))
    ImageDraw.Draw(img).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(230, 200, 60))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def hostile(args) -> None:
    big = large_png(args.side)
    print(f"{os.cpu_count()} cores; {args.large} concurrent uploads of a {args.side} x {args.side} PNG "
          f"({len(big) / 1e3:.0f} KB, {args.side * args.side / 1e6:.1f} MP) and {args.good} example photos")
    proc, url = start([], args.threads)
    try:
        with httpx.Client(base_url=url, timeout=600) as http:
            for photo in PHOTOS:  # warm-up
                http.post("/caption", files={"image": ("p.jpg", photo, "image/jpeg")}).raise_for_status()
            before = memory_mb(proc.pid)

        def upload(data: bytes, name: str):
            t = time.perf_counter()
            with httpx.Client(base_url=url, timeout=600) as http:
                answer = http.post("/caption", files={"image": (name, data, "image/png")})
            return answer.status_code, time.perf_counter() - t

        start_time = time.perf_counter()
        with ThreadPoolExecutor(args.large + 4) as pool:
            large = [pool.submit(upload, big, "large.png") for _ in range(args.large)]
            good = [pool.submit(upload, PHOTOS[i % len(PHOTOS)], "photo.jpg") for i in range(args.good)]
            large, good = [f.result() for f in large], [f.result() for f in good]
        wall = time.perf_counter() - start_time
        after = memory_mb(proc.pid)
        with httpx.Client(base_url=url, timeout=60) as http:
            served = http.get("/health").json()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    statuses = {code: sum(1 for c, _ in large if c == code) for code in sorted({c for c, _ in large})}
    good_ok = sum(1 for c, _ in good if c == 200)
    print(f"server RSS after warm-up {before['VmRSS']:.0f} MB; peak (VmHWM) {after['VmHWM']:.0f} MB "
          f"(target: under 2500 MB)")
    print(f"large uploads answered: {statuses}; good requests answered with a caption: {good_ok}/{len(good)} "
          f"(slowest {max(t for _, t in good):.1f} s); all done in {wall:.1f} s"
          + (f"; decode budget peak {served['decode_bytes_peak'] / 1e6:.0f} MB" if "decode_bytes_peak" in served
             else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48, help="requests per measurement")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients")
    ap.add_argument("--threads", type=int, default=0, help="the server's torch threads (0: all cores)")
    ap.add_argument("--large", type=int, default=0, help="concurrent large uploads (the memory mode)")
    ap.add_argument("--good", type=int, default=24, help="example photos posted alongside, in the memory mode")
    ap.add_argument("--side", type=int, default=9400, help="side of the large PNGs, in pixels")
    args = ap.parse_args()
    if args.large:
        hostile(args)
        return
    settings = {"batching on": ["--max-batch", "16", "--max-wait-ms", "10"],
                "batching off": ["--max-batch", "1", "--max-wait-ms", "0"]}
    print(f"{os.cpu_count()} cores; {args.requests} requests per row; example photos of ~200 KB")
    print(f"{'setting':<14} {'clients':>7} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'images/batch':>12}")
    for name, extra in settings.items():
        proc, url = start(extra, args.threads)
        try:
            with httpx.Client(base_url=url, timeout=300) as http:
                for photo in PHOTOS:  # warm-up: first-call allocations, lazy inits
                    http.post("/caption", files={"image": ("p.jpg", photo, "image/jpeg")}).raise_for_status()
                for clients in args.clients:
                    before = http.get("/health").json()
                    r = load(url, clients, args.requests)
                    after = http.get("/health").json()
                    per_batch = (after["images"] - before["images"]) / max(1, after["batches"] - before["batches"])
                    print(f"{name:<14} {clients:>7} {r['rps']:>7.2f} {r['p50']:>8.0f} {r['p95']:>8.0f} "
                          f"{per_batch:>12.1f}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
