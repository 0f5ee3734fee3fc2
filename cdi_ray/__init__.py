"""cdi-ray: copyrighted-data identification (CDI) for diffusion models, as a batch audit on Ray.

Layers (see docs/ARCHITECTURE.md):
  method   — models/, features/, stats/, images.py, seeding.py: plain PyTorch/NumPy, no Ray
  pipeline — pipeline/: Ray Data wiring (planning, feature actors, aggregator, feature store)
  surface  — cli.py, report/, jobs/
"""

__version__ = "0.1.0"
