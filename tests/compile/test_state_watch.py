"""Graph mode checks the model's state by dict versions instead of Dynamo's per-attribute guards:
every change a guard would have caught still makes the next call use the changed model."""
import pytest
import torch
from torch import nn

import cpuboost
import cpuboost.compile.graph_mode as graph_mode_module
from cpuboost.compile.state_watch import dict_version

pytestmark = pytest.mark.skipif(dict_version() is None, reason="this torch/Python has no "
                                "dict versions: Dynamo's own guards are used")


class Settings:  # a plain object the model reads from, like a Hugging Face config
    def __init__(self):
        self.shift = 0.0


class Block(nn.Module):
    gain = 1.0  # a class attribute the forward reads

    def __init__(self, settings):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.scale = 2.0
        self.settings = settings
        self.offsets = [0.0]

    def forward(self, x):
        y = self.act(self.lin(x)) * self.scale * type(self).gain + self.settings.shift
        if self.training:
            y = y + 1.0
        return y + self.offsets[0]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.settings = Settings()
        self.blocks = nn.Sequential(Block(self.settings), Block(self.settings))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.blocks(x))


def _compiled():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(3, 8)
    opt = cpuboost.optimize(net, graph_mode=True, sample_input=x)
    return net, opt, x, opt.__dict__["forward"]


def _same(opt, net, x):
    with torch.no_grad():
        return torch.allclose(opt(x), net(x), rtol=1e-4, atol=1e-5)


def _mutations():
    """Each changes what forward computes through a path a Dynamo guard on the model covers."""
    def head(net, opt):
        opt.head = net.head = nn.Linear(8, 4)

    def attribute(net, opt):
        opt.blocks[1].scale = 3.0

    def plain_object(net, opt):
        net.settings.shift = 0.5

    def class_attribute(net, opt):
        Block.gain = 0.5

    def list_item(net, opt):
        opt.blocks[0].offsets[0] = 1.0

    def parameter(net, opt):
        opt.head.weight = nn.Parameter(torch.zeros(4, 8))

    def training_flag(net, opt):
        opt.blocks[0].train()

    return [head, attribute, plain_object, class_attribute, list_item, parameter, training_flag]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_a_change_after_compiling_reaches_the_next_call(mutate):
    net, opt, x, forward = _compiled()
    assert forward.watch is not None and len(forward.watch) > 0
    try:
        with torch.no_grad():
            before = opt(x)
        mutate(net, opt)
        with torch.no_grad():
            after = opt(x)
        assert _same(opt, net, x), "the compiled forward kept the model as it was"
        assert forward.changes == 1 and forward.graphs == 2
        assert not torch.allclose(before, after)
        with torch.no_grad():
            opt(x)
        assert forward.graphs == 2  # not recompiled again while nothing changes
    finally:
        Block.gain = 1.0


def test_a_hook_registered_after_compiling_fires():
    net, opt, x, forward = _compiled()
    seen = []
    opt.blocks[0].lin.register_forward_hook(lambda *a: seen.append("lin"))
    with torch.no_grad():
        opt(x)
    assert seen == ["lin"] and forward.changes == 1


def test_calls_that_change_nothing_do_not_recompile():
    net, opt, x, forward = _compiled()
    opt.eval()  # sets every training flag to the value it has: no change
    with torch.no_grad():
        for _ in range(3):
            opt(x)
    assert forward.changes == 0 and forward.graphs == 1


class Counting(nn.Module):
    """Sets an attribute in its forward: its state changes at every call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls = self.calls + 1
        return self.lin(x)


def test_a_forward_that_changes_its_model_falls_back_to_dynamos_guards():
    """The graph was traced with the count it had then; the check sees the count the forward
    wrote and compiles again, and after a second change keeps Dynamo's guards (which, as for
    stock torch.compile, compile per count: the forward's side effect stays right)."""
    torch._dynamo.reset()
    model = Counting().eval()
    x = torch.randn(2, 4)
    opt = cpuboost.optimize(model, graph_mode=True, sample_input=x)
    forward = opt.__dict__["forward"]
    with torch.no_grad():
        for _ in range(4):
            count = opt.calls
            assert torch.allclose(opt(x), model.lin(x), rtol=1e-4, atol=1e-6)
            assert opt.calls == count + 1  # as eager: a graph replaying a stale count would not
    assert forward.watch is None and forward.changes == 2
    notes = cpuboost.report_of(opt).pass_named("graph_mode").notes
    assert any("Dynamo's guards on the model kept" in n for n in notes)


def test_without_dict_versions_dynamos_guards_catch_the_change(monkeypatch):
    monkeypatch.setattr(graph_mode_module, "dict_version", lambda: None)
    net, opt, x, forward = _compiled()
    assert forward.watch is None
    opt.blocks[1].scale = 3.0
    assert _same(opt, net, x)


class Breaking(nn.Module):
    """A layer whose forward breaks the graph (a data-dependent Python branch, like Longformer's
    global attention check): Dynamo compiles its frames once per code object, for every
    instance of the class."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        if (y.sum() > -1e9).item():  # always true, but only known by running
            y = torch.relu(y)
        return self.lin(y)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Breaking(1), Breaking(2), Breaking(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_frame_of_another_module_keeps_its_guards():
    """A frame whose ``self`` is one of several modules of a class (each layer's forward after
    a graph break) keeps Dynamo's guards: watching the first layer's dicts does not tell the
    layers apart, and its graph's frozen weights served all three (Longformer's logits were
    off by 0.27 with two layers)."""
    model, x = Stack().eval(), torch.randn(4, 8)
    with torch.no_grad():
        expected = model(x)
        fast = cpuboost.optimize(model, graph_mode=True)
        for _ in range(2):
            assert torch.allclose(fast(x), expected, rtol=1e-4, atol=1e-5)
