"""Ray stages: thin layers that run the Ray-free math of ``r2f_ray.core`` and ``r2f_ray.pairdata`` at scale."""
