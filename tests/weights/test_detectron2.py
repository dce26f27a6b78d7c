"""Detector checkpoints in and out: the detectron2 fixture's model.pth, the full R50 key list of
a trained HASSOD checkpoint, Mean Teacher files, our own checkpoints, and every error path.
torch.load is the oracle for the files we write."""

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hassod_jax.models import detector as D
from hassod_jax.weights import detectron2 as W
from hassod_jax.weights.convert import main as convert_main
from hassod_jax.weights.torch_reader import CheckpointError, read_checkpoint
from hassod_jax.weights.torch_writer import save_torch_checkpoint
from tests.d2_fixture import fixture_path
from tests.xla_env import cpu_env

KEYS_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "..",
    "shared",
    "reference",
    "hassod_checkpoint_keys.txt",
)


@pytest.fixture(scope="module")
def fixture_pth():
    return os.path.join(fixture_path("model.pth"), "model.pth")


@pytest.fixture(scope="module")
def fixture_sd(fixture_pth):
    return read_checkpoint(fixture_pth)["model"]


def _same_tree(a, b):
    fa = jax.tree_util.tree_leaves_with_path(a)
    fb = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_round_trip_fixture_ours_pth_is_identical(tmp_path, fixture_pth):
    out = tmp_path / "model.pth"
    assert convert_main(["--detector", "--to", "detectron2", "--input", fixture_pth,
                         "--output", str(out)]) == 0
    ref = torch.load(fixture_pth, weights_only=True)["model"]
    got = torch.load(out, weights_only=True)["model"]
    assert list(got) == list(ref)  # same keys, in detectron2's registration order
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        assert torch.equal(got[k], ref[k]), k
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_exported_directory_round_trip(tmp_path, fixture_pth):
    module, variables = W.load_detector(fixture_pth)
    assert convert_main(["--detector", "--to", "hassod_jax", "--input", fixture_pth,
                         "--output", str(tmp_path / "exp")]) == 0
    module2, variables2 = W.load_detector(tmp_path / "exp")
    assert module2.config == module.config
    _same_tree(variables, variables2)


def test_full_r50_layout_matches_a_trained_hassod_checkpoint(tmp_path):
    """Our R50 DetectorConfig() exports exactly the 414 names, shapes and dtypes of a trained
    HASSOD checkpoint (reference list), in its order, and loads back."""
    path = fixture_path()  # noqa: F841 - the shared folder must be there (fails under CI)
    if not os.path.exists(KEYS_FILE):
        pytest.skip(f"{KEYS_FILE} is missing")
    want = []
    for line in open(KEYS_FILE):
        if line.strip():
            name, shape, dtype = line.rstrip("\n").split("\t")
            want.append((name, tuple(int(s) for s in shape.strip("()").split(",") if s.strip()),
                         dtype.replace("torch.", "")))
    assert len(want) == 414
    cfg = D.DetectorConfig()
    shapes = jax.eval_shape(
        lambda: D.CascadeMaskRCNN(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    )
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape, dtype=np.float32), shapes
    )
    sd = W.state_dict_from_detector_variables(variables, cfg)
    got = [(k, tuple(v.shape), str(v.dtype)) for k, v in sd.items()]
    assert got == want
    pth = tmp_path / "r50.pth"
    save_torch_checkpoint(pth, {"model": sd, "iteration": 39999})
    module, loaded = W.load_detector(pth)
    assert module.config == cfg
    _same_tree(jax.tree_util.tree_map(np.asarray, dict(variables)), loaded)


def test_teacher_student_file(tmp_path, fixture_sd):
    both = collections.OrderedDict()
    for k, v in fixture_sd.items():
        both["modelStudent." + k] = v
        both["modelTeacher." + k] = v * 2 if v.dtype == np.float32 else v
    path = tmp_path / "model_final.pth"
    save_torch_checkpoint(path, {"model": both, "iteration": 1999})
    _, student = W.load_detector(path)
    _, teacher = W.load_detector(path, which="teacher")
    k = student["params"]["mask_head"]["predictor"]["kernel"]
    np.testing.assert_array_equal(teacher["params"]["mask_head"]["predictor"]["kernel"], 2 * k)
    with pytest.raises(CheckpointError, match="not a teacher-student checkpoint"):
        W.load_detector(os.path.join(fixture_path("model.pth"), "model.pth"), which="teacher")


