"""Guards against verdicts that training cannot explain (issue 10; METHOD.md "Known weaknesses").

* :mod:`.descriptors` — model-independent image descriptors (file traces, geometry, pixel and
  colour statistics, frequency spectrum, a fixed random conv net).
* :mod:`.model_free` — the model-free control: the calibrated default test on those descriptors;
  if it separates P from U, the verdict is ``inconclusive``.
* :mod:`.reference` — the reference-model control: the same audit on a model that cannot have
  seen P; if that model also "detects" P, the verdict is ``inconclusive``.

NumPy / SciPy / Pillow only (no Ray). See docs/VERDICTS.md.
"""
from .descriptors import (DESCRIPTOR_GROUPS, DESCRIPTOR_NAMES, DESCRIPTOR_VERSION, descriptor_key, descriptor_matrix,
                          image_descriptors)
from .model_free import CONTROL_ALPHA, MODEL_FREE, ControlResult, model_free_control, separating_descriptors
from .reference import REFERENCE_MODEL, reference_control

__all__ = ["image_descriptors", "descriptor_matrix", "descriptor_key", "DESCRIPTOR_NAMES", "DESCRIPTOR_GROUPS",
           "DESCRIPTOR_VERSION", "model_free_control", "separating_descriptors", "ControlResult", "CONTROL_ALPHA",
           "MODEL_FREE", "reference_control", "REFERENCE_MODEL"]
