"""Fused rank sweep: fused adapters equal sequential ones, each adapter keeps its own scheduler
and dropout masks, outputs look like a sequential sweep's, and unfusable runs say why."""

from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from safetensors.torch import load_file
from torch import nn

from lora_lab.cli import CONF_DIR
from lora_lab.data.fakes import write_fake_mnist
from lora_lab.lora import LoRAConfig, inject_lora, load_adapter, lora_layers
from lora_lab.lora.grouped import GroupedLoRALinear, cross_entropy_per_adapter, group_networks
from lora_lab.models import MLP, save_network_weights
from lora_lab.models.fused import FusedLoRAModule
from lora_lab.pipeline import fused, fusion
from lora_lab.pipeline.checkpointing import epoch_checkpoint
from lora_lab.pipeline.plan import PlannedRun, plan
from lora_lab.pipeline.run_config import stage_config
from lora_lab.pipeline.sequential import execute, run_stage
from tests.pipeline.study_config import tiny_study_overrides

WEIGHTS = "adapter_model.safetensors"

PLATEAU = (
    "module.scheduler={_target_:torch.optim.lr_scheduler.ReduceLROnPlateau,"
    "_partial_:true,patience:0,factor:0.5}"
)


def composed_in(folder: Path, *overrides: str) -> DictConfig:
    """The tiny study of `tiny_study_overrides` on files under `folder`, writing to folder/out."""
    tiny = [*tiny_study_overrides(folder), f"output_dir={folder / 'out'}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*tiny, *overrides])


def lora_runs(cfg: DictConfig) -> list[PlannedRun]:
    return [run for run in plan(cfg) if run.stage == "lora"]


def base_weights(cfg: DictConfig, folder: Path) -> Path:
    """The study's pretrain checkpoint, trained as the study trains it (a second or so), so
    that the finetunes start above chance (a run that ends at chance is `diverged`)."""
    stage = run_stage(stage_config(cfg, "pretrain"), folder / "base")
    return folder / "base" / str(stage.result.artefact)


def init_weights(cfg: DictConfig, folder: Path) -> Path:
    """The network at a seeded init, as a pretrain checkpoint (for runs on random labels)."""
    torch.manual_seed(123)
    return save_network_weights(instantiate(cfg.model), folder / "pretrain.safetensors")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Ranks 1, 2, 4 trained fused and, as the reference, one after another by `run_stage`."""
    folder = tmp_path_factory.mktemp("fused")
    cfg = composed_in(
        folder,
        "sweep.ranks=[1,2,4]",
        "stages.lora.max_epochs=3",
        "trainer.limit_train_batches=3",
        "module.optimizer.lr=0.01",
        PLATEAU,
    )
    runs = lora_runs(cfg)
    pretrained = base_weights(cfg, folder)
    fused_rows = [
        r.to_record() for r in fused.run_fused_group(runs, folder / "fused", pretrained, {})
    ]
    sequential_rows = [
        execute(run, folder / "seq", {}, pretrained=pretrained)[0].to_record() for run in runs
    ]
    return SimpleNamespace(
        folder=folder,
        runs=runs,
        fused=fused_rows,
        sequential=sequential_rows,
        cfg=cfg,
        pretrained=pretrained,
    )


def test_fused_adapters_equal_sequential_ones(study: SimpleNamespace):
    for run in study.runs:
        name = f"adapters/rank_{run.rank}_seed_0/adapter_model.safetensors"
        together = load_file(study.folder / "fused" / name)
        alone = load_file(study.folder / "seq" / name)
        assert together.keys() == alone.keys()
        for key in alone:
            assert (together[key] - alone[key]).abs().max() < 1e-5, key
        assert any(t.abs().max() > 0 for k, t in together.items() if "lora_B" in k)  # trained


def test_outputs_look_like_a_sequential_sweep(study: SimpleNamespace):
    for together, alone in zip(study.fused, study.sequential, strict=True):
        assert list(together) == list(alone)  # the same columns, in the same order
        for key in ("run_id", "rank", "alpha", "seed", "learning_rate", "trainable_params"):
            assert together[key] == alone[key], key
        for key in ("total_params", "epochs", "run_dir", "status", "identity"):
            assert together[key] == alone[key], key
        assert together["test_loss"] == pytest.approx(alone["test_loss"], abs=1e-5)
        assert together["per_class_acc"].keys() == alone["per_class_acc"].keys()
        assert (study.folder / "fused" / together["run_dir"] / "result.json").is_file()
        logs = [
            pd.read_csv(root / together["run_dir"] / "logs" / "metrics.csv")
            for root in (study.folder / "fused", study.folder / "seq")
        ]
        assert list(logs[0].columns) == list(logs[1].columns)
        assert logs[0][["epoch", "step"]].equals(logs[1][["epoch", "step"]])
        assert logs[0].drop(columns=["epoch", "step"]).fillna(0).to_numpy() == pytest.approx(
            logs[1].drop(columns=["epoch", "step"]).fillna(0).to_numpy(), abs=1e-4
        )
        network = MLP()
        load_adapter(
            network, study.folder / "fused" / "adapters" / f"rank_{together['rank']}_seed_0"
        )
        assert all(layer.rank == together["rank"] for layer in lora_layers(network).values())


def test_each_adapter_follows_its_own_plateau_scheduler(
    study: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
):
    # Scripted validation losses: member 0 keeps improving, member 1 never does.
    epoch = {"n": 0}
    real = FusedLoRAModule._epoch_metrics

    def scripted(self: FusedLoRAModule, split: str) -> dict[int, dict[str, float]]:
        if split != "val":
            return real(self, split)
        epoch["n"] += 1
        return {0: {"val_loss": 1.0 / epoch["n"]}, 1: {"val_loss": 1.0 + epoch["n"]}}

    monkeypatch.setattr(FusedLoRAModule, "_epoch_metrics", scripted)
    members, module, datamodule = fused.build_pass(
        study.runs[:2], study.folder / "plateau", study.pretrained
    )
    trainer = instantiate(members[0].cfg.trainer, logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)  # the stock Trainer drives the fused module
    assert epoch["n"] == 3
    first, second = [group["lr"] for opt in trainer.optimizers for group in opt.param_groups]
    lr = 0.01
    assert first == pytest.approx(lr)
    # patience 0: every epoch after the first is a plateau for the second member
    assert second == pytest.approx(lr * 0.5 ** (epoch["n"] - 1))


def _twin_adapters(dropout: float) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    network = MLP(input_shape=(6,), num_classes=3, hidden_sizes=(5,), dropout=dropout)
    inject_lora(network, LoRAConfig(rank=2, alpha=2, dropout=dropout))
    with torch.no_grad():
        for layer in lora_layers(network).values():
            layer.lora_B.weight.normal_()
    return network, copy.deepcopy(network)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_dropout_masks_are_drawn_per_adapter(dropout: float):
    twins = _twin_adapters(dropout)
    grouped = group_networks(twins)
    inputs = torch.randn(64, 6)
    grouped.train()
    out = grouped(inputs)  # [2, 64, 3]
    assert torch.equal(out[0], out[1]) == (dropout == 0.0)
    grouped.eval()
    out = grouped(inputs)
    assert torch.allclose(out[0], out[1])
    layer = grouped.get_submodule("hidden.0")
    assert isinstance(layer, GroupedLoRALinear)
    layer.train()
    # folded: the same 64 rows for both members (the grouped forward above set B = 64)
    folded = layer(torch.randn(64, 6).repeat(2, 1)).unflatten(0, (2, 64))
    assert torch.equal(folded[0], folded[1]) == (dropout == 0.0)


def test_grouped_network_gives_each_adapter_its_own_output_and_gradient():
    networks = []
    for rank, alpha, rslora in ((1, 1, False), (3, 8, True), (5, 2, False)):
        torch.manual_seed(0)  # the same frozen base
        network = MLP(input_shape=(7,), num_classes=4, hidden_sizes=(6, 5))
        torch.manual_seed(rank)
        inject_lora(network, LoRAConfig(rank=rank, alpha=alpha, use_rslora=rslora))
        with torch.no_grad():
            for layer in lora_layers(network).values():
                layer.lora_B.weight.normal_()
        networks.append(network)
    inputs, target = torch.randn(16, 7), torch.randint(0, 4, (16,))
    grouped = group_networks(networks)
    outputs = grouped(inputs)
    sum(nn.functional.cross_entropy(out, target) for out in outputs).backward()
    together = [
        [p.grad.clone() for p in lora_layers(n)["hidden.1"].parameters() if p.requires_grad]
        for n in networks
    ]
    for network, out in zip(networks, outputs, strict=True):
        network.zero_grad()
        alone = network(inputs)
        assert torch.allclose(out, alone, atol=1e-6)
        nn.functional.cross_entropy(alone, target).backward()
    for network, grads in zip(networks, together, strict=True):
        own = [p.grad for p in lora_layers(network)["hidden.1"].parameters() if p.requires_grad]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, own, strict=True))


def test_runs_that_cannot_fuse_say_why(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    runs = lora_runs(composed_in(tmp_path, "sweep.ranks=[1,2,4]"))
    with open_dict(runs[2].cfg):
        runs[2].cfg.trainer.max_epochs = 7
    groups, alone = fusion.fusable(runs)
    assert groups == [runs[:2]]
    assert [run for run, _ in alone] == [runs[2]]
    assert "trainer.max_epochs" in alone[0][1]
    # what an adapter owns does not split a group
    with open_dict(runs[2].cfg):
        runs[2].cfg.trainer.max_epochs = runs[0].cfg.trainer.max_epochs
        runs[2].cfg.module.optimizer.lr = 0.5
        runs[2].cfg.lora.use_rslora = True
        runs[2].cfg.lora.init = "gaussian"
    assert fusion.fusable(runs) == ([runs], [])
    for run in runs:
        with open_dict(run.cfg):
            run.cfg.trainer.gradient_clip_val = 1.0  # applied per member: still one group
    assert fusion.fusable(runs) == ([runs], [])
    with open_dict(runs[2].cfg):
        runs[2].cfg.trainer.max_epochs = 7
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_lab.progress"):
        _, sequential = fused.run_fused(runs[2:], tmp_path / "alone", tmp_path / "none", {})
    assert sequential == runs[2:]
    lines = [r.getMessage().strip() for r in caplog.records if r.name == "lora_lab.progress"]
    assert lines == ["not fused: lora rank 4 seed 0: no other run to fuse with; it runs on its own"]


def test_seeds_fuse_only_when_they_share_the_data(tmp_path: Path):
    runs = lora_runs(composed_in(tmp_path, "sweep.ranks=[1,2]", "sweep.seeds=[0,1]"))
    groups, alone = fusion.fusable(runs)
    assert [[(r.rank, r.seed) for r in group] for group in groups] == [
        [(1, 0), (2, 0)],
        [(1, 1), (2, 1)],
    ]
    assert alone == []
    one_rank = lora_runs(composed_in(tmp_path, "sweep.ranks=[4]", "sweep.seeds=[0,1]"))
    groups, alone = fusion.fusable(one_rank)
    assert groups == [] and all("data.seed" in reason for _, reason in alone)
    fixed = lora_runs(composed_in(tmp_path, "sweep.ranks=[4]", "sweep.seeds=[0,1]", "data.seed=0"))
    assert fusion.fusable(fixed) == ([fixed], [])


def test_a_diverging_adapter_diverges_alone(tmp_path: Path):
    """A member whose loss overflows stops with the epoch and batch where it did; the other
    member ends exactly where its own sequential run ends (the masked backward leaves its
    gradients untouched)."""
    cfg = composed_in(tmp_path, "sweep.ranks=[1,2]", "lora.alpha=1", "stages.lora.max_epochs=2")
    runs = lora_runs(cfg)
    with open_dict(runs[1].cfg):
        runs[1].cfg.lora.alpha = 1e20  # its loss overflows within a few steps
    pretrained = base_weights(cfg, tmp_path)
    rows = fused.run_fused_group(runs, tmp_path / "study", pretrained, {})
    # (the random-init base leaves rank 1 at chance after 4 steps: diverged by the chance
    # rule, but trained to the end with a finite loss, untouched by its neighbour)
    assert "not finite" not in (rows[0].error or "") and math.isfinite(rows[0].test_loss)
    assert (tmp_path / "study" / "adapters" / "rank_1_seed_0").is_dir()
    assert rows[1].status == "diverged"
    assert re.fullmatch(
        r"FloatingPointError: training loss is not finite at epoch \d+ batch \d+; .*", rows[1].error
    ), rows[1].error
    assert not (tmp_path / "study" / "adapters" / "rank_2_seed_0").exists()
    alone, _ = execute(runs[0], tmp_path / "seq", {}, pretrained=pretrained)
    fused_adapter = load_file(tmp_path / "study" / "adapters" / "rank_1_seed_0" / WEIGHTS)
    own_adapter = load_file(tmp_path / "seq" / "adapters" / "rank_1_seed_0" / WEIGHTS)
    assert alone.status == rows[0].status and fused_adapter.keys() == own_adapter.keys()
    for key, tensor in own_adapter.items():
        assert (fused_adapter[key] - tensor).abs().max() < 1e-5, key


def test_convnet_adapters_behind_shared_convolutions_fuse(tmp_path: Path):
    # all-linear wraps fc1, fc2 and head: the frozen convolutions run once for all adapters.
    cfg = composed_in(tmp_path, "model=convnet", "sweep.ranks=[1,4]")
    runs = lora_runs(cfg)
    assert fusion.fusable(runs) == ([runs], [])
    _, module, _ = fused.build_pass(runs, tmp_path / "study", base_weights(cfg, tmp_path))
    assert type(module.grouped.conv1) is nn.Conv2d  # frozen, run once on the shared batch
    assert isinstance(module.grouped.fc1, GroupedLoRALinear)


def test_cross_entropy_of_all_adapters_at_once_is_each_ones_loss():
    logits = torch.randn(3, 50, 10, requires_grad=True)
    target = torch.randint(0, 10, (50,))
    together = cross_entropy_per_adapter(logits, target)
    alone = torch.stack([nn.functional.cross_entropy(out, target) for out in logits])
    assert torch.allclose(together, alone, atol=1e-6)
    (grad,) = torch.autograd.grad(together.sum(), logits)
    (own,) = torch.autograd.grad(alone.sum(), logits)
    assert torch.allclose(grad, own, atol=1e-6)


def test_a_rank_alpha_lr_grid_trains_exactly_as_sequential_runs(tmp_path: Path):
    """Rank × alpha × learning rate in one pass under the stock Trainer: every member ends
    where its own sequential run ends (1e-5), with plateau schedules that fire for some
    members and not others (on random labels, a val loss that rises by over 1e-3 is a plateau:
    the large learning rate's members hit it, the tiny one's do not)."""
    noise = write_fake_mnist(tmp_path / "noise", n_train=600, n_test=100, learnable=False)
    cfg = composed_in(
        tmp_path,
        f"data.root={noise}",
        "sweep.ranks=[1,4]",
        "sweep.alphas=[1,4]",
        "sweep.learning_rates=[1e-5,1e-2]",
        "stages.lora.max_epochs=3",
        "trainer.limit_train_batches=3",
        "module.scheduler={_target_:torch.optim.lr_scheduler.ReduceLROnPlateau,"
        "_partial_:true,patience:0,factor:0.5,threshold_mode:abs,threshold:-1e-3}",
    )
    runs = lora_runs(cfg)
    assert len(runs) == 8 and fusion.fusable(runs) == ([runs], [])
    pretrained = init_weights(cfg, tmp_path)
    members, module, datamodule = fused.build_pass(runs, tmp_path / "fused", pretrained)
    trainer = instantiate(members[0].cfg.trainer, logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    fused_lrs = [group["lr"] for opt in trainer.optimizers for group in opt.param_groups]
    sequential_lrs = []
    for member, run in zip(members, runs, strict=True):
        _, alone = execute(run, tmp_path / "seq", {}, pretrained=pretrained)
        sequential_lrs.append(alone.trainer.optimizers[0].param_groups[0]["lr"])
        together = dict(member.module.network.named_parameters())
        for name, param in alone.module.network.named_parameters():
            if param.requires_grad:
                assert (together[name] - param).abs().max() < 1e-5, (run.run_id, name)
    assert fused_lrs == pytest.approx(sequential_lrs, rel=1e-6)
    planned = [run.learning_rate for run in runs]
    reduced = [lr < start for lr, start in zip(fused_lrs, planned, strict=True)]
    assert any(reduced) and not all(reduced), "the schedule fired for some members only"


@pytest.mark.parametrize(
    "overrides",
    [["trainer=gpu"], ["trainer.precision=bf16-mixed"], ["trainer=gpu", "trainer.precision=bf16"]],
    ids=["gpu", "bf16-mixed", "gpu-bf16"],
)
def test_the_planner_fuses_on_any_accelerator_and_precision(tmp_path: Path, overrides: list[str]):
    # This machine has no GPU, so the preflight's Trainer build would refuse trainer=gpu (as it
    # should for a real run); the plan builds nothing, and what is under test is the grouping.
    runs = lora_runs(composed_in(tmp_path, "sweep.ranks=[1,2,4]", *overrides))
    assert fusion.fusable(runs) == ([runs], [])


def test_a_bf16_mixed_pass_trains_under_lightning_autocast(tmp_path: Path):
    cfg = composed_in(tmp_path, "sweep.ranks=[1,2]", "trainer.precision=bf16-mixed")
    rows = fused.run_fused_group(
        lora_runs(cfg), tmp_path / "study", base_weights(cfg, tmp_path), {}
    )
    assert [row.status for row in rows] == ["ok", "ok"]
    assert rows[0].pass_id == rows[1].pass_id and rows[0].pass_id.startswith("fused_")
    assert all(math.isfinite(row.test_loss) for row in rows)


def test_under_autocast_small_adapter_updates_still_count():
    # bf16 rounds a merged weight W + s·BA to ~0.4 % of |W|: the grouped layers must keep the
    # adapter branch apart under autocast, as each network's own LoRALinear does.
    networks = []
    for scale in (1e-4, 2e-4):
        torch.manual_seed(0)
        network = MLP(input_shape=(32,), num_classes=8, hidden_sizes=(16, 16))
        inject_lora(network, LoRAConfig(rank=2, alpha=2))
        with torch.no_grad():
            for layer in lora_layers(network).values():
                layer.lora_B.weight.fill_(scale)
        networks.append(network)
    grouped = group_networks(networks)
    inputs = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        together = grouped(inputs).float()
        alone = torch.stack([network(inputs) for network in networks]).float()
    assert torch.equal(together, alone)


def test_a_resumed_pass_continues_every_members_optimizer_and_schedule(tmp_path: Path):
    """Stopped after epoch 2 and resumed from Lightning's checkpoint, a pass ends exactly where
    an uninterrupted one ends: adapters, optimizer state and each member's plateau schedule."""
    cfg = composed_in(
        tmp_path,
        "sweep.ranks=[1,4]",
        "sweep.learning_rates=[1e-5,3e-2]",
        "trainer.limit_train_batches=3",
        "module.scheduler={_target_:torch.optim.lr_scheduler.ReduceLROnPlateau,"
        "_partial_:true,patience:0,factor:0.5,threshold_mode:abs,threshold:-1e-3}",
    )
    runs = lora_runs(cfg)
    pretrained = base_weights(cfg, tmp_path)

    def fit(folder: Path, epochs: int, resume: Path | None = None) -> tuple[object, object]:
        members, module, datamodule = fused.build_pass(runs, folder, pretrained)
        trainer = instantiate(
            members[0].cfg.trainer,
            logger=False,
            max_epochs=epochs,
            enable_checkpointing=True,
            callbacks=[epoch_checkpoint(folder)],
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        return module, trainer

    straight, straight_trainer = fit(tmp_path / "straight", 4)
    fit(tmp_path / "first", 2)
    resumed, resumed_trainer = fit(tmp_path / "second", 4, tmp_path / "first" / "last.ckpt")
    lrs = [
        [group["lr"] for opt in trainer.optimizers for group in opt.param_groups]
        for trainer in (straight_trainer, resumed_trainer)
    ]
    assert lrs[0] == lrs[1]
    assert any(lr < run.learning_rate for lr, run in zip(lrs[0], runs, strict=True))
    for name, param in straight.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param, resumed.get_parameter(name), atol=1e-6), name
