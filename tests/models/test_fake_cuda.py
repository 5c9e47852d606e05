"""Every task module, its LoRA variants (every method of conf/lora/) and the fused module run
their steps on fake CUDA tensors (tests/fake_cuda.py): nothing they create stays on the host,
and no training step reads the device."""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException

from lora_lab.lora import LoRAConfig, lora_parameters
from lora_lab.models import MLP, ClassifierModule, ConvNet, LinearMap, RegressionModule
from lora_lab.models.fused import FusedLoRAModule
from lora_lab.models.member_optim import member_optimizers
from lora_lab.models.member_steps import StepOptions
from lora_lab.models.module import LoRAClassifierModule, LoRARegressionModule, TaskModule
from lora_lab.pipeline.methods import available_methods, lora_config_of, method_patch
from tests.fake_cuda import CUDA, cuda_batch, fake_backward, fake_cuda, on_cuda, to_fake_cuda

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)
CLASSES = 5
MLP_INPUT = (4, 1, 8, 8)
CONV_INPUT = (4, 1, 28, 28)


def mlp() -> MLP:
    # dropout > 0: its masks must be drawn on the device too
    return MLP(input_shape=MLP_INPUT[1:], num_classes=CLASSES, hidden_sizes=(16, 16), dropout=0.1)


def convnet() -> ConvNet:
    return ConvNet(input_shape=CONV_INPUT[1:], num_classes=CLASSES, dropout=0.1)


def lora_of(method: str, **overrides: object) -> tuple[LoRAConfig, float | None]:
    """The LoRAConfig and LoRA+ ratio of a conf/lora/ option, at rank 2."""
    patch = method_patch(method)
    config = lora_config_of({**patch, "rank": 2, "alpha": 4, "dropout": 0.1, **overrides})
    return config, patch.get("loraplus_lr_ratio")


def lora_classifier(network: torch.nn.Module, method: str, **overrides: object) -> TaskModule:
    config, ratio = lora_of(method, **overrides)
    return LoRAClassifierModule(
        network=network,
        lora=config,
        loraplus_lr_ratio=ratio,
        optimizer=ADAM,
        num_classes=CLASSES,
    )


# name → (builder, batch shape, classes; negative: regression outputs)
MODULES: dict[str, tuple[Callable[[], TaskModule], tuple[int, ...], int]] = {
    "classifier-mlp": (lambda: ClassifierModule(mlp(), ADAM, num_classes=CLASSES), MLP_INPUT, 5),
    "classifier-convnet": (
        lambda: ClassifierModule(convnet(), ADAM, num_classes=CLASSES),
        CONV_INPUT,
        CLASSES,
    ),
    "regressor": (lambda: RegressionModule(LinearMap(6, 3), ADAM), (4, 6), -3),
    "lora-regressor": (
        lambda: LoRARegressionModule(
            network=LinearMap(6, 3), lora=LoRAConfig(rank=2, alpha=2), optimizer=ADAM
        ),
        (4, 6),
        -3,
    ),
    **{
        f"lora-{method}-mlp": (
            functools.partial(lambda m: lora_classifier(mlp(), m), method),
            MLP_INPUT,
            CLASSES,
        )
        for method in available_methods()
    },
    # Conv2d adapters, trained biases and a trained head: every kind of trainable tensor
    "lora-convnet-conv-bias-head": (
        lambda: lora_classifier(
            convnet(),
            "default",
            target_modules=["conv1", "conv2", "fc1", "fc2"],
            bias="all",
            modules_to_save=["head"],
        ),
        CONV_INPUT,
        CLASSES,
    ),
    "lora-dora-convnet": (
        lambda: lora_classifier(convnet(), "dora", target_modules=["conv1", "fc1"]),
        CONV_INPUT,
        CLASSES,
    ),
}


