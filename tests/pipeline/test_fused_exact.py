"""Exactness of fused passes under the stock Trainer: every member of a pass ends where its own
run alone ends (adapter weights and the trained modules within 1e-5, losses within 1e-5), for
every method in one pass, Conv2d adapters, trained biases and heads, and the Trainer options a
pass applies per member (gradient clipping, accumulation, max_steps)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from lora_lab.lora.grouped import GroupedLoRAConv2d, GroupedLoRALinear, PerMember
from lora_lab.pipeline import fused, fusion
from lora_lab.pipeline.sequential import execute
from tests.pipeline.test_fused import base_weights, composed_in, lora_runs

TOLERANCE = 1e-5
METHODS = "sweep.methods=[default,rslora,dora,pissa,loraplus]"


def fused_and_alone(folder: Path, *overrides: str) -> SimpleNamespace:
    """One fused pass of the study's LoRA runs under a stock Trainer, and each run alone;
    asserts that the runs form one group and that each member equals its run alone."""
    cfg = composed_in(folder, "sweep.ranks=[1,4]", "module.optimizer.lr=0.01", *overrides)
    runs = lora_runs(cfg)
    assert fusion.fusable(runs) == ([runs], [])
    pretrained = base_weights(cfg, folder)
    members, module, datamodule = fused.build_pass(runs, folder / "fused", pretrained)
    trainer = instantiate(
        members[0].cfg.trainer, logger=False, enable_checkpointing=False, **fusion.TAKEN_OVER
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule, verbose=False)
    steps = []
    for k, (member, run) in enumerate(zip(members, runs, strict=True)):
        result, alone = execute(run, folder / "seq", {}, pretrained=pretrained)
        # (a tiny study may end a run at chance, "diverged" by that rule: it trained all the same)
        assert alone is not None and result.test_loss is not None, result.error
        together = dict(member.module.network.named_parameters())
        trained = [(n, p) for n, p in alone.module.network.named_parameters() if p.requires_grad]
        assert trained
        for name, param in trained:
            difference = (together[name] - param).abs().max().item()
            assert difference < TOLERANCE, (run.run_id, name, difference)
        tested = module.test_metrics[k]
        assert tested["test_loss"] == pytest.approx(result.test_loss, abs=TOLERANCE)
        assert tested["test_acc"] == pytest.approx(result.test_acc, abs=TOLERANCE)
        steps.append(alone.trainer.global_step)
    assert steps == [trainer.global_step] * len(runs)
    return SimpleNamespace(runs=runs, module=module, trainer=trainer)


def test_every_method_trains_in_one_pass_exactly(tmp_path: Path):
    """The methods study's setup: adapters on the hidden layers, the head trained in full."""
    done = fused_and_alone(
        tmp_path,
        METHODS,
        "lora.alpha=8",
        "lora.target_modules=[hidden.0,hidden.1]",
        "lora.modules_to_save=[head]",
    )
    assert {run.cfg.lora.method for run in done.runs} == {
        "default",
        "rslora",
        "dora",
        "pissa",
        "loraplus",
    }
    assert isinstance(done.module.grouped.hidden[1], GroupedLoRALinear)
    assert isinstance(done.module.grouped.head, PerMember)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_convnet_adapters_and_trained_biases_fuse_exactly(tmp_path: Path, bias: str):
    done = fused_and_alone(
        tmp_path,
        "model=convnet",
        "sweep.methods=[default,dora]",
        "lora.target_modules=[conv2,fc1,fc2,head]",
        f"lora.bias={bias}",
    )
    assert isinstance(done.module.grouped.fc1, GroupedLoRALinear)
    # plain LoRA and DoRA members mixed: each member's own Conv2d adapter on its rows
    assert isinstance(done.module.grouped.conv2, PerMember)
    assert isinstance(done.module.grouped.conv1, PerMember if bias == "all" else torch.nn.Conv2d)


def test_convnet_lora_shares_the_frozen_convolution(tmp_path: Path):
    done = fused_and_alone(tmp_path, "model=convnet", "lora.target_modules=[conv2,fc1,fc2,head]")
    assert isinstance(done.module.grouped.conv2, GroupedLoRAConv2d)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_is_per_member(tmp_path: Path, algorithm: str):
    # A clip far below the gradients' size: every step clips, each member by its own norm.
    fused_and_alone(
        tmp_path,
        "sweep.learning_rates=[0.02,0.005]",
        "+trainer.gradient_clip_val=0.01",
        f"+trainer.gradient_clip_algorithm={algorithm}",
    )


def test_gradient_accumulation_and_max_steps_count_as_alone(tmp_path: Path):
    # 5 batches an epoch, 2 accumulated: steps after batches 2, 4 and 5 (the epoch's last);
    # max_steps=4 ends the pass in the second epoch, after its first step.
    done = fused_and_alone(
        tmp_path,
        "data.batch_size=64",
        "trainer.limit_train_batches=5",
        "stages.lora.max_epochs=3",
        "+trainer.accumulate_grad_batches=2",
        "+trainer.max_steps=4",
    )
    assert done.trainer.global_step == 4 and done.module.batches_seen == 4


def test_fp16_gives_each_member_its_own_gradient_scaler(tmp_path: Path):
    """fp16 autocast with a GradScaler on the CPU (Lightning's `precision="16-mixed"` turns into
    bf16 there, so the plugin is given as such): each member scales, unscales, clips, skips
    and steps as its run alone does, with its own scale factor. A scale of 2²⁴ overflows the
    first steps' fp16 gradients; each member backs off as far as its own gradients need."""
    scaler = "{_target_:torch.amp.GradScaler,device:cpu,init_scale:16777216.0}"
    plugin = (
        "{_target_:lightning.pytorch.plugins.precision.MixedPrecision,precision:16-mixed,"
        f"device:cpu,scaler:{scaler}}}"
    )
    done = fused_and_alone(
        tmp_path,
        "sweep.alphas=[1,256]",
        "stages.lora.max_epochs=3",
        f"+trainer.plugins=[{plugin}]",
        "trainer.precision=null",
        "+trainer.gradient_clip_val=0.05",
    )
    assert done.trainer.precision_plugin.scaler is None  # each member's own scaler instead
    scales = [scaler.get_scale() for scaler in done.module.scalers.scalers]
    assert len(scales) == len(done.runs) == 4
    assert max(scales) < 2**24 and len(set(scales)) > 1  # steps skipped, per member
