"""Optimizers of a fused pass: one shared optimizer (a param group per member) only when the
members' optimizers differ in nothing but the learning rate; a scheduler per member either way."""

from __future__ import annotations

import functools

import pytest
import torch

from lora_lab.lora import LoRAConfig
from lora_lab.models import MLP, LoRAClassifierModule
from lora_lab.models.member_optim import ParamGroupView, member_optimizers

PLATEAU = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, factor=0.5)


def member(optimizer: functools.partial, scheduler: object = None) -> LoRAClassifierModule:
    network = MLP(input_shape=(6,), num_classes=3, hidden_sizes=(5,))
    return LoRAClassifierModule(
        network=network, lora=LoRAConfig(rank=2, alpha=2), optimizer=optimizer, scheduler=scheduler
    )


def test_members_differing_in_lr_share_one_optimizer_with_a_schedule_each():
    members = [member(functools.partial(torch.optim.Adam, lr=lr), PLATEAU) for lr in (1e-3, 1e-2)]
    (optimizer,), schedulers = member_optimizers(members)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-2]
    assert all(isinstance(s.optimizer, ParamGroupView) for s in schedulers)
    for step in range(2):  # the first sets the best loss; the second is a plateau
        schedulers[1].step(1.0)
        schedulers[0].step(1.0 - step)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 5e-3]
    with pytest.raises(RuntimeError, match="does not step"):
        schedulers[0].optimizer.step()


def test_members_without_schedulers_of_equal_lr_share_a_group():
    members = [member(functools.partial(torch.optim.Adam, lr=lr)) for lr in (1e-3, 1e-2, 1e-3)]
    (optimizer,), schedulers = member_optimizers(members)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-2]
    assert len(optimizer.param_groups[0]["params"]) == 2 * len(members[0].trainable_parameters())
    assert schedulers == [None, None, None]


@pytest.mark.parametrize(
    "second",
    [functools.partial(torch.optim.SGD, lr=0.1), functools.partial(torch.optim.Adam, eps=1e-6)],
    ids=["another class", "another argument"],
)
def test_members_with_other_optimizers_get_one_each(second: functools.partial):
    members = [member(functools.partial(torch.optim.Adam, lr=1e-3)), member(second)]
    optimizers, _ = member_optimizers(members)
    assert [type(o) for o in optimizers] == [torch.optim.Adam, second.func]
    assert optimizers[1].param_groups[0]["params"] == members[1].trainable_parameters()


def test_a_loraplus_member_keeps_its_two_rates_and_its_schedule_drives_both():
    adam = [functools.partial(torch.optim.Adam, lr=lr) for lr in (1e-3, 1e-2)]
    members = [member(adam[0], PLATEAU), member(adam[1], PLATEAU)]
    members[1].loraplus_lr_ratio = 16
    (optimizer,), schedulers = member_optimizers(members)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-2, 0.16]
    b_factors = {id(p) for n, p in members[1].network.named_parameters() if "lora_B" in n}
    assert {id(p) for p in optimizer.param_groups[2]["params"]} == b_factors
    for step in range(2):  # member 1 plateaus: both of its groups halve, member 0's does not
        schedulers[1].step(1.0)
        schedulers[0].step(1.0 - step)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-3, 5e-3, 0.08])


def test_loraplus_members_without_schedulers_share_groups_by_rate():
    members = [member(functools.partial(torch.optim.Adam, lr=1e-2)) for _ in range(2)]
    members[0].loraplus_lr_ratio = 16
    (optimizer,), _ = member_optimizers(members)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-2, 0.16]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 8
