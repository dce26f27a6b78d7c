"""hassod_jax: HASSOD (Hierarchical Adaptive Self-Supervised Object Detection) in JAX/Flax.

The public names below are stable. They are imported lazily so that `import hassod_jax`
stays cheap and does not pull in optional dependencies (pycocotools, pydensecrf, ...)
that a given use does not need.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_dino_vit": "hassod_jax.weights.dino_vit",
    "dino_features": "hassod_jax.models.vit",
    "hac_partitions": "hassod_jax.discovery.hac",
    "hierarchy_levels": "hassod_jax.discovery.hierarchy",
    "dense_crf": "hassod_jax.discovery.crf",
    "load_resnet50": "hassod_jax.weights.torch_resnet",
    "load_detector": "hassod_jax.weights.detectron2",
    "detect": "hassod_jax.inference.predictor",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hassod_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
