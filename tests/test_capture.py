"""Capturing models as people write them: flags, optional arguments, shape branches, branches on tensor
values, code fx cannot trace, int attributes (docs/method.md §1)."""
from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specprune_cli.capture import capture
from specprune_cli.errors import ConfigError
from specprune_cli.graph import find_units
from models_io import HubEncoder
from patterns import AudioHead, build


def _reasons(graph):
    return {s.name: s.reason for s in graph.skipped}


def test_flag_argument_takes_its_default_or_forward_kwargs():
    model, _ = build("audio_head")
    x = torch.zeros(1, 1, 8, 6)
    assert [u.name for u in find_units(model, x).units] == ["conv1", "conv2"]
    embedded = find_units(model, x, forward_kwargs={"embed": True})  # returns the pooled features
    assert [u.name for u in embedded.units] == ["conv1"]
    assert _reasons(embedded)["conv2"] == "its channels reach the model output"
    assert len([n for n in embedded.gm.graph.nodes if n.op == "placeholder"]) == 1


def test_forward_kwargs_that_do_not_fit_forward_are_config_errors():
    model = AudioHead()
    with pytest.raises(ConfigError) as err:
        find_units(model, torch.zeros(1, 1, 8, 6), forward_kwargs={"embd": True})
    assert str(err.value) == ("model.forward_kwargs names 'embd', which AudioHead.forward does not take; "
                              "did you mean 'embed'?")

    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(ConfigError) as err:
        find_units(TwoInputs(), torch.zeros(1, 3))
    assert str(err.value) == ("TwoInputs.forward needs argument 'y', which has no default; specprune feeds "
                              "one input tensor: set it in model.forward_kwargs if it is not a tensor, or "
                              "wrap the model in a module whose forward(x) supplies it")


class Masked(nn.Module):
    """An optional tensor argument left at None, and a branch on the input's rank."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 6, 3, padding=1)
        self.b = nn.Conv1d(6, 2, 1)

    def forward(self, x, mask=None, scale: float = 2.0):
        if x.dim() == 2:
            x = x.unsqueeze(0)
        y = F.relu(self.a(x)) * scale
        if mask is not None:
            y = y * mask
        return self.b(y)


def test_none_defaults_and_shape_branches_take_the_example_path():
    graph = find_units(Masked(), torch.zeros(1, 2, 5))
    assert [u.name for u in graph.units] == ["a"] and graph.replayable
    code = graph.gm.code
    assert "mask" not in code and "* 2.0" in code


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.sum() > 0:  # on tensor values: another input could take the other path
            return self.conv(x)
        return x


class WithBranchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.branchy = Branchy()
        self.b = nn.Linear(4, 5)
        self.c = nn.Linear(5, 2)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.branchy(self.a(x)).mean((2, 3)))))


def test_a_branch_on_tensor_values_keeps_that_module_whole_and_says_where():
    graph = find_units(WithBranchy(), torch.zeros(1, 3, 8, 8))
    assert [u.name for u in graph.units] == ["b"]
    why = graph.opaque["branchy"]
    line = Branchy.forward.__code__.co_firstlineno + 1
    assert why == f"its forward uses a tensor's values in Python (`if`/`while`/`and`/`or` on a tensor at " \
                  f"test_capture.py:{line})"
    reasons = _reasons(graph)
    assert reasons["a"] == f"channels flow into branchy (Branchy), which specprune cannot trace ({why}); " \
                           "it is kept whole"
    assert reasons["branchy.conv"] == f"inside branchy, which specprune cannot trace ({why}); kept whole"


def test_a_branch_on_tensor_values_in_the_model_itself_captures_nothing():
    class Normalises(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            if x.abs().max() > 1:
                x = x / x.abs().max()
            return self.b(self.a(x))

    graph = find_units(Normalises(), torch.ones(1, 3, 4, 4))
    assert graph.gm is None and graph.units == []
    assert _reasons(graph)["<model>"].startswith(
        "specprune cannot capture Normalises.forward: its forward uses a tensor's values in Python")


def test_code_that_rejects_proxies_keeps_its_module_whole():
    class Rebuilds(nn.Module):
        def forward(self, x):
            return x * float(np.sqrt(x.shape[1]))  # numpy rejects the proxy

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.odd = Rebuilds()
            self.b = nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.c(F.relu(self.b(self.odd(self.a(x)))))

    graph = find_units(Net(), torch.zeros(1, 3, 4, 4))
    assert list(graph.opaque) == ["odd"] and graph.opaque["odd"].startswith("torch.fx cannot trace it: ")
    assert [u.name for u in graph.units] == ["b"]
    assert "odd (Rebuilds), which specprune cannot trace" in _reasons(graph)["a"]


def test_a_branch_on_the_batch_size_is_captured_but_not_replayable():
    class PerBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.b(y * 2 if x.size(0) == 2 else y)

    graph = find_units(PerBatch(), torch.zeros(1, 3))
    assert [u.name for u in graph.units] == ["a"]
    assert graph.replayable is False


class Checks(nn.Module):
    """Checks the input's type: isinstance sees a tensor while tracing, ``type(x) is`` does not."""

    def __init__(self, exact: bool):
        super().__init__()
        self.exact = exact
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        tensor = type(x) is torch.Tensor if self.exact else isinstance(x, torch.Tensor)
        return self.b(torch.relu(self.a(x))) if tensor else self.b(self.a(x)) * 0


