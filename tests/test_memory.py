"""memory: the bytes of one pass (on the CPU every module output counted, against a hand count)
and the items a budget holds."""

import dataclasses

import pytest
import torch

from diffcirc.memory import items_that_fit, pass_bytes


def test_pass_bytes_counts_every_module_output_of_the_pass():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.zeros(2, 4)
    out, cost = pass_bytes(lambda: net(x), "cpu")
    assert out.shape == (2, 3)
    # float32: Linear 2x8, ReLU 2x8, Linear 2x3, and the Sequential's own output 2x3
    assert cost == 4 * (16 + 16 + 6 + 6) == 176
    # nothing is counted after the pass: the hook is gone
    _, again = pass_bytes(lambda: x * 2, "cpu")
    assert again == 1  # no module ran: the floor of 1 byte


@dataclasses.dataclass
class _Output:
    sample: torch.Tensor
    extra: tuple


class _Nested(torch.nn.Module):
    def forward(self, x):
        return {"a": x.double(), "b": [_Output(x.half(), (x, None, "text"))]}


def test_pass_bytes_finds_tensors_in_mappings_sequences_and_dataclasses():
    x = torch.zeros(5)
    _, cost = pass_bytes(lambda: _Nested()(x), "cpu")
    assert cost == 5 * (8 + 2 + 4)


@pytest.mark.parametrize("cost, budget, cap, fits", [
    (10, 100, 64, 10), (10, 105, 64, 10), (10, 99, 64, 9),  # whole items only
    (10, 1000, 64, 64),                                     # the cap
    (10, 5, 64, 1), (10, 0, 64, 1),                         # one item over the budget still runs alone
    (10, None, 7, 7),                                       # no budget
])
def test_items_that_fit(cost, budget, cap, fits):
    assert items_that_fit(cost, budget, cap) == fits


def test_items_that_fit_needs_a_cap_of_one_or_more():
    with pytest.raises(ValueError, match="cap"):
        items_that_fit(10, 100, 0)


def test_free_memory_on_the_cpu_lies_between_nothing_and_the_machines_total():
    import os

    from diffcirc.memory import free_memory_bytes

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < free_memory_bytes("cpu") <= total
