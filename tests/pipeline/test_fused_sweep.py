"""`lora-lab sweep sweep.fused=true` gives the rows and files a sequential sweep gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lora_lab.cli import main
from lora_lab.lora import load_adapter, lora_layers
from lora_lab.models import MLP


def test_fused_sweep_matches_sequential(tmp_path: Path, tiny_overrides: list[str], capsys):
    fused, sequential = tmp_path / "fused", tmp_path / "sequential"
    fused_sweep = ["sweep", "sweep.ranks=[1,4]", "sweep.fused=true", f"output_dir={fused}"]
    assert main([*fused_sweep, *tiny_overrides]) == 0
    assert "fused: lora ranks 1,4 seed 0: 2 runs train in one pass" in capsys.readouterr().err
    assert main(["sweep", "sweep.ranks=[1,4]", f"output_dir={sequential}", *tiny_overrides]) == 0
    a, b = (pd.read_csv(d / "results.csv").set_index("run_id") for d in (fused, sequential))
    assert list(a.index) == list(b.index) and (a.status == "ok").all()
    np.testing.assert_allclose(a.test_loss, b.test_loss, rtol=0, atol=1e-5)
    assert (a.trainable_params == b.trainable_params).all()
    for rank in (1, 4):
        network = MLP()
        load_adapter(network, fused / "adapters" / f"rank_{rank}_seed_0")
        assert {layer.rank for layer in lora_layers(network).values()} == {rank}
    # the same command again skips the fused runs like any finished run
    assert main([*fused_sweep, *tiny_overrides]) == 0
    assert capsys.readouterr().err.count("done earlier, skipped") == 4