def test_our_training_checkpoint_loads(tmp_path):
    """A checkpoint without the stored model config (as written before it existed) loads, its
    widths from the tensors' shapes."""
    from hassod_jax.train import checkpoint as ckpt_lib
    from hassod_jax.train import optim, supervised

    model = D.CascadeMaskRCNN(D.SMALL_CONFIG)
    tx = optim.sgd(0.01)
    state = supervised.init_state(model, tx, jax.random.PRNGKey(1))
    ck = ckpt_lib.Checkpointer(tmp_path / "W" / "checkpoints")
    ck.save(3, state, {"it": 1})
    ck.save(7, state.replace(step=state.step + 7), {"it": 2})
    ck.close()
    for where in (tmp_path / "W", tmp_path / "W" / "checkpoints" / "7"):
        module, variables = W.load_detector(where)
        cfg = module.config
        assert cfg.resnet == D.SMALL_CONFIG.resnet
        assert (cfg.fpn_channels, cfg.box_fc_dim, cfg.mask_head_dim, cfg.mask_num_conv) == (
            D.SMALL_CONFIG.fpn_channels, D.SMALL_CONFIG.box_fc_dim,
            D.SMALL_CONFIG.mask_head_dim, D.SMALL_CONFIG.mask_num_conv,
        )
        _same_tree({"params": state.params, "batch_stats": state.batch_stats}, variables)
    with pytest.raises(CheckpointError, match="neither an exported detector"):
        W.load_detector(tmp_path)


def test_our_checkpoint_keeps_the_runs_model_config(tmp_path):
    """Training checkpoints store the run's DetectorConfig: loading one gives that config whole,
    fields no tensor shape shows included (score and NMS thresholds, proposal and detection
    counts, cascade IoUs), where inference from the shapes gives the defaults; overrides still
    apply; the run resumes with the stored item there."""
    import dataclasses

    from hassod_jax.train import checkpoint as ckpt_lib
    from hassod_jax.train import optim, supervised

    cfg = dataclasses.replace(
        D.SMALL_CONFIG, test_score_thresh=0.25, test_nms_thresh=0.6, rpn_post_nms_topk_test=77,
        detections_per_image=41, cascade_ious=(0.4, 0.5, 0.65), mask_max_fg=5,
    )
    model = D.CascadeMaskRCNN(cfg)
    tx = optim.sgd(0.01)
    state = supervised.init_state(model, tx, jax.random.PRNGKey(1))
    ck = ckpt_lib.Checkpointer(tmp_path / "W" / "checkpoints", model_config=cfg)
    ck.save(3, state, {"it": 1})
    ck.close()
    module, variables = W.load_detector(tmp_path / "W")
    assert module.config == cfg
    _same_tree({"params": state.params, "batch_stats": state.batch_stats}, variables)
    module, _ = W.load_detector(tmp_path / "W", detections_per_image=9)
    assert module.config == dataclasses.replace(cfg, detections_per_image=9)
    inferred, _ = W.load_detector(tmp_path / "W", saved_config=False)
    default = D.DetectorConfig()
    assert inferred.config.resnet == cfg.resnet and inferred.config.fpn_channels == cfg.fpn_channels
    assert (inferred.config.test_score_thresh, inferred.config.detections_per_image,
            inferred.config.cascade_ious) == (default.test_score_thresh,
                                              default.detections_per_image, default.cascade_ious)
    resumed = ckpt_lib.Checkpointer(tmp_path / "W" / "checkpoints", model_config=cfg)
    got, data = resumed.restore(state)
    resumed.close()
    assert data == {"it": 1} and int(got.step) == int(state.step)