def test_isinstance_checks_see_a_tensor_while_tracing():
    graph = find_units(Checks(exact=False), torch.ones(1, 3))
    assert [u.name for u in graph.units] == ["a"] and "relu" in graph.gm.code


def test_a_graph_that_does_not_reproduce_the_model_is_not_used():
    cap = capture(Checks(exact=True), torch.ones(1, 3))
    assert cap.gm is None
    assert cap.failure.startswith("the captured graph of Checks does not reproduce its outputs")


def test_int_attributes_are_read_live_and_the_model_is_left_as_it_was():
    model = AudioHead()
    before = dict(vars(model))
    cap = capture(model, torch.zeros(1, 1, 8, 6))
    assert cap.int_attrs == {"_specprune_int_0": ("", "flat_dim")}
    assert type(model.flat_dim) is int and dict(vars(model)).keys() == before.keys()
    model.flat_dim = 24
    assert cap.gm._specprune_int_0 == 24


def test_a_subclass_with_its_own_forward_is_kept_whole():
    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * self.weight.abs().mean()  # depends on every row: not sliceable

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = ScaledConv(4, 4, 1)
            self.c = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    graph = find_units(Net(), torch.zeros(1, 3, 4, 4))
    assert graph.units == []
    assert _reasons(graph)["a"] == ("channels flow into b (ScaledConv), which subclasses Conv2d with its "
                                    "own forward that does not compute its parent's; it is kept whole")


def test_a_subclass_keeping_the_parent_forward_is_that_layer():
    class MyLinear(nn.Linear):
        pass

    net = nn.Sequential(MyLinear(3, 6), nn.ReLU(), MyLinear(6, 2))
    assert [u.name for u in find_units(net, torch.zeros(1, 3)).units] == ["0"]


def test_an_ordered_dict_output_is_captured_like_a_dict():
    """torchvision's segmentation models return an OrderedDict; the traced graph builds a dict with the
    same keys. That is the same output, not a graph that took another path."""
    from collections import OrderedDict

    class Segmenter(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 4, 1)
            self.head = nn.Conv2d(10, 2, 1)

        def forward(self, x):
            y = self.head(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))
            return OrderedDict(out=F.interpolate(y, size=x.shape[-2:]), aux=y.mean((2, 3)))

    model = Segmenter().eval()
    x = torch.randn(2, 3, 8, 8)
    cap = capture(model, x)
    assert cap.gm is not None and cap.replayable
    torch.testing.assert_close(dict(cap.gm(x)), dict(model(x)))
    assert [u.name for u in find_units(model, x[:1]).units] == ["a", "b"]


class _ScriptedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.c(x))


def test_a_torchscript_submodule_is_kept_whole_with_the_reason_and_the_rest_pruned():
    """A scripted submodule (torch.jit.script) has no Python forward fx can read and takes no hooks:
    it is an opaque leaf, and the pruned model's check pass does not hook it."""
    from helpers import prune_cfg
    from specprune_cli.prune import prune_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), torch.jit.script(_ScriptedBlock())
            self.d, self.fc = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.d(self.b(torch.relu(self.a(x)))).mean((2, 3)))

    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    result = prune_model(Net().eval(), batches, example_input=batches[0][:1],
                         cfg=prune_cfg(round_to=1, min_channels=1), progress=False)
    assert [u["name"] for u in result.report["units"]] == ["d"]
    reasons = {s["name"]: s["reason"] for s in result.report["skipped"]}
    assert "TorchScript module" in reasons["a"]


class _CausalEncoder(nn.Module):
    """A small causal language model on torch's encoder, its mask built from the input's length."""

    def __init__(self, causal_flag: bool):
        super().__init__()
        self.causal_flag = causal_flag
        self.emb = nn.Embedding(50, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 50)

    def forward(self, tokens):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        if self.causal_flag:
            return self.head(self.enc(self.emb(tokens), mask=mask, is_causal=True))
        return self.head(self.enc(self.emb(tokens), mask=mask))


