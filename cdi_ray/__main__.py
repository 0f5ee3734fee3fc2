"""`python -m cdi_ray …` — the same as the `cdi-ray` console script (and it exits without the
interpreter's slow teardown: :func:`cdi_ray.pipeline.cluster.exit_process`)."""
from cdi_ray.cli import main
from cdi_ray.pipeline.cluster import exit_process

exit_process(main())
