#!/usr/bin/env python3
"""Closed-loop load generator for `fluxrt serve` (standard library only; loopback targets only).

C clients each send POST requests back to back (a new one as soon as the last answer arrived) for a fixed
number of requests or seconds, whichever ends first; then it prints throughput (requests/s and images/s),
latency percentiles and the status counts as one JSON line.

    python3 benches/serve_load.py --url http://127.0.0.1:8080 --concurrency 4 --requests 200 \
        --body '{"prompt": "a lighthouse", "size": "256x256"}'

Each request's prompt gets a counter appended unless --same-prompt is given, so the embedding cache does
not hide the text encoders.

Against the native endpoint (--path /v1/generate, JSON answers) it also reports the server-side run time
(`timings_ms.generate_total`) by batch size: the minimum and median per run and per image. Minimums are
robust to other load on the machine, so they show what batching gains even on a busy host.
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def percentile(values, p):
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--path", default="/v1/images/generations")
    ap.add_argument("--concurrency", "-c", type=int, default=1)
    ap.add_argument("--requests", "-n", type=int, default=100, help="total requests (all clients)")
    ap.add_argument("--duration", type=float, default=120.0, help="stop sending after this many seconds")
    ap.add_argument("--warmup", type=int, default=2, help="requests per client sent first and not counted")
    ap.add_argument("--body", default='{"prompt": "a lighthouse at dusk", "size": "256x256"}')
    ap.add_argument("--same-prompt", action="store_true")
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args()

    u = urllib.parse.urlparse(a.url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("this tool only targets loopback addresses")
    base = json.loads(a.body)
    images_per_request = base.get("n", base.get("num_images", 1))

    lock = threading.Lock()
    counter = [0]
    latencies, statuses = [], {}
    runs = {}  # images in the run -> [generate_total ms]
    sent = [0]
    start_barrier = threading.Barrier(a.concurrency + 1)
    stop_at = [0.0]

    def one(conn, count):
        body = dict(base)
        if not a.same_prompt:
            body["prompt"] = f"{base.get('prompt', '')} #{count}"
        data = json.dumps(body).encode()
        t0 = time.perf_counter()
        conn.request("POST", a.path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = resp.read()
        dt = time.perf_counter() - t0
        if resp.status == 200 and a.path == "/v1/generate":
            try:
                v = json.loads(payload)
                with lock:
                    runs.setdefault(v["batch"]["images"], []).append(v["timings_ms"]["generate_total"])
            except (ValueError, KeyError):
                pass
        return resp.status, dt

    def client(i):
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=a.timeout)
        for w in range(a.warmup):
            one(conn, -(i * 1000 + w) - 1)
        start_barrier.wait()
        while True:
            with lock:
                if sent[0] >= a.requests or time.perf_counter() > stop_at[0]:
                    break
                sent[0] += 1
                counter[0] += 1
                n = counter[0]
            try:
                status, dt = one(conn, n)
            except Exception as e:  # a broken connection counts as status 0, then reconnect
                status, dt = 0, 0.0
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=a.timeout)
                print(f"client {i}: {e}")
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(dt)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600
    start_barrier.wait()
    with lock:
        runs.clear()  # warm-up answers arrived before the barrier
    t0 = time.perf_counter()
    stop_at[0] = t0 + a.duration
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    # Each run was reported once per request in it: count runs, not reports.
    run_stats = {
        str(b): {
            "reports": len(ts),
            "min_ms": round(min(ts), 1),
            "median_ms": round(statistics.median(ts), 1),
            "min_ms_per_image": round(min(ts) / b, 1),
            "median_ms_per_image": round(statistics.median(ts) / b, 1),
        }
        for b, ts in sorted(runs.items())
    }
    print(json.dumps({
        "concurrency": a.concurrency,
        "requests": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "wall_s": round(wall, 3),
        "requests_per_s": round(ok / wall, 3),
        "images_per_s": round(ok * images_per_request / wall, 3),
        "latency_ms": {
            "p50": round(percentile(latencies, 50) * 1e3, 1) if latencies else None,
            "p90": round(percentile(latencies, 90) * 1e3, 1) if latencies else None,
            "p99": round(percentile(latencies, 99) * 1e3, 1) if latencies else None,
            "mean": round(statistics.mean(latencies) * 1e3, 1) if latencies else None,
            "max": round(max(latencies) * 1e3, 1) if latencies else None,
        },
        **({"server_run_ms_by_batch_images": run_stats} if run_stats else {}),
    }))


if __name__ == "__main__":
    main()
