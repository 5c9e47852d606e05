"""Property tests: the sampler always permutes, class selections always canonicalise."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.data import EpochShuffleSampler, resolve_classes
from lora_lab.data.specs import CIFAR10


@settings(max_examples=50, deadline=None)
@given(num_samples=st.integers(0, 300), seed=st.integers(0, 2**31), epoch=st.integers(0, 10_000))
def test_sampler_yields_a_permutation(num_samples: int, seed: int, epoch: int) -> None:
    sampler = EpochShuffleSampler(num_samples, seed=seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    assert sorted(order) == list(range(num_samples)) and len(sampler) == num_samples
    assert list(sampler) == order


@settings(max_examples=50, deadline=None)
@given(
    chosen=st.lists(st.integers(0, 9), min_size=1, max_size=10, unique=True),
    as_names=st.lists(st.booleans(), min_size=10, max_size=10),
)
def test_any_mix_of_names_and_indices_gives_sorted_labels(
    chosen: list[int], as_names: list[bool]
) -> None:
    names = CIFAR10.class_names
    selection: list[int | str] = [
        names[index].upper() if as_names[position] else index
        for position, index in enumerate(chosen)
    ]
    assert resolve_classes("cifar10", names, selection) == tuple(sorted(chosen))
