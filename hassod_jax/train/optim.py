"""The detector's optimizer as detectron2 builds it for HASSOD (docs/recipe.md, Stage 2).

SGD with momentum 0.9, weight decay 5e-5 (none on normalisation parameters, detectron2's
WEIGHT_DECAY_NORM = 0), and each parameter tensor's gradient clipped to L2 norm 1.0 on its own
(detectron2's CLIP_TYPE "norm" clips per parameter, not globally). Order as in detectron2 +
torch.optim.SGD: clip the raw gradient, add wd * param, then the momentum update
buf = m * buf + g; param -= lr * buf.
"""

import jax
import jax.numpy as jnp
import optax


def clip_by_norm_per_tensor(max_norm):
    """Scales each leaf so its L2 norm is at most max_norm (torch clip_grad_norm_ per tensor)."""

    def update_fn(updates, state, params=None):
        del params

        def clip(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            # torch: clip_coef = max_norm / (norm + 1e-6), applied only when it is < 1.
            coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
            return (g * coef).astype(g.dtype)

        return jax.tree_util.tree_map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def is_norm_param(path):
    """True for BatchNorm/LayerNorm/GroupNorm scale and bias leaves (flax names)."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    # The detector's BatchNorms are norm1..3, norm (FPN), stem_norm and shortcut_norm.
    return any(
        n.startswith(("BatchNorm", "LayerNorm", "GroupNorm", "norm", "bn")) or n.endswith("_norm")
        for n in names[:-1]
    )


def weight_decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: not is_norm_param(p), params)


def sgd(learning_rate, momentum=0.9, weight_decay=5e-5, clip_norm=1.0):
    """optax chain: per-tensor clip -> decoupled-into-gradient weight decay -> SGD momentum."""
    parts = []
    if clip_norm is not None and clip_norm > 0:
        parts.append(clip_by_norm_per_tensor(clip_norm))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
    parts.append(optax.sgd(learning_rate, momentum=momentum))
    return optax.chain(*parts)