def test_a_causal_mask_built_from_the_length_is_read_with_or_without_the_flag():
    """torch's mask checks read the mask's dtype (``torch.is_floating_point``), which is not a value;
    without ``is_causal`` the encoder compares the mask with a causal one in Python, and the mask is
    made from the input's length alone, so Python may read it as it reads a shape."""
    tokens = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(0))
    for flag in (True, False):
        graph = find_units(_CausalEncoder(flag).eval(), tokens)
        assert [u.name for u in graph.units] == ["enc.layers.0.linear1", "enc.layers.1.linear1"], flag


class _Branches(nn.Module):
    """A branch on a tensor made from shapes alone, then one on the weights, the data or chance."""

    def __init__(self, on: str):
        super().__init__()
        self.on = on
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        if torch.ones(x.shape[2]).sum() > 1:  # shapes only: follows the example's path
            x = self.a(x)
        values = {"weights": self.a.weight, "data": x, "chance": torch.rand(x.shape[0])}[self.on]
        if values.sum() > 0:
            x = x * 2
        return self.b(torch.relu(x))


@pytest.mark.parametrize("on", ["weights", "data", "chance"])
def test_a_branch_on_weights_data_or_chance_is_not_read(on):
    graph = find_units(_Branches(on).eval(), torch.randn(1, 3, 6, 6))
    assert graph.units == []
    assert "its forward uses a tensor's values in Python" in _reasons(graph)["<model>"]


def test_the_length_of_a_tensor_is_a_shape():
    """``len(x)`` is x's first dimension (the PyTorch tutorial's language model sizes its mask with
    ``len(src)``), not a value."""
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 4 * 4, 2)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.fc(h.reshape(len(h), -1))

    graph = find_units(Flat().eval(), torch.randn(1, 3, 6, 6))
    assert [u.name for u in graph.units] == ["conv"]

    class BranchesOnChannels(Flat):
        def forward(self, x):
            h = torch.relu(self.conv(x))
            if len(h.transpose(0, 1)) > 4:  # the channel count, read in Python
                h = h * 2
            return self.fc(h.flatten(1))

    graph = find_units(BranchesOnChannels().eval(), torch.randn(1, 3, 6, 6))
    assert graph.units == []
    assert "Python code reads its channel count" in _reasons(graph)["conv"]


class _CachesInForward(nn.Module):
    """torchvision's AnchorGenerator in small: forward stores what it computes on a submodule (a list
    attribute), and a dict cache fills in place."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 2)
        self.anchors: list[torch.Tensor] = []
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        self.anchors = [torch.ones(x.shape[2]) * 0.5]
        self.cache["columns"] = torch.zeros(x.shape[3])
        h = torch.relu(self.conv(x)) + self.anchors[0].view(1, 1, -1, 1) + self.cache["columns"]
        return self.fc(h.mean((2, 3)))


def test_what_forward_stores_on_its_modules_during_the_trace_is_put_back():
    """A proxy left in ``self.anchors`` or the cache would break every later forward of the model."""
    model = _CachesInForward().eval()
    x = torch.randn(3, 3, 6, 5)
    with torch.no_grad():
        before = model(x)
    graph = find_units(model, x[:1])
    assert [u.name for u in graph.units] == ["conv"]
    assert all(isinstance(a, torch.Tensor) and type(a) is torch.Tensor for a in model.anchors)
    assert all(type(v) is torch.Tensor for v in model.cache.values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


class _Factories(nn.Module):
    """An RNN-style initial state and positions made by torch's factories from the input's shape."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(4, 8, 3, padding=1), nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.conv(x)) + torch.arange(x.shape[-1], dtype=x.dtype) / 10
        state = torch.zeros(x.size(0), 8) + torch.full((x.shape[0], 1), 0.5) + h.new_ones(h.size(0), 1)
        return self.fc(h.mean(-1)) + state


def test_torch_factories_sized_from_shapes_are_traced_and_put_back():
    """``torch.zeros(x.size(0), 8)`` gives torch's argument parser a proxy where it wants an int; the
    capture records the call as a node, so the graph follows the batch size. ``h.new_ones(...)`` takes
    only h's dtype: no channels flow into it."""
    model, zeros = _Factories().eval(), torch.zeros
    graph = find_units(model, torch.randn(1, 4, 5))
    assert [u.name for u in graph.units] == ["conv"]
    assert graph.replayable
    x = torch.randn(3, 4, 7)
    torch.testing.assert_close(graph.gm(x), model(x))
    assert torch.zeros is zeros


