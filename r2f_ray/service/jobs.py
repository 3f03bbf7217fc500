"""Unlearn jobs: persisted records and the single writer thread that runs them one after another.

Each job is a JSON file (written atomically) in ``state_dir/jobs``; its status goes
queued -> running -> succeeded | failed. After a restart, jobs still queued or running are queued
again (a running job had not committed anything, or the caller's ``recover`` finds its version), so
no accepted job is lost. An idempotency key maps to the one job it created.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from r2f_ray.io import write_json
from r2f_ray.service.schemas import ServiceError

PENDING = ("queued", "running")
log = logging.getLogger(__name__)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class JobQueue:
    """Accepts jobs, persists them, and runs ``execute(job) -> result`` on one thread, in order.

    ``execute`` raising marks the job failed with the exception's message; it must itself leave the
    model as it was (the service does). ``on_finish(job)`` runs after each job (metrics, audit).
    """

    def __init__(self, jobs_dir: str | Path, execute: Callable[[dict], dict], max_queued: int,
                 on_finish: Callable[[dict], None] | None = None):
        self.dir = Path(jobs_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._execute = execute
        self._on_finish = on_finish
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._jobs: dict[str, dict] = {}
        self._by_key: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        for path in sorted(self.dir.glob("job-*.json")):
            job = json.loads(path.read_text())
            self._jobs[job["job_id"]] = job
            if job.get("idempotency_key"):
                self._by_key[job["idempotency_key"]] = job["job_id"]

    def _save(self, job: dict) -> None:
        write_json(self.dir / f"{job['job_id']}.json", job)

    def submit(self, request: dict, fingerprint: str, actor: str, idempotency_key: str | None) -> tuple[dict, bool]:
        """Queue a job; returns (job, replayed). A known key with the same request returns its job."""
        with self._lock:
            if idempotency_key is not None and idempotency_key in self._by_key:
                job = self._jobs[self._by_key[idempotency_key]]
                if job["fingerprint"] != fingerprint:
                    raise ServiceError(409, "idempotency_conflict", f"idempotency_key {idempotency_key!r} was used for a "
                                       "different request; use a new key for a new request", "idempotency_key")
                return job, True
            waiting = sum(1 for j in self._jobs.values() if j["status"] == "queued")
            if waiting >= self._max_queued:
                raise ServiceError(429, "queue_full", f"{waiting} unlearn jobs are already waiting; retry later")
            job = {"job_id": f"job-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}",
                   "status": "queued", "created": _now(), "started": None, "finished": None, "actor": actor,
                   "idempotency_key": idempotency_key, "fingerprint": fingerprint, "request": request,
                   "result": None, "error": None, "attempts": 0}
            self._save(job)
            self._jobs[job["job_id"]] = job
            if idempotency_key is not None:
                self._by_key[idempotency_key] = job["job_id"]
        self._queue.put(job["job_id"])
        return dict(job), False

    def get(self, job_id: str) -> dict:
        with self._lock:
            if job_id not in self._jobs:
                raise ServiceError(404, "unknown_job", f"unknown job {job_id!r}; POST /v1/unlearn returns job ids", "job_id")
            return dict(self._jobs[job_id])

    def depth(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j["status"] in PENDING)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, recover: Callable[[dict], dict | None] | None = None) -> None:
        """Start the writer thread; first re-queue what a previous run accepted but did not finish.

        ``recover(job)`` returns the result of a job that had committed before the stop, else None.
        """
        pending = sorted((j for j in self._jobs.values() if j["status"] in PENDING), key=lambda j: j["created"])
        for job in pending:
            done = recover(job) if recover else None
            if done is not None:
                self._finish(job, "succeeded", result=done)
            else:
                job["status"] = "queued"
                self._save(job)
                self._queue.put(job["job_id"])
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="r2f-unlearn-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running job, leave the rest queued on disk for the next start."""
        if self._thread is not None:
            self._stopping.set()
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _finish(self, job: dict, status: str, result: dict | None = None, error: str | None = None) -> None:
        with self._lock:
            job.update(status=status, finished=_now(), result=result, error=error)
            self._save(job)
        if self._on_finish:
            self._on_finish(dict(job))

    def _run(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None or self._stopping.is_set():
                return
            job = self._jobs[job_id]
            with self._lock:
                job.update(status="running", started=_now(), attempts=job["attempts"] + 1)
                self._save(job)
            try:
                result = self._execute(dict(job))
            except Exception as e:  # the job fails; the service goes on with the next one
                if isinstance(e, ValueError):  # the engine refused the request (bad input, no safe step): not a fault
                    log.warning("unlearn job %s refused: %s", job_id, str(e)[:300])
                else:
                    log.exception("unlearn job %s failed", job_id)
                self._finish(job, "failed", error=f"{type(e).__name__}: {e}")
            else:
                self._finish(job, "succeeded", result=result)
