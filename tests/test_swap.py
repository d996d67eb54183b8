"""`minigemma.swap`: the one mechanism by which quantisation, kernels and the learner's code enter a model."""

import torch
from torch import nn

from minigemma.swap import retype, swap_modules


class Twice(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), Twice(4, 4)))


def test_new_modules_replace_by_exact_class_only():
    model = tiny()
    seen = []
    counts = swap_modules(model, {nn.Linear: lambda m: seen.append(m) or nn.Identity()})
    assert counts == {"Linear": 2}
    assert isinstance(model[0], nn.Identity) and isinstance(model[2][0], nn.Identity)
    assert isinstance(model[2][1], Twice), "a subclass with its own forward must be left alone"


def test_none_leaves_a_module_and_the_root_is_never_swapped():
    model = nn.Linear(4, 4)
    assert swap_modules(model, {nn.Linear: lambda m: nn.Identity()}) == {}
    assert type(model) is nn.Linear
    model = tiny()
    assert swap_modules(model, {nn.Linear: lambda m: None}) == {}
    assert type(model[0]) is nn.Linear


def test_retype_keeps_the_object_and_its_parameters_and_swaps_back():
    model = tiny()
    layer, weight = model[0], model[0].weight
    x = torch.randn(3, 4)
    before = model[0](x)
    swap_modules(model, {nn.Linear: retype(Twice)})
    assert model[0] is layer and type(layer) is Twice and layer.weight is weight
    torch.testing.assert_close(model[0](x), 2 * before)
    swap_modules(model, {Twice: retype(nn.Linear)})
    assert type(model[0]) is nn.Linear and type(model[2][1]) is nn.Linear  # both Twice modules, back
    torch.testing.assert_close(model[0](x), before)
