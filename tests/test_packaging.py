"""The house rules: each framework's half imports without the other framework, the facades import only
``stac_stam``, and objects pickled under the old module paths still load."""

import ast
import pathlib
import pickle
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
TORCH_MODULES = {"torch"}
JAX_MODULES = {"jax", "jaxlib", "optax", "flax"}


def run_without(blocked_modules, code):
    # A module set to None in sys.modules makes `import module` raise ImportError,
    # as if the framework were not installed.
    blocker = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked_modules)
    return subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True, timeout=300)


def imported_modules(path):
    """The absolute module names a source file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module)
    return names


def sources(package):
    return sorted((SRC / package).rglob("*.py"))


def test_torch_modules_never_import_jax():
    for path in sources("stac_stam/torch"):
        roots = {name.split(".")[0] for name in imported_modules(path)}
        assert not roots & JAX_MODULES, path


def test_jax_modules_never_import_torch():
    for path in sources("stac_stam/jax"):
        roots = {name.split(".")[0] for name in imported_modules(path)}
        assert not roots & TORCH_MODULES, path


def test_framework_free_modules_import_no_framework():
    modules = sorted((SRC / "stac_stam").glob("*.py"))
    assert {path.name for path in modules} >= {"partition.py", "learning_rates.py"}
    for path in modules:
        roots = {name.split(".")[0] for name in imported_modules(path)}
        assert not roots & (TORCH_MODULES | JAX_MODULES), path


@pytest.mark.parametrize("facade", ["stac_optimizer", "stam_optimizer"])
def test_facades_import_only_stac_stam(facade):
    assert sources(facade)
    for path in sources(facade):
        for name in imported_modules(path):
            assert name == "importlib" or name.split(".")[0] == "stac_stam", f"{path} imports {name}"


def test_pytorch_half_imports_without_jax():
    result = run_without(
        ["jax", "jaxlib", "optax", "flax"],
        "from stac_optimizer import STAC, STACPartition, LayerGroup, partition_trainable_layers\n"
        "from stam_optimizer.torch import STAM, STAMLite\n"
        "from stac_stam.torch import STAC, STAM, STAMLite\n"
        "print('ok')\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_jax_half_imports_without_torch():
    result = run_without(
        ["torch"],
        "from stam_optimizer import STAM, STAMLite, stam, stam_lite\n"
        "from stac_optimizer.optax import stac\n"
        "from stac_stam.jax import stac, stam, stam_lite, STAM, STAMLite\n"
        "print('ok')\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("module, name", [("stac_optimizer", "STACC"), ("stam_optimizer", "STAMM")])
def test_unknown_names_are_attribute_errors(module, name):
    imported = __import__(module)
    with pytest.raises(AttributeError, match=name):
        getattr(imported, name)


def _pickled_under(old_module, obj):
    """``pickle.dumps(obj)`` with its class recorded under ``old_module``: pickle checks that the name there is
    the same class, so this fails unless the old path still serves it."""
    cls = type(obj)
    new_module = cls.__module__
    cls.__module__ = old_module
    try:
        data = pickle.dumps(obj)
    finally:
        cls.__module__ = new_module
    assert old_module.encode() in data
    return data


def test_torch_objects_pickled_under_the_old_paths_load():
    import torch

    from stac_stam.torch import STAC, STAM, STAMLite

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    for old_module, optimizer in [("stac_optimizer.stac", STAC(model)),
                                  ("stam_optimizer.torch.stam", STAM(model.parameters())),
                                  ("stam_optimizer.torch.stam_lite", STAMLite(model.parameters()))]:
        loaded = pickle.loads(_pickled_under(old_module, optimizer))
        assert type(loaded) is type(optimizer)
        assert len(loaded.param_groups) == len(optimizer.param_groups)
    partition = STAC(model).partition
    loaded = pickle.loads(_pickled_under("stac_optimizer.partition", partition))
    assert (loaded.sign_layer_names, loaded.adamw_layer_names) == (("0",), ("1",))


def test_jax_states_pickled_under_the_old_paths_load():
    import jax.numpy as jnp

    from stac_stam.jax import stam, stam_lite

    params = {"w": jnp.ones(3)}
    for old_module, transformation in [("stam_optimizer.jax.stam", stam()),
                                       ("stam_optimizer.jax.stam_lite", stam_lite())]:
        state = transformation.init(params)
        inner = state.inner_state[0]  # STAMState / STAMLiteState
        loaded = pickle.loads(_pickled_under(old_module, inner))
        assert type(loaded) is type(inner) and jnp.array_equal(loaded.count, inner.count)
        outer = pickle.loads(_pickled_under("stam_optimizer.jax._common", state._replace(inner_state=())))
        assert type(outer) is type(state)
