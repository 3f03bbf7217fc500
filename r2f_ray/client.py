"""A small Python client of the unlearning service (the same operations as the HTTP API).

    client = R2FClient("http://127.0.0.1:8000", token="...")
    job = client.unlearn([{"prompt": "What is the capital of France?", "answer": "Paris"}], wait=True)
    client.generate("What is the capital of France?")["text"]
    client.activate(job["result"]["parent"])   # roll back
"""

from __future__ import annotations

import time

import httpx


class R2FClientError(Exception):
    """The service answered with an error: ``status``, ``code`` and ``message`` come from its JSON body."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class R2FClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "R2FClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> dict:
        r = self._http.request(method, path, **kwargs)
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                raise R2FClientError(r.status_code, err["code"], err["message"])
            except (ValueError, KeyError, TypeError):
                raise R2FClientError(r.status_code, "http_error", r.text[:500]) from None
        return r.json()

    def unlearn(self, requests: list[dict], views: int | None = None, step: float | str = "auto", method: str = "r2f",
                dry_run: bool = False, idempotency_key: str | None = None, wait: bool = False,
                wait_timeout: float = 600.0) -> dict:
        """Queue forget requests ({prompt, answer, id?}); returns the accepted job, or with ``wait`` the
        finished job (status succeeded or failed)."""
        body = {"requests": requests, "views": views, "step": step, "method": method, "dry_run": dry_run,
                "idempotency_key": idempotency_key}
        accepted = self._call("POST", "/v1/unlearn", json=body)
        return self.wait(accepted["job_id"], wait_timeout) if wait else accepted

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, timeout: float = 600.0, poll_s: float = 1.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in ("succeeded", "failed"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
            time.sleep(poll_s)

    def generate(self, prompt: str, max_new_tokens: int = 32, chat: bool = True) -> dict:
        return self._call("POST", "/v1/generate", json={"prompt": prompt, "max_new_tokens": max_new_tokens, "chat": chat})

    def models(self) -> dict:
        return self._call("GET", "/v1/models")

    def activate(self, version: str) -> dict:
        return self._call("POST", f"/v1/models/{version}/activate")

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def metrics(self) -> str:
        r = self._http.get("/metrics")
        r.raise_for_status()
        return r.text
