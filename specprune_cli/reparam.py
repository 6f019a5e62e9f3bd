"""Weight reparametrisations folded into plain weights before pruning (docs/method.md §4).

Audio and GAN models wrap their convolutions in ``weight_norm`` or ``spectral_norm``: the weight is
computed from other parameters (``torch.nn.utils.parametrize``, or the older hook-based
``torch.nn.utils.weight_norm``) and cannot be replaced by a smaller one. In eval mode the computed
weight is a fixed tensor, so folding it into a plain ``weight`` parameter leaves the function the
model computes unchanged; surgery then works on it as on any layer. The pruned model keeps the plain
weights (fine-tuning trains them directly).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm


def _old_weight_norms(mod: nn.Module) -> list[WeightNorm]:
    return [hook for hook in mod._forward_pre_hooks.values() if isinstance(hook, WeightNorm)]


def fold_reparametrizations(model: nn.Module) -> list[str]:
    """Fold every parametrisation and hook-based weight norm of ``model`` into plain parameters, in
    place, with the values they compute in eval mode. Returns "module.attribute" for each one folded.

    Not ``parametrize.remove_parametrizations``: it deletes the attribute from the module's class,
    which a deep copy shares with the module it was copied from."""
    was_training = model.training
    model.eval()
    folded = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            prefix = f"{name}." if name else ""
            if parametrize.is_parametrized(mod):
                values = {attr: getattr(mod, attr).detach().clone() for attr in mod.parametrizations}
                del mod._modules["parametrizations"]
                mod.__class__ = type(mod).__bases__[0]  # the class parametrize derived for this module
                for attr, value in values.items():
                    setattr(mod, attr, nn.Parameter(value))
                    folded.append(prefix + attr)
            for hook in _old_weight_norms(mod):
                torch.nn.utils.remove_weight_norm(mod, hook.name)
                folded.append(prefix + hook.name)
    model.train(was_training)
    return folded


def working_copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """A deep copy of ``model`` in eval mode with its reparametrisations folded (``model`` is left as it
    computes; a hook-based weight norm's cached weight is recomputed without autograd history first,
    as ``copy.deepcopy`` refuses tensors that have it)."""
    with torch.no_grad():
        for mod in model.modules():
            for hook in _old_weight_norms(mod):
                setattr(mod, hook.name, hook.compute_weight(mod))
    copied = copy.deepcopy(model).eval()
    return copied, fold_reparametrizations(copied)
