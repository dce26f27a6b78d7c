"""hassod_jax: HASSOD (NeurIPS 2023) in JAX/Flax."""

from setuptools import Extension, find_packages, setup

# The host (CPU) HAC merge loop, hassod_jax/discovery/_hac_native.c: plain C and the Python C
# API only. Optional: without a C compiler the install goes on and hac.py falls back to its
# jit-compiled loop (same results, about 4x slower on CPU).
HAC_NATIVE = Extension(
    "hassod_jax.discovery._hac_native",
    sources=["hassod_jax/discovery/_hac_native.c"],
    extra_compile_args=["-O3"],
    optional=True,
)

setup(
    name="hassod_jax",
    version="0.1.0",
    description="Hierarchical Adaptive Self-Supervised Object Detection in JAX/Flax",
    packages=find_packages(include=["hassod_jax", "hassod_jax.*"]),
    ext_modules=[HAC_NATIVE],
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "clu",
        "absl-py",
        "tensorboardX",
        "pycocotools",
        "grain",
        "numpy",
        "scipy",
        "pillow",
        "scikit-image",
        "pydensecrf2",
        "safetensors",
        "ml_dtypes",
        "matplotlib",
    ],
    extras_require={
        # torch and torchvision are reference oracles only; they must be installed together.
        # tensorflow-datasets (without TensorFlow) prepares a tiny split for the TFDS-source
        # test; it imports importlib_resources without declaring it.
        "test": [
            "pytest",
            # Two test workers (pyproject's addopts): XLA compiles, which dominate the suite,
            # are mostly single-threaded, so two workers on a 2-core machine nearly halve it.
            "pytest-xdist>=3.8",  # --no-loadscope-reorder (3.8.0)
            "torch>=2.9",
            "torchvision>=0.24",
            "tensorflow-datasets",
            "importlib_resources",
            # The TPU compiler (libtpu, at the version this jax pins): tests/test_aot_tpu.py and
            # experiments/aot.py compile for TPU topologies on a CPU-only machine.
            "jax[tpu]",
        ],
        "cuda": ["jax[cuda13]"],
        "tfds": ["tensorflow-datasets", "importlib_resources"],
    },
)
