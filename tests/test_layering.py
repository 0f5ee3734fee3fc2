"""The method layer must import and run without Ray (ARCHITECTURE.md: Ray only in pipeline/ and jobs/)."""
import subprocess
import sys

METHOD_MODULES = [
    "cdi_ray.seeding",
    "cdi_ray.models.base",
    "cdi_ray.models.loader",
    "cdi_ray.images",
    "cdi_ray.features.extractor",
    "cdi_ray.features.registry",
    "cdi_ray.stats",
    "cdi_ray.spec",
    "cdi_ray.sources",
    "cdi_ray.packing",
    "cdi_ray.conditioning",
]


def test_method_layer_imports_without_ray():
    # `sys.modules["ray"] = None` makes any `import ray` raise ImportError.
    code = "import sys; sys.modules['ray'] = None\n" + "\n".join(f"import {m}" for m in METHOD_MODULES)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
