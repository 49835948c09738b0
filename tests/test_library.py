"""The library example in docs/library.md runs as written, and Calibration takes any iterable."""

import re
from pathlib import Path

import pytest
import torch

from eva_bench.init import Calibration

DOC = Path(__file__).resolve().parent.parent / "docs" / "library.md"


def test_the_documented_example_runs(capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    exec(compile(code, str(DOC), "exec"), {})
    out = capsys.readouterr().out
    assert re.match(r"eva [1-4] batches; 35 layers; ranks \[", out), out  # EVA stops early once converged


def test_a_dataloader_is_read_once_and_capped():
    reads = []

    def endless():
        while True:
            reads.append(1)
            yield torch.ones(2, 3)

    calibration = Calibration(endless(), forward=lambda m, x: m(x), max_batches=5)
    assert len(calibration.batches) == 5 and len(reads) == 5
    assert len(Calibration([torch.ones(1)] * 9, max_batches=3).batches) == 3
    with pytest.raises(ValueError, match="at least one batch"):
        Calibration(iter([]))
