"""The Ray Serve shell around ``UnlearnService``: one replica (the single writer of its state folder)
with a FastAPI ingress; generate requests are grouped by ``@serve.batch`` into one forward pass."""

from __future__ import annotations

import asyncio

from ray import serve

from r2f_ray.service.app import build_app
from r2f_ray.service.config import ServiceConfig
from r2f_ray.service.core import UnlearnService
from r2f_ray.service.schemas import GenerateBody

APP_NAME = "r2f-unlearn"


@serve.deployment(num_replicas=1)
@serve.ingress()
class UnlearnDeployment:
    def __init__(self, config: dict):
        self.service = UnlearnService(ServiceConfig.model_validate(config))
        self.generate.set_max_batch_size(self.service.config.batching.max_batch_size)
        self.generate.set_batch_wait_timeout_s(self.service.config.batching.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        return build_app(self.service, generate=self.generate)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate(self, items: list[GenerateBody]) -> list[dict]:
        return await asyncio.to_thread(self.service.generate_batch, items)

    def check_health(self) -> None:
        if not self.service.jobs.alive():
            raise RuntimeError("the unlearn writer thread has stopped")

    def __del__(self):
        if hasattr(self, "service"):  # the constructor may have failed
            self.service.close()


def build(config: ServiceConfig):
    """The bound application, with the replica's resources taken from the config."""
    return UnlearnDeployment.options(
        ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        max_ongoing_requests=config.max_ongoing_requests,
    ).bind(config.model_dump(mode="json"))


def run(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False,
        access_log: bool = True):
    """Start Serve's HTTP proxy on host:port and deploy the service there (Ray must be initialised).
    ``access_log=False`` keeps one log line per request out of the driver's output (the demo polls jobs)."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build(config), name=APP_NAME, route_prefix="/", blocking=blocking,
                     logging_config={"enable_access_log": access_log})


def app_builder(args: dict):
    """Entry point for `serve run` / RayService: ``r2f_ray.service.deployment:app_builder`` with the
    ServiceConfig fields as args."""
    return build(ServiceConfig.model_validate(args))
