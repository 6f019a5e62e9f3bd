"""Small models written the way public PyTorch code is written, for tests/test_corpus.py (issue 13).

Each module here is self-contained (it imports only torch), so the CLI can load it by path as
``model.arch: "tests/corpus/<file>.py:<factory>"``. A module declares its models in a dict
``CORPUS = {factory_name: (input_shape, what the model covers)}``; ``input_shape`` is one sample,
without the batch dimension. A model whose forward takes flag arguments may also list, in
``FORWARD_KWARGS = {factory_name: {argument: value}}``, values other than the defaults that a user
would set through ``model.forward_kwargs``.

Every model is tiny (at most a few tens of thousands of parameters, inputs of a few hundred to a few
thousand values) so the whole corpus runs in about a minute on two cores.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class CorpusModel:
    """One corpus entry.

    Attributes:
        name: the factory's name (unique across the corpus; the test id).
        file: the module's file name, e.g. "mnist.py".
        input_shape: one sample's shape, no batch dimension.
        covers: the coding pattern the model exists to exercise.
        forward_kwargs: non-default flag arguments worth pruning with, as (name, value) pairs.
    """

    name: str
    file: str
    input_shape: tuple[int, ...]
    covers: str
    forward_kwargs: tuple[tuple[str, object], ...] = ()

    @property
    def arch(self) -> str:
        """The ``model.arch`` value, relative to the repository root."""
        return f"tests/corpus/{self.file}:{self.name}"

    def factory(self) -> nn.Module:
        """A freshly built model with the framework's default initialisation."""
        return getattr(_module(self.file), self.name)()


def _module(file: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{Path(file).stem}")


def load_corpus() -> list[CorpusModel]:
    """Every model declared by a module of this package, ordered by file, then as declared."""
    entries = []
    for path in sorted(HERE.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = _module(path.name)
        flags = getattr(module, "FORWARD_KWARGS", {})
        for name, (shape, covers) in module.CORPUS.items():
            entries.append(CorpusModel(name, path.name, tuple(shape), covers,
                                       tuple(sorted(flags.get(name, {}).items()))))
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"corpus factory names must be unique, repeated: {duplicates}")
    return entries


def build(entry: CorpusModel, seed: int = 0, warm_batches: int = 3, batch_size: int = 16) -> nn.Module:
    """The model with seeded weights and warmed normalisation statistics, in eval mode.

    Like ``make_cnn`` in tests/conftest.py: a few forward passes in train mode on seeded random inputs
    move BatchNorm running statistics away from (0, 1), so pruning sees the scales a trained model has.
    """
    torch.manual_seed(seed)
    model = entry.factory()
    model.train()
    with torch.no_grad():
        for _ in range(warm_batches):
            model(torch.randn(batch_size, *entry.input_shape))
    return model.eval()
