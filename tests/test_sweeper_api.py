"""The skip_finished sweeper subclasses Hydra's private BasicSweeper (hydra._internal). pyproject.toml pins
hydra-core; these tests fail loudly, naming what moved, if an upgrade changes the parts the sweeper relies on."""

import inspect
import re
from importlib import metadata
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from hydra_plugins.eva_bench_sweeper.skip_finished_sweeper import SkipFinishedSweeper

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_hydra_core_is_the_pinned_version():
    pinned = re.search(r'"hydra-core==([^"]+)"', PYPROJECT.read_text()).group(1)
    assert metadata.version("hydra-core") == pinned, "hydra-core moved off its pin: rerun tests/test_sweeper_api.py"


def test_the_private_methods_the_sweeper_overrides_or_calls_keep_their_signatures():
    params = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert params(BasicSweeper.__init__) == ["self", "max_batch_size", "params"]
    assert params(BasicSweeper.setup) == ["self", "hydra_context", "task_function", "config"]
    assert params(BasicSweeper.sweep) == ["self", "arguments"]
    assert params(BasicSweeper.split_arguments) == ["overrides", "max_batch_size"]  # a staticmethod
    assert isinstance(inspect.getattr_static(BasicSweeper, "split_arguments"), staticmethod)
    assert params(BasicSweeper.split_overrides_to_chunks) == ["lst", "n"]
    assert issubclass(SkipFinishedSweeper, BasicSweeper)


def test_basic_sweeper_still_plans_through_split_arguments_and_keeps_the_attributes_read():
    """The sweeper's plan (skip finished runs) lives in its split_arguments override, so the base sweep() must call
    it through self; setup() must still set the attributes the sweeper reads."""
    sweep = inspect.getsource(BasicSweeper.sweep)
    assert "self.split_arguments(" in sweep
    setup = inspect.getsource(BasicSweeper.setup)
    for attribute in ("self.hydra_context", "self.config", "self.launcher"):
        assert f"{attribute} =" in setup, attribute
