"""`python -m cdi_ray …` — the same as the `cdi-ray` console script (:func:`cdi_ray.cli.run`)."""
from cdi_ray.cli import run

run()
