"""Deploy the unlearning service onto a running Ray cluster as a Ray job, then exit.

    ray job submit --working-dir . -- python jobs/deploy_service.py --config service.yaml \
        --set bank=/shared/banks/smollm2-r8 --set state_dir=/shared/r2f_state --set num_gpus=1

Same ServiceConfig (YAML + --set) as `r2f serve` and the RayService manifest. The job checks the config
(tokens, model, bank) before touching the cluster, deploys the Serve application, waits until
`/readyz` answers, prints the URL and exits 0; Serve keeps the application running after the job ends.
For a long-lived production service prefer the RayService in cluster/rayservice.yaml.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

from r2f_ray.cli import EXIT_USAGE
from r2f_ray.config import load_config


def wait_ready(url: str, timeout_s: float) -> float:
    """Seconds until GET {url}/readyz answered 200 (the model and active version are loaded)."""
    t0 = time.time()
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=10) as r:
                if r.status == 200:
                    return time.time() - t0
        except (urllib.error.URLError, OSError):
            pass
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"{url}/readyz did not answer 200 within {timeout_s:.0f} s; see the Serve logs")
        time.sleep(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy_service", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="ServiceConfig YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--host", default="0.0.0.0", help="HTTP host of Serve's proxy (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for /readyz (default 900)")
    args = parser.parse_args(argv)

    from r2f_ray.service.config import ServiceConfig
    from r2f_ray.service.core import preflight

    try:
        config = load_config(ServiceConfig, args.config, args.set)
        preflight(config)  # bad tokens, model or bank: a usage error now, not a failing replica later
    except ValueError as e:  # ConfigError included
        print(f"deploy_service: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    import ray

    from r2f_ray.service.deployment import run

    if not ray.is_initialized():  # under `ray job submit` this joins the job's cluster (RAY_ADDRESS)
        ray.init()
    run(config, host=args.host, port=args.port)
    url = f"http://{'127.0.0.1' if args.host == '0.0.0.0' else args.host}:{args.port}"
    waited = wait_ready(url, args.ready_timeout)
    print(f"deploy_service: {config.model} with bank {config.bank!r} is ready at {url} after {waited:.1f} s "
          f"(state in {config.state_dir}); the application keeps running after this job")
    return 0


if __name__ == "__main__":
    sys.exit(main())
