"""The XLA settings of the test session and of the processes its tests start.

The session forces 8 host devices (tests/conftest.py). The processes a test starts run on one
CPU device, as the README's commands do, and compile at the CPU backend's optimisation level 0
(`FAST_COMPILE`): each of them compiles a detector step or two and runs a few steps, and on a
2-core machine the compile is most of its time. Measured (2026-12-03, one core): the small
detector's Mean Teacher step compiled in 37 s instead of 60-70 s and its `init` in 5 s instead
of 15-23 s, while one step ran in 0.54 s instead of 0.19-0.24 s, with the same loss to 7 digits.
A process that trains for hundreds of steps (the learning checks) asks for `full_opt=True`:
compiled as users run it. The session itself keeps the default level: at level 0 the 8-device
Mean Teacher parity test's gradients differed from 1 device's by 3.4e-4 of their largest entry
in the mask head (a tolerance of 1e-4), against the float32 rounding it allows for at the default
level, and in-process tests are where the numbers are compared. HASSOD_TEST_FULL_OPT=1 compiles
every process as users do.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"
# The same level for ONE program of the session: `jax.jit(f, compiler_options=FAST_JIT)`, for a
# test that compiles a large step to run it once or twice and compares nothing at float32
# rounding across layouts (measured 2026-12-04: the small detector's Mean Teacher step compiled
# about 30 % faster, its update within 2.4e-6 of the default level's).
FAST_JIT = {"xla_backend_optimization_level": 0}


def session_flags(flags: str) -> str:
    """`flags` (XLA_FLAGS) with the session's 8 host devices."""
    if "xla_force_host_platform_device_count" not in flags:
        flags += " --xla_force_host_platform_device_count=8"
    return flags.strip()


def cpu_env(devices: int | None = None, full_opt: bool = False, cache=None, **extra) -> dict:
    """os.environ for a subprocess on the CPU: the session's XLA flags less its device count
    (one device, or `devices`), plus FAST_COMPILE unless `full_opt` or HASSOD_TEST_FULL_OPT;
    with `cache`, a persistent compilation cache there that keeps every compile (processes
    given the same folder do not compile again); no multi-process launcher variables; `extra`
    added."""
    keep = [f for f in os.environ.get("XLA_FLAGS", "").split()
            if "xla_force_host_platform_device_count" not in f]
    if devices is not None:
        keep.append(f"--xla_force_host_platform_device_count={devices}")
    if not full_opt and not os.environ.get("HASSOD_TEST_FULL_OPT") and not any(
            "xla_backend_optimization_level" in f for f in keep):
        keep.append(FAST_COMPILE)
    from hassod_jax.parallel import _DISTRIBUTED_ENV  # imports jax: not at the session's start

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(keep)}
    for k in _DISTRIBUTED_ENV:  # a process started here runs alone unless `extra` says otherwise
        env.pop(k, None)
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return {**env, **extra}
