"""The full R50 detector (`DetectorConfig()`, every field at its default: ResNet-50, 256-channel
FPN, 2000/4000 RPN top-k, 512 ROIs per image, 1024-wide box heads, 4-conv mask head) built by
`modes.train.build_model` for `config.model.size = 'r50'`, its backbone initialised by
`supervised.init_state(..., resnet_checkpoint=...)` from a torchvision ResNet-50 file the test
writes (`torch.save` of a randomly initialised `torchvision.models.resnet50` state dict), and
stepped once by the training step on two 64 x 64 images, float32.

Also `init_state`'s refusal of a checkpoint that does not fit the configured backbone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hassod_jax import defaults
from hassod_jax.models import detector as D
from hassod_jax.models import resnet
from hassod_jax.weights import torch_resnet
from hassod_jax.modes import train as train_mode
from hassod_jax.train import supervised
from tests.models.torch_resnet import resnet50_with_random_bn
from tests.xla_env import FAST_JIT

H = W = 64
B = 2


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
    model, _ = resnet50_with_random_bn()
    sd = model.state_dict()
    path = tmp_path_factory.mktemp("r50") / "dino_resnet50_pretrain.pth"
    torch.save(sd, path)
    return str(path), {k: v.numpy() for k, v in sd.items()}


def _config():
    c = defaults.training()
    c.model.size = "r50"
    c.dtype = "float32"
    c.batch_size = B
    c.max_iter = 10
    c.warmup_iters = 2
    c.warmup_factor = 1.0  # the first step at the base LR 0.01, so that every update shows
    return c


def _batch(seed=0):
    """Two H x W uint8 images with three instances each (one padding slot in image 1)."""
    r = np.random.default_rng(seed)
    images = r.integers(0, 256, size=(B, H, W, 3), dtype=np.uint8)
    boxes = np.array(
        [
            [[8, 10, 70, 90], [40, 30, 120, 110], [60, 5, 100, 40]],
            [[0, 0, 64, 64], [20, 50, 127, 127], [0, 0, 0, 0]],
        ],
        np.float32,
    ) * (H / 128)
    valid = np.array([[True, True, True], [True, True, False]])
    yy, xx = np.mgrid[0:H, 0:W]
    masks = (
        (xx >= boxes[..., 0, None, None])
        & (xx < boxes[..., 2, None, None])
        & (yy >= boxes[..., 1, None, None])
        & (yy < boxes[..., 3, None, None])
        & valid[..., None, None]
    )
    return {
        "images": images,
        "image_sizes": np.array([[H, W], [H, W * 7 // 8]], np.int32),
        "boxes": boxes,
        "masks": masks,
        "levels": np.array([[0, 1, 2], [0, 1, 0]], np.int32),
        "valid": valid,
    }


def test_full_r50_init_from_resnet_checkpoint_and_one_train_step(r50_file):
    path, tv = r50_file
    c = _config()
    model = train_mode.build_model(c)
    assert model.config == D.DetectorConfig()
    assert model.config.resnet == resnet.RESNET50
    tx, sched = train_mode.make_optimizer(c)
    rng = jax.random.PRNGKey(0)
    state = supervised.init_state(model, tx, rng, resnet_checkpoint=path)

    # The backbone is the file's (spot checks against torchvision's tensors, converted here:
    # conv (O, I, kh, kw) -> flax (kh, kw, I, O)); the loader's own renaming is tested in
    # test_resnet.py and test_resnet_d2_names.py.
    bb, bs = state.params["backbone"], state.batch_stats["backbone"]
    np.testing.assert_array_equal(
        np.asarray(bb["stem_conv1"]["kernel"]), tv["conv1.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(np.asarray(bs["stem_norm"]["mean"]), tv["bn1.running_mean"])
    np.testing.assert_array_equal(
        np.asarray(bb["res5_2"]["conv3"]["kernel"]),
        tv["layer4.2.conv3.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        np.asarray(bs["res3_0"]["shortcut_norm"]["var"]), tv["layer2.0.downsample.1.running_var"]
    )
    np.testing.assert_array_equal(
        np.asarray(bb["res4_5"]["norm2"]["scale"]), tv["layer3.5.bn2.weight"]
    )
    # Every backbone tensor came from the file: the whole subtree equals the loader's output.
    _, loaded = torch_resnet.load_resnet50(path)
    for coll, tree in (("params", bb), ("batch_stats", bs)):
        got = jax.tree_util.tree_leaves_with_path(tree)
        want = dict(jax.tree_util.tree_leaves_with_path(loaded[coll]))
        assert len(got) == len(want) == (265 - 53 * 2 if coll == "params" else 53 * 2)
        for p, leaf in got:
            np.testing.assert_array_equal(np.asarray(leaf), want[p], err_msg=str(p))
            assert leaf.dtype == jnp.float32
    step = jax.jit(supervised.make_train_step(model, tx, sched), compiler_options=FAST_JIT)
    batch = _batch()
    before = jax.tree_util.tree_map(np.asarray, (state.params, state.batch_stats))
    new, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()}, rng)
    metrics = jax.device_get(metrics)
    names = {"rpn/cls", "rpn/box", "mask"} | {
        f"stage{k}/{n}" for k in range(3) for n in ("cls", "box", "level")
    }
    assert names <= set(metrics)
    for k in names:
        assert np.isfinite(metrics[k]) and metrics[k] > 0, (k, metrics[k])
    np.testing.assert_allclose(
        metrics["total_loss"], sum(float(metrics[k]) for k in names), rtol=1e-5
    )
    assert int(new.step) == 1
    # The step moved every conv kernel and every head tensor (the backbone's BN scales and
    # biases are left out: at O(1) values their tiny first-step updates may round away in
    # float32), and the backbone's BN running statistics.
    moved = jax.tree_util.tree_map(
        lambda x, y: bool(np.any(np.asarray(x) != y)), new.params, before[0]
    )
    stuck = []
    for p, v in jax.tree_util.tree_leaves_with_path(moved):
        name = jax.tree_util.keystr(p)
        if not v and not (name.startswith("['backbone']") and "norm" in name):
            stuck.append(name)
    assert not stuck, stuck
    for p, leaf in jax.tree_util.tree_leaves_with_path(new.params):
        assert leaf.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(leaf))), p
    assert not np.array_equal(
        np.asarray(new.batch_stats["backbone"]["stem_norm"]["mean"]),
        before[1]["backbone"]["stem_norm"]["mean"],
    )


def test_init_state_refuses_a_resnet_checkpoint_that_does_not_fit(r50_file):
    path, _ = r50_file
    c = _config()
    c.model.size = "small"  # basic blocks, width 16: a ResNet-50 file does not fit
    model = train_mode.build_model(c)
    tx, _ = train_mode.make_optimizer(c)
    msg = (
        r"(?s)dino_resnet50_pretrain\.pth: checkpoint does not match ResNet\(.*"
        r"missing \(\d+\).*unexpected \(\d+\)"
    )
    with pytest.raises(ValueError, match=msg):
        supervised.init_state(model, tx, jax.random.PRNGKey(0), resnet_checkpoint=path)