def test_every_lora_method_is_covered():
    assert {name.split("-")[1] for name in MODULES if name.endswith("-mlp")} >= set(
        available_methods()
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_task_module_trains_validates_and_tests_on_the_device(name: str):
    build, shape, classes = MODULES[name]
    module = build()
    with fake_cuda():
        to_fake_cuda(module)
        # After the move, as Lightning calls it: the optimizer holds the device's parameters.
        optimizer = module.configure_optimizers()
        batch = cuda_batch(shape, classes)
        module.train()
        module.on_train_epoch_start()
        module.manual_backward = fake_backward(module.trainable_parameters())  # type: ignore[method-assign]
        for step in range(2):
            loss = module.training_step(batch, step)  # a host read raises here
            module.manual_backward(loss)
            optimizer.step()  # optimizer state is made on the parameters' device
            optimizer.zero_grad()
        assert on_cuda(loss, module._train_sums, module._bad_batch)
        assert len(optimizer.state) == len(module.trainable_parameters())  # every one stepped
        assert all(on_cuda(t) for s in optimizer.state.values() for t in s.values() if t.dim())
        module.eval()
        module.validation_step(batch, 0)
        module.test_step(batch, 0)
        if module.has_accuracy:  # the confusion counts stay on the device until the epoch ends
            assert on_cuda(*module.metrics["test_confusion"].metric_state.values())
        module.on_test_epoch_end()
    if module.has_accuracy:
        assert module.per_class_test_acc is not None
        assert module.per_class_test_acc.shape == (classes,)
        assert module.test_confusion is not None
        assert module.test_confusion.shape == (classes, classes)


def test_a_host_read_in_a_training_step_is_caught():
    """The harness can fail: a step that reads its loss on the host (as the old non-finite
    check did) raises on fake CUDA."""

    class Reads(ClassifierModule):
        def training_step(self, batch, batch_idx):  # type: ignore[override]
            loss = super().training_step(batch, batch_idx)
            if not torch.isfinite(loss):
                raise FloatingPointError
            return loss

    module = Reads(mlp(), ADAM, num_classes=CLASSES)
    with fake_cuda():
        to_fake_cuda(module)
        module.on_train_epoch_start()
        with pytest.raises(DataDependentOutputException):
            module.training_step(cuda_batch(MLP_INPUT, CLASSES), 0)


def test_a_cpu_tensor_mixed_into_a_step_is_caught():
    """The harness can fail: epoch sums kept on the host (as before) meet the CUDA loss."""

    class HostSums(ClassifierModule):
        def on_train_epoch_start(self) -> None:
            super().on_train_epoch_start()
            self._train_sums = torch.zeros(3, dtype=torch.float64)

    module = HostSums(mlp(), ADAM, num_classes=CLASSES)
    with fake_cuda():
        to_fake_cuda(module)
        module.on_train_epoch_start()
        with pytest.raises(RuntimeError, match=r"wrong device|at least two devices"):
            module.training_step(cuda_batch(MLP_INPUT, CLASSES), 0)


def fused_members(
    network: Callable[[], torch.nn.Module], methods: list[str], **overrides: object
) -> list[TaskModule]:
    members = []
    for index, method in enumerate(methods):
        torch.manual_seed(0)  # identical frozen networks, as a pass builds them
        base = network()
        torch.manual_seed(index + 1)
        members.append(lora_classifier(base, method, **overrides))
    return members


# name → (network, batch shape, member methods, LoRA overrides, step options)
FUSED: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...], list[str], dict, dict]] = {
    # adapter dropout: each member's own layer runs on its rows
    "mlp": (mlp, MLP_INPUT, ["default", "default", "rslora"], {}, {}),
    "convnet": (convnet, CONV_INPUT, ["default", "default", "rslora"], {}, {}),
    # every method in one pass, through the grouped maths (no adapter dropout), a trained
    # head, and gradients clipped per member and accumulated over two batches
    "mlp-every-method-head-clip-accumulate": (
        mlp,
        MLP_INPUT,
        available_methods(),
        {"dropout": 0.0, "target_modules": ["hidden.0", "hidden.1"], "modules_to_save": ["head"]},
        {"gradient_clip_val": 0.5, "accumulate_grad_batches": 2},
    ),
    # Conv2d adapters on shared (conv1) and folded (conv2) input, each with its own bias
    "convnet-conv-lora-only-bias": (
        convnet,
        CONV_INPUT,
        ["default", "rslora"],
        {"dropout": 0.0, "target_modules": ["conv1", "conv2", "fc1", "head"], "bias": "lora_only"},
        {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"},
    ),
    # DoRA beside LoRA on a Conv2d, and every bias trained: member-specific modules run per member
    "convnet-dora-all-biases": (
        convnet,
        CONV_INPUT,
        ["default", "dora"],
        {"dropout": 0.0, "target_modules": ["conv2", "fc1"], "bias": "all"},
        {},
    ),
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_the_fused_module_trains_validates_and_tests_on_the_device(name: str):
    network, shape, methods, overrides, steps = FUSED[name]
    members = fused_members(network, methods, **overrides)
    fused = FusedLoRAModule(members, steps=StepOptions(**steps))
    fused.on_train_start()  # the once-per-fit read of which members train (host, before)
    fused._trainer = SimpleNamespace(num_training_batches=2)  # what _step_now reads
    with fake_cuda():
        to_fake_cuda(fused)
        trainable = [p for m in members for p in lora_parameters(m.network)]
        optimizers, _ = member_optimizers(members)  # after the move, as Lightning calls it
        (optimizer,) = optimizers  # one shared optimizer: the members differ in their adapters
        batch = cuda_batch(shape, CLASSES)
        fused.train()
        fused.optimizers = lambda: optimizer  # type: ignore[method-assign]
        fused.manual_backward = fake_backward(trainable)  # type: ignore[method-assign]
        fused.on_train_epoch_start()
        for step in range(2):
            fused.training_step(batch, step)  # a host read raises here
        assert on_cuda(fused._sums["train"], fused._bad_batch, fused.batches_seen)
        assert len(optimizer.state) == len(trainable)  # every member's adapters stepped
        assert all(on_cuda(t) for s in optimizer.state.values() for t in s.values() if t.dim())
        fused.eval()
        fused.on_validation_epoch_start = lambda: fused._start("val")  # type: ignore[method-assign]
        fused.on_validation_epoch_start()
        fused.validation_step(batch, 0)
        fused.on_test_epoch_start()
        fused.test_step(batch, 0)
        assert on_cuda(fused._sums["val"], fused._sums["test"])
    assert all(m.per_class_test_acc is None for m in members)  # set at test epoch end only
    assert fused.indices() == list(range(len(methods)))
    assert CUDA.type == "cuda"
