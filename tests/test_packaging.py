"""Each framework's half of the library imports without the other framework."""

import subprocess
import sys

import pytest


def run_without(blocked_modules, code):
    # A module set to None in sys.modules makes `import module` raise ImportError,
    # as if the framework were not installed.
    blocker = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked_modules)
    return subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True, timeout=300)


def test_pytorch_half_imports_without_jax():
    result = run_without(
        ["jax", "jaxlib", "optax", "flax"],
        "from stac_optimizer import STAC, STACPartition, LayerGroup, partition_trainable_layers\n"
        "from stam_optimizer.torch import STAM, STAMLite\n"
        "print('ok')\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_jax_half_imports_without_torch():
    result = run_without(
        ["torch"],
        "from stam_optimizer import STAM, STAMLite, stam, stam_lite\n"
        "from stac_optimizer.optax import stac\n"
        "print('ok')\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("module, name", [("stac_optimizer", "STACC"), ("stam_optimizer", "STAMM")])
def test_unknown_names_are_attribute_errors(module, name):
    imported = __import__(module)
    with pytest.raises(AttributeError, match=name):
        getattr(imported, name)