class _SumsChunks(nn.Module):
    def __init__(self, dim: int = 2):
        super().__init__()
        self.dim = dim
        self.conv, self.fc = nn.Conv1d(4, 8, 3, padding=1), nn.Linear(8 // (3 - dim), 2)

    def forward(self, x):
        h = sum(torch.relu(self.conv(x)).chunk(2, dim=self.dim))  # iterates over the pieces
        return self.fc(h.mean(-1))


def test_the_pieces_an_op_returns_can_be_iterated():
    """How many tensors ``chunk``/``split``/``unbind`` return follows from shapes, so Python may iterate
    over them (YOLO's C2f does: the pattern ``yolo_c2f``)."""
    model = _SumsChunks().eval()
    graph = find_units(model, torch.randn(1, 4, 6))
    assert [u.name for u in graph.units] == ["conv"]
    assert graph.replayable
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(graph.gm(x), model(x))
    # cut along the channels, the pieces are not the unit's channels whole
    graph = find_units(_SumsChunks(dim=1).eval(), torch.randn(1, 4, 6))
    assert graph.units == [] and "conv" in _reasons(graph)


def test_a_module_called_twice_is_kept_whole_once_with_the_reason():
    """Shared weights: the module's output channels, and the channels it reads, are the same at every
    call, so a width chosen at one call would be wrong at the other."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.shared, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
                nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(torch.relu(self.shared(torch.relu(self.shared(h)))))

    graph = find_units(Shared().eval(), torch.randn(1, 3, 6, 6))
    assert graph.units == []
    names = [s.name for s in graph.skipped]
    assert sorted(names) == ["a", "b", "shared"]
    assert "called more than once" in _reasons(graph)["shared"]
    assert "called more than once" in _reasons(graph)["a"]


def test_a_tanh_gelu_written_out_is_traced():
    """GPT-2's GELU calls ``torch.pow(x, 3.0)``: torch's C parser tries a Scalar overload first, and a
    proxy that claimed to be a tensor there crashed the whole process (a segmentation fault)."""
    class Gelu(nn.Module):
        def forward(self, x):
            return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3.0))))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), Gelu(), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    checks = builtins.isinstance
    graph = find_units(Mlp().eval(), torch.randn(1, 8))
    assert [u.name for u in graph.units] == ["fc1"]
    assert builtins.isinstance is checks  # what tracing patched is put back


def test_hugging_face_idioms_are_captured():
    """A decorated forward with ``**kwargs``, position ids from a buffer sliced and expanded to proxy
    sizes, a pytree-registered output class (models_io.HubEncoder; the CLI runs it in test_cli_inputs)."""
    model = HubEncoder().eval()
    tokens = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(0))
    graph = find_units(model, tokens)
    assert [u.name for u in graph.units] == ["fc1"]
    assert graph.replayable
    x = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    expected = model(x)
    got = graph.gm(x)  # the input alone, the output's leaves in a list
    torch.testing.assert_close(got, [expected.logits, expected.pooled])


def test_a_layer_made_in_forward():
    """``nn.ReLU()(x)`` (DistilBERT's classifier does it) is plain code and is traced; a layer with
    weights made in forward cannot be in a graph: its module is kept whole, and the reason says why."""
    class MadeInForward(nn.Module):
        def __init__(self, weighted: bool):
            super().__init__()
            self.weighted = weighted
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = self.a(x)
            h = nn.Conv2d(8, 8, 1)(h) if self.weighted else nn.ReLU()(h)
            return self.b(h)

    graph = find_units(MadeInForward(False).eval(), torch.randn(1, 3, 6, 6))
    assert [u.name for u in graph.units] == ["a"] and graph.replayable
    graph = find_units(MadeInForward(True).eval(), torch.randn(1, 3, 6, 6))
    assert graph.units == []
    assert "builds the layer Conv2d with weights as it runs" in _reasons(graph)["<model>"]


def test_a_dict_looked_up_by_a_shape():
    """einops keeps its recipes in a dict keyed by ``x.ndim``: a shape or a flag hashes as its value. A
    lookup by the channel count reads it, as a branch does, and keeps that unit whole."""
    class ByRank(nn.Module):
        def __init__(self, by: str):
            super().__init__()
            self.by = by
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            key = h.ndim if self.by == "rank" else h.shape[1]
            return self.b(h * {4: 2.0, 8: 3.0}[key])

    graph = find_units(ByRank("rank").eval(), torch.randn(1, 3, 6, 6))
    assert [u.name for u in graph.units] == ["a"]
    graph = find_units(ByRank("channels").eval(), torch.randn(1, 3, 6, 6))
    assert graph.units == [] and "Python code reads its channel count" in _reasons(graph)["a"]