def test_a_checkpoint_saved_on_8_devices_loads_on_1(tmp_path):
    """Trained on a mesh of 8 devices, predicted on one: the state replicated over the 8 forced
    host devices is saved as training saves it, then loaded in a process that has a single
    device (orbax alone refuses: 'Topology mismatch'). The loaded arrays equal the saved."""
    import subprocess
    import sys

    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from hassod_jax.train import checkpoint as ckpt_lib
    from hassod_jax.train import optim, supervised

    assert jax.device_count() == 8, "conftest forces 8 host devices"
    model = D.CascadeMaskRCNN(D.SMALL_CONFIG)
    state = supervised.init_state(model, optim.sgd(0.01), jax.random.PRNGKey(2))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    ck = ckpt_lib.Checkpointer(tmp_path / "W" / "checkpoints")
    ck.save(4, state, {})
    ck.close()
    np.savez(tmp_path / "want.npz", *[np.asarray(x) for x in jax.tree_util.tree_leaves(
        {"params": state.params, "batch_stats": state.batch_stats})])
    code = (
        "import sys, jax, numpy as np\n"
        "from hassod_jax.weights.detectron2 import load_detector\n"
        "assert jax.device_count() == 1\n"
        "_, v = load_detector(sys.argv[1])\n"
        "want = np.load(sys.argv[2])\n"
        "got = jax.tree_util.tree_leaves(v)\n"
        "assert len(got) == len(want.files), (len(got), len(want.files))\n"
        "for i, g in enumerate(got):\n"
        "    np.testing.assert_array_equal(np.asarray(g), want[f'arr_{i}'])\n"
        "print('LOADED', len(got))\n"
    )
    env = cpu_env()
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "W"), str(tmp_path / "want.npz")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LOADED" in r.stdout


def _write(tmp_path, sd, name="bad.pth"):
    path = tmp_path / name
    save_torch_checkpoint(path, {"model": collections.OrderedDict(sd)})
    return path


def test_error_paths_name_every_offending_tensor(tmp_path, fixture_sd):
    sd = dict(fixture_sd)
    # Missing.
    bad = {k: v for k, v in sd.items() if k != "roi_heads.mask_head.mask_fcn4.bias"}
    with pytest.raises(CheckpointError, match=r"missing \(1\): roi_heads\.mask_head\.mask_fcn4"):
        W.load_detector(_write(tmp_path, bad))
    # Unexpected.
    bad = dict(sd, **{"roi_heads.extra.weight": np.zeros((2, 3), np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): roi_heads\.extra\.weight \(2, 3\)"):
        W.load_detector(_write(tmp_path, bad))
    # Mismatched shape.
    bad = dict(sd, **{"roi_heads.box_head.1.fc2.weight": np.zeros((256, 128), np.float32)})
    with pytest.raises(CheckpointError, match=r"shape mismatch \(1\): roi_heads\.box_head\.1\.fc2"):
        W.load_detector(_write(tmp_path, bad))
    # No level head: a plain CutLER-style cascade.
    bad = {k: v for k, v in sd.items() if "level_predictor" not in k}
    with pytest.raises(CheckpointError, match="not a HASSOD detector"):
        W.load_detector(_write(tmp_path, bad))
    # Not a detector at all (a torchvision-named ResNet).
    with pytest.raises(CheckpointError, match="not a HASSOD/detectron2 detector"):
        W.load_detector(_write(tmp_path, {"conv1.weight": np.zeros((4, 3, 7, 7), np.float32)}))
    # Not a checkpoint; absent.
    junk = tmp_path / "junk.pth"
    junk.write_text("hello")
    with pytest.raises(CheckpointError, match="junk.pth"):
        W.load_detector(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        W.load_detector(tmp_path / "absent.pth")


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    rc = convert_main(["--detector", "--input", str(tmp_path / "absent.pth"),
                       "--output", str(tmp_path / "x.pth")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "absent.pth" in err


def test_torch_writer_against_torch_load(tmp_path):
    obj = {
        "model": collections.OrderedDict(
            a=np.arange(12, dtype=np.float32).reshape(3, 4),
            b=np.array(7, np.int64),
            c=np.arange(6, dtype=np.float64).reshape(2, 3).T,  # non-contiguous input
            d=np.array([True, False]),
            e=np.zeros((0, 5), np.float16),
        ),
        "iteration": 5,
        "name": "x",
    }
    path = tmp_path / "t.pth"
    save_torch_checkpoint(path, obj)
    for mmap in (False, True):
        got = torch.load(path, weights_only=True, mmap=mmap)
        assert got["iteration"] == 5 and got["name"] == "x"
        assert list(got["model"]) == list(obj["model"])
        for k, v in obj["model"].items():
            t = got["model"][k]
            assert tuple(t.shape) == v.shape and str(t.dtype) == f"torch.{v.dtype}"
            np.testing.assert_array_equal(t.numpy(), v)
    with pytest.raises(ValueError, match="cannot store"):
        save_torch_checkpoint(tmp_path / "bad.pth", {"x": object()})
