"""Output structures and input signatures (model_io): names, layouts, the selected tensor, messages."""
from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from specprune_cli.errors import ConfigError, ModelError
from specprune_cli.model_io import (ModelCall, check_same_layout, check_signature, describe, layout,
                                    named_tensors, nonfinite, select)

Pair = collections.namedtuple("Pair", ["logits", "embedding"])
A, B, C = torch.zeros(2, 10), torch.ones(2, 4), torch.full((2, 3), 2.0)


@pytest.mark.parametrize("out, names", [
    (A, ["output"]),
    ((A, B), ["output_0", "output_1"]),
    ([A, (B, C)], ["output_0", "output_1_0", "output_1_1"]),
    ({"logits": A, "aux": {"embedding": B, "none": None}}, ["logits", "aux.embedding"]),
    (Pair(A, B), ["logits", "embedding"]),
    ((A, None, 3), ["output_0"]),
])
def test_every_tensor_has_a_name(out, names):
    assert [n for n, _ in named_tensors(out)] == names


def test_select_the_first_tensor_an_index_or_a_key():
    assert select((A, B), None) is A
    assert select((A, B), 1) is B
    assert select({"logits": A, "embedding": B}, "embedding") is B
    assert select(Pair(A, B), "embedding") is B and select(Pair(A, B), 0) is A


@pytest.mark.parametrize("out, which, message", [
    ((A, B), 2, "evaluate.output is 2 but the model returns tuple (tensor (2, 10), tensor (2, 4)); set "
                "evaluate.output to the tensor to evaluate: an index from 0 to 1"),
    ((A, B), "logits", "evaluate.output is 'logits' but the model returns tuple (tensor (2, 10), tensor (2, "
                       "4)); "
                       "set evaluate.output to the tensor to evaluate: an index from 0 to 1"),
    ({"a": A}, 0, "evaluate.output is 0 but the model returns dict {a: tensor (2, 10)}; set evaluate.output "
                  "to "
                  "the tensor to evaluate: a"),
    (A, 0, "evaluate.output is 0 but the model returns a single tensor; remove evaluate.output (it picks one "
           "tensor of a tuple, list or dict output)"),
])
def test_select_names_what_there_is(out, which, message):
    with pytest.raises(ConfigError) as exc:
        select(out, which)
    assert str(exc.value) == message


def test_an_output_without_tensors():
    with pytest.raises(ModelError) as exc:
        select({"n": None}, None)
    assert str(exc.value) == ("the model returns dict {n: NoneType}, which holds no tensor; specprune needs "
                              "a "
                              "forward that returns a tensor, or a tuple/list/dict of them")


def test_layouts_compare_structure_and_shapes():
    assert layout({"a": A, "b": (B,)}) == layout({"a": A + 1, "b": (B * 2,)})
    assert layout((A, B)) != layout([A, B]) and layout((A, B)) != layout((A, C))
    with pytest.raises(ModelError) as exc:
        check_same_layout((A, C), (A, B), "the pruned model")
    assert str(exc.value) == ("the pruned model returns tuple (tensor (2, 10), tensor (2, 3)), expected "
                              "tuple "
                              "(tensor (2, 10), tensor (2, 4))")
    assert describe(Pair(A, B)) == "Pair {logits: tensor (2, 10), embedding: tensor (2, 4)}"


def test_nonfinite_says_where():
    assert nonfinite((A, B)) is None
    bad = B.clone()
    bad[0, 1] = float("inf")
    assert nonfinite({"logits": A, "emb": bad}) == "1 of 8 values of output emb"
    assert nonfinite(torch.tensor([float("nan")])) == "1 of 1 values"


class Two(nn.Module):
    def forward(self, x, lengths, scale: float = 1.0):
        return x


class Flexible(nn.Module):
    def forward(self, x, *, embed: bool = True, **options):
        return x


def test_signatures():
    check_signature(Two(), {"lengths": 3})  # the second tensor fixed through forward_kwargs
    with pytest.raises(ModelError) as exc:
        check_signature(Two(), {})
    assert str(exc.value).startswith("Two.forward needs 2 arguments (x, lengths); specprune calls it with "
                                     "one "
                                     "input tensor.")
    check_signature(Flexible(), {"embed": False, "anything": 1})  # **options takes any name
    with pytest.raises(ConfigError) as exc:
        check_signature(nn.Linear(2, 2), {"embed": False})
    assert str(exc.value) == ("model.forward_kwargs names embed, which Linear.forward does not take (it "
                              "takes "
                              "input)")


def test_model_call_binds_keyword_arguments():
    class Scaled(nn.Module):
        def forward(self, x, scale: float = 1.0):
            return {"y": x * scale}

    call = ModelCall(forward_kwargs={"scale": 3.0}, output="y")
    x = torch.ones(1, 2)
    assert call.evaluated(Scaled(), x).tolist() == [[3.0, 3.0]]
    assert call.bound(Scaled())(x)["y"].tolist() == [[3.0, 3.0]]
    assert ModelCall().bound(nn.Identity()).__class__ is nn.Identity  # nothing to bind: the model itself
