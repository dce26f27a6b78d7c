"""ResNet backbone (docs/recipe.md, Stage 2) in flax.linen, NHWC.

The architecture is torchvision's / detectron2's ResNet-50 "v1.5": the stride of a
bottleneck block sits in its 3x3 conv, the stem is conv7x7/2 + BN + ReLU + maxpool3x3/2,
and each stage's first block has a 1x1 projection shortcut. Nothing is frozen.

Batch norm and cross-device synchronisation: `BatchNorm` below has no `axis_name`. Under
`jax.jit` with the batch sharded over a `Mesh` (`NamedSharding`), the batch statistics are a
plain `mean` over the global batch axis, which XLA computes with a cross-device all-reduce,
so the statistics ARE synchronised across the data axis exactly as detectron2's SyncBN (no
`pmap`-style `axis_name` is needed or allowed). It follows torch's `BatchNorm2d` exactly:
normalise with the biased batch variance, but update the running variance with the UNBIASED
one (momentum 0.1, eps 1e-5); flax's own `nn.BatchNorm` updates with the biased variance.

Submodule names follow detectron2 (`stem_conv1`, `res2_0/conv1`, `res2_0/shortcut` ...),
so the conversion from torchvision or detectron2 names is mechanical
(`hassod_jax.weights.torch_resnet.load_resnet50`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_MOMENTUM_TORCH = 0.1  # torch convention: running = (1 - m) * running + m * batch
BN_EPS = 1e-5

# Detectron2's weight initialisers (fvcore/nn/weight_init.py), shared by every model family:
# c2_msra_fill = kaiming_normal_(mode="fan_out", relu); c2_xavier_fill = kaiming_uniform_(a=1).
c2_msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
c2_xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """Static ResNet configuration.

    block: "bottleneck" (ResNet-50 style, expansion 4) or "basic" (ResNet-18 style).
    stage_sizes: number of blocks in res2..res5.
    width: channels of res2's inner convs (64 for ResNet-50; detectron2's
      NUM_GROUPS * WIDTH_PER_GROUP); doubles per stage.
    stem_width: channels of the stem (detectron2's STEM_OUT_CHANNELS); None = `width`.
    """

    block: str = "bottleneck"
    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    stem_width: int | None = None

    def out_channels(self) -> dict[str, int]:
        expansion = 4 if self.block == "bottleneck" else 1
        return {f"res{i + 2}": self.width * (2**i) * expansion for i in range(4)}


RESNET50 = ResNetConfig()
# Small variant for tests and the CPU demo: ResNet-18-like basic blocks, narrower.
RESNET_SMALL = ResNetConfig(block="basic", stage_sizes=(1, 1, 1, 1), width=16)


class BatchNorm(nn.Module):
    """torch `BatchNorm2d` / detectron2 SyncBN over the last axis of NHWC inputs.

    Variables as flax's `nn.BatchNorm` (params `scale`, `bias`; batch_stats `mean`, `var`), so
    checkpoints and converters see the same tree. Training mode: statistics over every axis but
    the last, in float32, two-pass (mean, then the mean squared deviation); the output uses the
    biased variance; the running statistics move by `momentum` (torch convention) towards the
    batch mean and the unbiased batch variance (torch's `var * n / (n - 1)`).

    When the collection `bn_stats` is mutable, the batch statistics themselves are stored there
    (`mean`, unbiased `var`): PreciseBN (`hassod_jax.train.precise_bn`) averages them.
    """

    use_running_average: bool = True
    momentum: float = BN_MOMENTUM_TORCH
    epsilon: float = BN_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        f32 = jnp.float32
        scale = self.param("scale", nn.initializers.ones, (c,), f32)
        bias = self.param("bias", nn.initializers.zeros, (c,), f32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), f32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), f32))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            x32 = x.astype(f32)
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            n = 1
            for a in axes:
                n *= x.shape[a]
            unbiased = var * (n / max(n - 1, 1))
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
                ra_var.value = (1.0 - m) * ra_var.value + m * unbiased
                if self.is_mutable_collection("bn_stats"):
                    self.put_variable("bn_stats", "mean", mean)
                    self.put_variable("bn_stats", "var", unbiased)
        mul = scale * jax.lax.rsqrt(var + self.epsilon)
        # The arithmetic in float32 even for bfloat16 activations: x - mean cancels when the
        # mean is large against the spread, and bfloat16 keeps only ~3 significant digits.
        return ((x.astype(f32) - mean) * mul + bias).astype(self.dtype)


def batch_norm(train: bool, name: str, dtype: Any) -> BatchNorm:
    """BatchNorm as torch's defaults (momentum 0.1, eps 1e-5), float32 parameters."""
    return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


def _conv(features: int, k: int, stride: int, name: str, dtype: Any) -> nn.Conv:
    # Explicit symmetric padding k//2 as in torch (flax "SAME" pads asymmetrically for stride 2).
    p = k // 2
    return nn.Conv(
        features,
        (k, k),
        strides=(stride, stride),
        padding=((p, p), (p, p)),
        use_bias=False,
        kernel_init=c2_msra_fill,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here) -> 1x1 (x4), projection shortcut when shapes change."""

    inner: int
    out: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        d = self.dtype
        y = nn.relu(batch_norm(train, "norm1", d)(_conv(self.inner, 1, 1, "conv1", d)(x)))
        y = nn.relu(batch_norm(train, "norm2", d)(_conv(self.inner, 3, self.stride, "conv2", d)(y)))
        y = batch_norm(train, "norm3", d)(_conv(self.out, 1, 1, "conv3", d)(y))
        if x.shape[-1] != self.out or self.stride != 1:
            x = batch_norm(train, "shortcut_norm", d)(
                _conv(self.out, 1, self.stride, "shortcut", d)(x)
            )
        return nn.relu(x + y)


class BasicBlock(nn.Module):
    """3x3 (stride) -> 3x3, projection shortcut when shapes change (ResNet-18/34)."""

    inner: int
    out: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        d = self.dtype
        y = nn.relu(batch_norm(train, "norm1", d)(_conv(self.out, 3, self.stride, "conv1", d)(x)))
        y = batch_norm(train, "norm2", d)(_conv(self.out, 3, 1, "conv2", d)(y))
        if x.shape[-1] != self.out or self.stride != 1:
            x = batch_norm(train, "shortcut_norm", d)(
                _conv(self.out, 1, self.stride, "shortcut", d)(x)
            )
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet backbone.

    `__call__(images, train)`: images (B, H, W, 3) float, already normalised; returns
    {"res2": (B, H/4, W/4, C2), "res3": (B, H/8, ..), "res4": (B, H/16, ..),
    "res5": (B, H/32, ..)} in `dtype`.
    """

    config: ResNetConfig = RESNET50
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        cfg = self.config
        if cfg.block not in ("bottleneck", "basic"):
            raise ValueError(f"ResNetConfig.block must be 'bottleneck' or 'basic', got {cfg.block}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ResNet expects images (B, H, W, 3) NHWC, got {images.shape}")
        d = self.dtype
        x = images.astype(d)
        x = _conv(cfg.stem_width or cfg.width, 7, 2, "stem_conv1", d)(x)
        x = nn.relu(batch_norm(train, "stem_norm", d)(x))
        # reduce_window pads with -inf, like torch's max_pool2d(kernel 3, stride 2, padding 1).
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        outputs = {}
        expansion = 4 if cfg.block == "bottleneck" else 1
        block_cls = Bottleneck if cfg.block == "bottleneck" else BasicBlock
        for s, n_blocks in enumerate(cfg.stage_sizes):
            inner = cfg.width * 2**s
            for i in range(n_blocks):
                stride = 2 if (i == 0 and s > 0) else 1
                x = block_cls(inner, inner * expansion, stride, dtype=d, name=f"res{s + 2}_{i}")(
                    x, train
                )
            outputs[f"res{s + 2}"] = x
        return outputs
