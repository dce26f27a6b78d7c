"""Feature pyramid network (docs/recipe.md, Stage 2; detectron2 `modeling/backbone/fpn.py`).

P2..P5 from res2..res5 with a 1x1 lateral conv and a 3x3 output conv per level, each
followed by (synchronised) batch norm, nearest-neighbour 2x top-down upsampling, and P6 as
detectron2's `LastLevelMaxPool` (max-pool kernel 1, stride 2 of P5 = every other pixel).
As in detectron2, convs followed by a norm have no bias, and all convs use
`c2_xavier_fill` (kaiming-uniform with a=1 = variance scaling 1.0, fan_in, uniform).
BN synchronisation: see `hassod_jax.models.resnet` (global-batch mean under jit sharding).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from hassod_jax.models.resnet import batch_norm, c2_xavier_fill

FPN_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


class ConvNorm(nn.Module):
    """Conv (no bias when normed) + optional BatchNorm, detectron2's `Conv2d(norm=...)`."""

    features: int
    kernel: int
    use_norm: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        p = self.kernel // 2
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            padding=((p, p), (p, p)),
            use_bias=not self.use_norm,
            kernel_init=c2_xavier_fill,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="conv",
        )(x)
        if self.use_norm:
            x = batch_norm(train, "norm", self.dtype)(x)
        return x


def upsample_nearest_2x(x):
    """(B, H, W, C) -> (B, 2H, 2W, C), torch `F.interpolate(scale_factor=2, 'nearest')`."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FPN(nn.Module):
    """`__call__(feats, train)`: feats {"res2".."res5"} (B, H/s, W/s, C_s) NHWC with H, W
    multiples of 32; returns {"p2".."p6"} (B, H/s, W/s, channels), strides 4..64."""

    channels: int = 256
    use_norm: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats: dict, train: bool = False):
        names = ["res2", "res3", "res4", "res5"]
        for a, b in zip(names[:-1], names[1:]):
            ha, wa = feats[a].shape[1:3]
            hb, wb = feats[b].shape[1:3]
            if (ha, wa) != (2 * hb, 2 * wb):
                raise ValueError(
                    f"FPN: {a} {feats[a].shape} is not twice {b} {feats[b].shape}; pad images "
                    "to a multiple of 32"
                )
        outs = {}
        prev = None
        for i in (5, 4, 3, 2):
            lat = ConvNorm(self.channels, 1, self.use_norm, self.dtype, name=f"fpn_lateral{i}")(
                feats[f"res{i}"], train
            )
            prev = lat if prev is None else lat + upsample_nearest_2x(prev)
            outs[f"p{i}"] = ConvNorm(
                self.channels, 3, self.use_norm, self.dtype, name=f"fpn_output{i}"
            )(prev, train)
        outs["p6"] = outs["p5"][:, ::2, ::2, :]
        return {k: outs[k] for k in ("p2", "p3", "p4", "p5", "p6")}
