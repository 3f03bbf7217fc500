"""The unlearning service under load: /v1/generate latency (p50/p95) at several concurrency levels, with
no unlearn job and with unlearn jobs running back to back; unlearn job latency; failed requests.

    .venv/bin/python benchmarks/serve.py                          # SmolLM2-135M-Instruct, ~5 min on 2 cores
    .venv/bin/python benchmarks/serve.py --model tiny --requests 8  # quick check

The service runs exactly as `r2f serve` runs it: a local Ray (2 CPUs), one Serve replica (1 CPU) with
the FastAPI ingress, the naive decoder bank, a fresh state folder. Clients are threads of this process
sending real HTTP to 127.0.0.1 (one connection each), every request a greedy answer of
--max-new-tokens tokens to a chat prompt. Latency is client-side wall time per request. For the
"during unlearn" rows a background client keeps one unlearn job queued or running for the whole level
(next job submitted as soon as the last one ends); a generate request counts in that row only if its
time span overlapped a job's (submit to observed end). Job latency is submit to observed end, polled
every 0.1 s; the engine's own wall time is reported beside it. The mean batch size per level is read
from the service's Prometheus histogram.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402

from r2f_ray.client import R2FClient  # noqa: E402
from r2f_ray.io import write_json  # noqa: E402

QUESTIONS = ["What is the capital of France?", "What is the capital of Japan?", "What is the capital of Italy?",
             "What is the capital of Germany?", "What is the capital of Spain?", "What is the capital of Egypt?"]
FACTS = [("What is the capital of Canada?", "Ottawa"), ("What is the capital of Kenya?", "Nairobi"),
         ("What is the capital of Peru?", "Lima"), ("What is the capital of Norway?", "Oslo"),
         ("What is the capital of Greece?", "Athens"), ("What is the capital of Poland?", "Warsaw")]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def batch_stats(metrics_text: str) -> tuple[float, float]:
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("r2f_generate_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("r2f_generate_batch_size_count"):
            count = float(line.split()[-1])
    return total, count


class JobDriver(threading.Thread):
    """Keeps one unlearn job in the queue until stopped; records each job's span and result."""

    def __init__(self, url: str, token: str, step, views: int, start_index: int):
        super().__init__(daemon=True)
        self.client = R2FClient(url, token=token, timeout=600)
        self.step, self.views, self.index = step, views, start_index
        self.stop = threading.Event()
        self.spans: list[tuple[float, float]] = []
        self.jobs: list[dict] = []

    def run(self):
        while not self.stop.is_set():
            prompt, answer = FACTS[self.index % len(FACTS)]
            self.index += 1
            t0 = time.monotonic()
            job_id = self.client.unlearn([{"prompt": prompt, "answer": answer}], views=self.views, step=self.step)["job_id"]
            job = self.client.wait(job_id, timeout=1800, poll_s=0.1)
            t1 = time.monotonic()
            self.spans.append((t0, t1))
            self.jobs.append({"latency_s": t1 - t0, "status": job["status"], "error": job["error"],
                              "engine_wall_s": (job["result"] or {}).get("engine_wall_s"),
                              "version": (job["result"] or {}).get("version"), "answer": answer})


