"""LoRA methods as a sweep axis: `sweep.methods=[default,dora,pissa,loraplus,rslora]`."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from lora_lab.cli import main
from lora_lab.models import MLP
from lora_lab.pipeline import fusion
from lora_lab.pipeline.builders import build_module
from lora_lab.pipeline.methods import available_methods
from lora_lab.pipeline.plan import plan
from lora_lab.report.tables import method_comparison
from tests.pipeline.study_config import composed, tiny_study_overrides

ALL = "sweep.methods=[default,dora,pissa,loraplus,rslora]"


def test_every_method_is_an_option_of_the_lora_group():
    assert available_methods() == ["default", "dora", "loraplus", "pissa", "rslora"]


def test_a_method_sets_only_its_own_keys_over_the_study_settings():
    runs = plan(
        composed(ALL, "sweep.ranks=[2]", "lora.dropout=0.1", "lora.target_modules=[hidden.0]")
    )
    lora = {run.method: run for run in runs if run.stage == "lora"}
    assert [run.run_id for run in lora.values()] == [
        f"lora_{m}_r2_a2_s0" for m in ("default", "dora", "pissa", "loraplus", "rslora")
    ]
    assert lora["dora"].adapter == "rank_2_seed_0_method_dora"
    expected = {
        "default": (False, "kaiming", None, False),
        "dora": (True, "kaiming", None, False),
        "pissa": (False, "pissa", None, False),
        "loraplus": (False, "kaiming", 16, False),
        "rslora": (False, "kaiming", None, True),
    }
    for method, run in lora.items():
        settings = run.cfg.lora
        assert settings.method == method
        assert (
            settings.use_dora,
            settings.init,
            settings.loraplus_lr_ratio,
            settings.use_rslora,
        ) == (expected[method])
        assert settings.dropout == 0.1 and list(settings.target_modules) == ["hidden.0"]


def test_every_method_fuses_into_one_group():
    runs = [run for run in plan(composed(ALL, "sweep.ranks=[1,2]")) if run.stage == "lora"]
    assert fusion.fusable(runs) == ([runs], [])


def test_loraplus_gives_b_its_learning_rate_in_the_lightning_module(tmp_path: Path):
    cfg = plan(composed("lora=loraplus", "sweep.ranks=[2]", "module.optimizer.lr=0.01"))[-1].cfg
    weights = tmp_path / "w.safetensors"
    from lora_lab.models import save_network_weights

    save_network_weights(MLP(), weights)
    module = build_module(cfg, MLP(), weights)
    optimizer = module.configure_optimizers()
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    b_weights = {id(p) for n, p in module.network.named_parameters() if "lora_B" in n}
    assert set(by_lr) == {0.01, 0.16}
    assert by_lr[0.16] == b_weights


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "sweep.methods=[default,nosuch]",
            "sweep.methods=['default', 'nosuch'] is not allowed: 'nosuch' is not a LoRA method;"
            " choose from default, dora, loraplus, pissa, rslora",
        ),
        (
            "lora.loraplus_lr_ratio=0",
            "lora.loraplus_lr_ratio=0 is not allowed: it must be a finite number > 0",
        ),
        ("sweep.methods=[pissa]", "init='pissa' needs rank <= min(in, out) = 10"),
    ],
)
def test_bad_method_input_is_one_line_before_training(
    override: str, message: str, tmp_path: Path, tiny_overrides: list[str], capsys
):
    out = tmp_path / "study"
    # ranks up to 64: PiSSA cannot give the 64→10 head a rank above 10
    assert (
        main(["sweep", *tiny_overrides, f"output_dir={out}", "sweep.ranks=[1,64]", override]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-lab: error:") and "\n" not in err and message in err, err
    assert not out.exists()


@pytest.fixture(scope="module")
def method_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("methods")
    out = folder / "study"
    args = ["sweep", f"output_dir={out}", ALL, "sweep.ranks=[1,2]", *tiny_study_overrides(folder)]
    assert main(args) == 0
    return out


def test_a_methods_sweep_writes_the_method_column_plot_and_table(method_study: Path):
    table = pd.read_csv(method_study / "results.csv")
    lora = table[table.stage == "lora"]
    assert sorted(lora.method.unique()) == ["default", "dora", "loraplus", "pissa", "rslora"]
    assert table[table.stage != "lora"].method.isna().all()
    assert (table.status == "ok").all()
    # every method and rank of the seed in one training pass
    assert lora["pass"].nunique() == 1 and lora["pass"].iloc[0].startswith("fused_")
    report = (method_study / "report.md").read_text()
    assert "## Methods" in report
    assert "| rank | default | dora | loraplus | pissa | rslora | best |" in report
    assert (method_study / "accuracy_vs_rank.png").stat().st_size > 10_000


def test_method_adapters_are_saved_in_peft_form(method_study: Path):
    adapters = method_study / "adapters"
    dora = load_file(adapters / "rank_2_seed_0_method_dora" / "adapter_model.safetensors")
    assert any(key.endswith("lora_magnitude_vector") for key in dora)
    config = json.loads(
        (adapters / "rank_2_seed_0_method_dora" / "adapter_config.json").read_text()
    )
    assert config["use_dora"] is True
    # PiSSA: a plain LoRA of rank 2r relative to the unmodified pretrained weights
    pissa = json.loads(
        (adapters / "rank_2_seed_0_method_pissa" / "adapter_config.json").read_text()
    )
    assert pissa["r"] == 4 and pissa["init_lora_weights"] is True
    tensors = load_file(adapters / "rank_2_seed_0_method_pissa" / "adapter_model.safetensors")
    assert all(t.shape[0] == 4 for k, t in tensors.items() if "lora_A" in k)


def test_the_report_names_the_winner_per_rank_and_the_seed_spread():
    rows = []
    for seed, noise in enumerate((-0.002, 0.0, 0.002)):
        for method, acc in (("default", 0.80), ("dora", 0.83)):
            rows.append({"run_id": f"{method}{seed}", "stage": "lora", "method": method, "rank": 4,
                         "alpha": 4, "seed": seed, "learning_rate": 1e-3, "test_acc": acc + noise,
                         "status": "ok"})  # fmt: skip
    table, sentences = method_comparison(pd.DataFrame(rows).assign(**_blank_columns()))
    assert table.loc[0, "best"] == "dora (+3.00 points over default)"
    assert sentences == [
        "- rank 4: **dora** wins by 3.00 points over default (beyond the seed spread: sd up to "
        "0.20 points over 3 seeds)."
    ]


def _blank_columns() -> dict[str, object]:
    from lora_lab.results import COLUMNS as RESULT_COLUMNS

    given = {
        "run_id",
        "stage",
        "method",
        "rank",
        "alpha",
        "seed",
        "learning_rate",
        "test_acc",
        "status",
    }
    return {c: "" if c in ("per_class_acc", "run_dir", "pass", "error") else float("nan")
            for c in RESULT_COLUMNS if c not in given}  # fmt: skip


def test_tables_from_before_methods_read_as_default():
    # The report reads tables written without a method column: their LoRA rows are "default".
    from lora_lab.results import normalize_results

    frame = pd.DataFrame([{"run_id": "x", "stage": "lora", "rank": 1, "status": "ok"}])
    frame = frame.assign(**{k: v for k, v in _blank_columns().items() if k != "method"})
    frame = frame.drop(columns=[c for c in ("method",) if c in frame.columns])
    frame[["alpha", "seed", "learning_rate", "test_acc"]] = [1, 0, 1e-3, 0.5]
    assert normalize_results(frame).loc[0, "method"] == "default"
