"""The optimizer and schedules against torch.optim.SGD + clip_grad_norm_ and detectron2 formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hassod_jax.train import optim, schedules


def test_sgd_matches_torch_with_per_tensor_clipping_and_weight_decay():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shapes = {"conv": (3, 4), "bias": (4,), "big": (5, 5)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads_seq = [
        {
            k: (rng.normal(size=s) * (3.0 if k == "big" else 0.1)).astype(np.float32)
            for k, s in shapes.items()
        }
        for _ in range(5)
    ]
    sched = schedules.multistep_with_warmup(
        0.01, steps=(3,), gamma=0.1, warmup_iters=2, warmup_factor=0.001
    )

    tx = optim.sgd(sched, momentum=0.9, weight_decay=5e-5, clip_norm=1.0)
    p = jax.tree_util.tree_map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads_seq:
        updates, state = tx.update(jax.tree_util.tree_map(jnp.asarray, g), state, p)
        p = jax.tree_util.tree_map(lambda a, u: a + u, p, updates)

    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.SGD(list(tp.values()), lr=0.01, momentum=0.9, weight_decay=5e-5)
    for t, g in enumerate(grads_seq):
        for k in tp:
            tp[k].grad = torch.tensor(g[k], dtype=torch.float64)
            torch.nn.utils.clip_grad_norm_([tp[k]], 1.0)  # detectron2 clips each tensor alone
        lr = 0.01 * (0.1 if t >= 3 else 1.0)
        if t < 2:
            a = t / 2
            lr *= 0.001 * (1 - a) + a
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    for k in tp:
        np.testing.assert_allclose(np.asarray(p[k]), tp[k].detach().numpy(), rtol=2e-6, atol=1e-7)


def test_no_weight_decay_on_norm_parameters():
    params = {
        "BatchNorm_0": {"scale": jnp.ones(3), "bias": jnp.ones(3)},
        "Conv_0": {"kernel": jnp.ones(3)},
    }
    mask = optim.weight_decay_mask(params)
    assert mask == {"BatchNorm_0": {"scale": False, "bias": False}, "Conv_0": {"kernel": True}}


def test_cosine_and_adaptive_weights_follow_the_spec():
    s = schedules.cosine_with_warmup(0.01, 2000, warmup_iters=0)
    for t in (0, 500, 1000, 2000):
        assert float(s(t)) == pytest.approx(
            0.01 * 0.5 * (1 + math.cos(math.pi * t / 2000)), rel=1e-6
        )
    for t, (ws, wu) in {0: (1.0, 2.0), 1000: (0.5, 2.5), 2000: (0.0, 3.0)}.items():
        a, b = schedules.adaptive_loss_weights(t, 2000)
        assert float(a) == pytest.approx(ws, abs=1e-6) and float(b) == pytest.approx(wu, abs=1e-6)
