"""Fingerprints of the training programs: the sha256 of the StableHLO that the toy presets'
train step and Mean Teacher step lower to (on this machine's CPU, no compile), built the way
the modes build them.

    python experiments/fingerprint_steps.py

A change that only moves or renames code leaves both fingerprints as they were; run it before
and after such a change (the printed text has no source locations, so moved lines do not
count). A changed fingerprint means the device program changed: compile it for a TPU with
experiments/aot.py and record the memory before and after.
"""

import dataclasses
import hashlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from hassod_jax import defaults  # noqa: E402
from hassod_jax.modes import mean_teacher as mt_mode  # noqa: E402
from hassod_jax.modes import train as train_mode  # noqa: E402
from hassod_jax.train import mean_teacher, supervised  # noqa: E402


def _digest(text):
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main():
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    c = defaults.toy_training()
    model = train_mode.build_model(c)
    tx, sched = train_mode.make_optimizer(c)
    fn, _, _ = supervised.jit_train_step(model, tx, sched, mesh)
    state = jax.eval_shape(lambda r: supervised.init_state(model, tx, r), jax.random.PRNGKey(0))
    b, h, w, g = 2, 96, 128, 8
    batch = {"images": jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8),
             "image_sizes": jax.ShapeDtypeStruct((b, 2), jnp.int32),
             "boxes": jax.ShapeDtypeStruct((b, g, 4), jnp.float32),
             "masks": jax.ShapeDtypeStruct((b, g, h, w // 8), jnp.uint8),  # bit-packed
             "levels": jax.ShapeDtypeStruct((b, g), jnp.int32),
             "valid": jax.ShapeDtypeStruct((b, g), jnp.bool_)}  # fmt: skip
    text = fn.lower(state, batch, jax.random.PRNGKey(0)).as_text()
    print(f"train_step  {_digest(text)}  ({len(text)} characters)")

    mc = defaults.toy_mean_teacher()
    mtx, msched = mt_mode.make_optimizer(mc)
    mt_model = model.clone(config=dataclasses.replace(model.config, use_droploss=False))
    step = mt_mode.jit_mt_step(mc, mt_model, mtx, msched, mesh)
    variables = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 64, 64, 3))),
                               jax.random.PRNGKey(0))
    mstate = jax.eval_shape(lambda v: mean_teacher.init_mt_state(v, mtx), variables)
    views = dict(batch, images_strong=batch["images"])
    text = step.lower(mstate, views, views, jax.random.PRNGKey(0)).as_text()
    print(f"mt_step     {_digest(text)}  ({len(text)} characters)")


if __name__ == "__main__":
    main()
