"""The public lazy API of `hassod_jax/__init__.py`: `__all__`, each name importable and the
object it names, and `import hassod_jax` staying cheap."""

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

import hassod_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The names documented so far and where they are defined; `__all__` may grow.
KNOWN = {
    "load_dino_vit": "hassod_jax.weights.dino_vit",
    "dino_features": "hassod_jax.models.vit",
    "hac_partitions": "hassod_jax.discovery.hac",
    "hierarchy_levels": "hassod_jax.discovery.hierarchy",
    "dense_crf": "hassod_jax.discovery.crf",
    "load_resnet50": "hassod_jax.weights.torch_resnet",
}
EXPORTED = [name for name in hassod_jax.__all__ if name != "__version__"]


def test_all_lists_every_export_once_and_the_known_names():
    assert len(set(hassod_jax.__all__)) == len(hassod_jax.__all__)
    assert "__version__" in hassod_jax.__all__
    assert set(EXPORTED) == set(hassod_jax._EXPORTS)
    assert set(KNOWN) <= set(EXPORTED), sorted(set(KNOWN) - set(EXPORTED))
    assert sorted(dir(hassod_jax)) == sorted(hassod_jax.__all__)


@pytest.mark.parametrize("name", EXPORTED)
def test_each_name_is_importable_and_is_the_module_object(name):
    module = importlib.import_module(hassod_jax._EXPORTS[name])
    assert getattr(hassod_jax, name) is getattr(module, name)
    assert callable(getattr(hassod_jax, name))
    if name in KNOWN:
        assert hassod_jax._EXPORTS[name] == KNOWN[name]
        assert getattr(hassod_jax, name) is getattr(importlib.import_module(KNOWN[name]), name)
    namespace = {}
    exec(f"from hassod_jax import {name}", namespace)  # the import statement form
    assert namespace[name] is getattr(module, name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        hassod_jax.no_such_name  # noqa: B018
    assert not hasattr(hassod_jax, "hac")  # submodules are not names of the package API
    with pytest.raises(ImportError):
        exec("from hassod_jax import no_such_name", {})


def test_version_is_the_installed_distribution_version():
    assert hassod_jax.__version__ == importlib.metadata.version("hassod_jax")


def test_import_is_cheap_and_lazy():
    """`import hassod_jax` imports none of the heavy or optional dependencies; the first use of
    a name imports only what that name needs."""
    heavy = ["jax", "flax", "torch", "pycocotools", "pydensecrf", "scipy", "skimage"]
    code = (
        "import json, sys\n"
        "import hassod_jax\n"
        f"heavy = {heavy!r}\n"
        "before = [m for m in heavy if m in sys.modules]\n"
        "hassod_jax.hierarchy_levels\n"
        "after = [m for m in heavy if m in sys.modules]\n"
        "print(json.dumps([hassod_jax.__file__, before, after]))\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    path, before, after = json.loads(r.stdout.strip().splitlines()[-1])
    assert os.path.dirname(path) == os.path.dirname(hassod_jax.__file__)
    assert before == []
    assert "torch" not in after and "pydensecrf" not in after and "flax" not in after