def run_level(url: str, concurrency: int, n_requests: int, max_new_tokens: int) -> list[dict]:
    """n_requests generate calls spread over `concurrency` threads; each result has start, end, ok, version."""
    results, lock = [], threading.Lock()
    todo = iter(range(n_requests))

    def worker():
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                t0 = time.monotonic()
                try:
                    r = http.post("/v1/generate", json={"prompt": QUESTIONS[i % len(QUESTIONS)], "max_new_tokens": max_new_tokens})
                    ok, version = r.status_code == 200, r.json().get("version") if r.status_code == 200 else None
                except httpx.HTTPError:
                    ok, version = False, None
                with lock:
                    results.append({"start": t0, "end": time.monotonic(), "ok": ok, "version": version})

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summarize(rows: list[dict]) -> dict:
    lat = [r["end"] - r["start"] for r in rows if r["ok"]]
    span = (max(r["end"] for r in rows) - min(r["start"] for r in rows)) if rows else float("nan")
    return {"requests": len(rows), "failed": sum(not r["ok"] for r in rows), "p50_s": percentile(lat, 0.5),
            "p95_s": percentile(lat, 0.95), "throughput_rps": len(lat) / span if span else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), 'tiny' or a folder")
    ap.add_argument("--concurrency", default="1,4,8", help="client threads per level, comma-separated")
    ap.add_argument("--requests", type=int, default=24, help="generate requests per level and phase")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--step", default="0.08", help="unlearn step: a number or 'auto' (slower: searches the step)")
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/results/serve.json")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    step = args.step if args.step == "auto" else float(args.step)

    import ray

    from r2f_ray.service.config import ServiceConfig
    from r2f_ray.service.deployment import run

    work = Path(tempfile.mkdtemp(prefix="r2f-serve-bench-"))
    token = secrets.token_hex(16)
    (work / "tokens").write_text(f"bench {token}\n")
    config = ServiceConfig(model=args.model, bank="naive", state_dir=work / "state", tokens_file=work / "tokens",
                           num_cpus=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    load_start = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    t0 = time.monotonic()
    run(config, port=port)
    client = R2FClient(url, token=token, timeout=600)
    while not client.ready():
        time.sleep(0.5)
    ready_s = time.monotonic() - t0
    print(f"service up in {ready_s:.1f} s ({args.model}, naive bank) at {url}", flush=True)
    run_level(url, 1, 2, args.max_new_tokens)  # warm-up, not counted

    rows, jobs_all = [], []
    for c in levels:
        for phase in ("idle", "during unlearn"):
            driver = None
            if phase == "during unlearn":
                driver = JobDriver(url, token, step, args.views, start_index=len(jobs_all))
                driver.start()
                time.sleep(0.5)  # the first job is queued before the load starts
            b0 = batch_stats(client.metrics())
            results = run_level(url, c, args.requests, args.max_new_tokens)
            b1 = batch_stats(client.metrics())
            if driver is not None:
                driver.stop.set()
                driver.join()
                spans = driver.spans
                results = [r for r in results if any(r["start"] < e and r["end"] > s for s, e in spans)]
                jobs_all += driver.jobs
            row = {"concurrency": c, "phase": phase, **summarize(results),
                   "mean_batch": (b1[0] - b0[0]) / max(b1[1] - b0[1], 1),
                   "versions_seen": sorted({r["version"] for r in results if r["version"]})}
            rows.append(row)
            print(f"  c={c:<2} {phase:<15} n={row['requests']:<3} failed={row['failed']} p50={row['p50_s']:.3f}s "
                  f"p95={row['p95_s']:.3f}s {row['throughput_rps']:.2f} req/s batch={row['mean_batch']:.1f}", flush=True)

    lat = [j["latency_s"] for j in jobs_all if j["status"] == "succeeded"]
    eng = [j["engine_wall_s"] for j in jobs_all if j["engine_wall_s"] is not None]
    job_summary = {"jobs": len(jobs_all), "succeeded": len(lat), "failed": sum(j["status"] == "failed" for j in jobs_all),
                   "latency_p50_s": percentile(lat, 0.5), "latency_max_s": max(lat, default=float("nan")),
                   "engine_wall_p50_s": percentile(eng, 0.5), "step": step, "views": args.views}
    load_end = os.getloadavg()
    ray.shutdown()

    print()
    print(f"/v1/generate on {args.model}, greedy {args.max_new_tokens} new tokens, client wall time per request")
    print(f"{'concurrency':>11} | {'phase':<15} | {'n':>3} | {'failed':>6} | {'p50 s':>7} | {'p95 s':>7} | {'req/s':>6} | {'batch':>5}")
    for r in rows:
        print(f"{r['concurrency']:>11} | {r['phase']:<15} | {r['requests']:>3} | {r['failed']:>6} | {r['p50_s']:>7.3f} | "
              f"{r['p95_s']:>7.3f} | {r['throughput_rps']:>6.2f} | {r['mean_batch']:>5.1f}")
    print(f"unlearn jobs (step {step}, {args.views} views, one fact each, naive bank): {job_summary['succeeded']}/"
          f"{job_summary['jobs']} succeeded; submit-to-done p50 {job_summary['latency_p50_s']:.1f} s, max "
          f"{job_summary['latency_max_s']:.1f} s; engine wall p50 {job_summary['engine_wall_p50_s']:.1f} s")
    print(f"failed generate requests in all: {sum(r['failed'] for r in rows)}; load average 1 min at start "
          f"{load_start[0]:.1f}, at end {load_end[0]:.1f} (2 cores, shared)")
    write_json(args.json, {"model": args.model, "max_new_tokens": args.max_new_tokens, "ready_s": ready_s,
                           "levels": rows, "jobs": job_summary, "job_details": jobs_all,
                           "loadavg_start": load_start, "loadavg_end": load_end,
                           "date": time.strftime("%Y-%m-%d", time.gmtime())})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
