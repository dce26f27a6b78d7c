"""Test session set-up.

Eight host devices are forced before JAX is imported anywhere, so that sharding tests
can compare a mesh of 8 CPU devices with a single device in the same process.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
