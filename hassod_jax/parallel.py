"""Multi-device and multi-host set-up with JAX's own machinery (Mesh, shardings, distributed)."""

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh

from hassod_jax.utils import ConfigError

_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")


def distributed_requested(environ=None):
    """True when the environment launches several processes: a coordinator address is set, or
    TPU_WORKER_HOSTNAMES lists more than one host (comma-separated, as JAX's Cloud TPU cluster
    detection reads it). One host (a single TPU VM, or `localhost` left by a tool) is a
    single-process run: there is nobody to coordinate with."""
    environ = os.environ if environ is None else environ
    if any(environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")):
        return True
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return len(hosts) > 1


def maybe_initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
    """Calls `jax.distributed.initialize` when several processes take part.

    Explicit arguments win; otherwise the environment decides (`distributed_requested`: a JAX
    coordinator address or a TPU slice of several hosts; JAX then finds the rest itself). A
    single process started by hand is left alone. Returns True when the distributed runtime
    is up.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = coordinator_address is not None
    if not (explicit or distributed_requested()):
        return False
    kwargs = {}
    if explicit:
        kwargs = dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    jax.distributed.initialize(**kwargs)
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def local_mesh(axis_name="data"):
    """A 1-D mesh over this process's devices (used for per-host batch sharding)."""
    return Mesh(np.array(jax.local_devices()), (axis_name,))


def global_mesh(axis_name="data"):
    """A 1-D mesh over every device of every process."""
    return Mesh(np.array(jax.devices()), (axis_name,))


def shard_index(job_index=0, num_jobs=1):
    """(index, count) of this worker's slice of a dataset.

    Independent jobs (`job_index/num_jobs`) and JAX processes multiply: job j, process p of P
    gets slice j * P + p of num_jobs * P.
    """
    if not 0 <= job_index < num_jobs:
        raise ConfigError(
            f"--config.job_index must be in [0, --config.num_jobs); got {job_index} of {num_jobs}"
        )
    p, n = jax.process_index(), jax.process_count()
    return job_index * n + p, num_jobs * n
