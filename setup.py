"""hassod_jax: HASSOD (NeurIPS 2023) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="hassod_jax",
    version="0.1.0",
    description="Hierarchical Adaptive Self-Supervised Object Detection in JAX/Flax",
    packages=find_packages(include=["hassod_jax", "hassod_jax.*"]),
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
    ],
    extras_require={
        # torch and torchvision are reference oracles only; they must be installed together.
        "test": ["pytest", "torch>=2.9", "torchvision>=0.24"],
        "cuda": ["jax[cuda13]"],
        "tfds": ["tensorflow-datasets"],
    },
)
