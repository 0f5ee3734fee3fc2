"""`python -m cdi_ray …` — the same as the `cdi-ray` console script."""
from cdi_ray.cli import main

raise SystemExit(main())
