"""Building architectures and loading trained checkpoints.

Loading uses ``torch.load(weights_only=True)`` unless the user vouches for the file
(``--trust-checkpoint``): unpickling arbitrary objects can run arbitrary code. A safetensors file (as the
Hugging Face hub and timm ship weights) is read with ``safetensors``, which holds tensors only; the
weights it stores once for tied parameters are given to every name that shares them. Importing and building
the architecture runs the user's code too: whatever it raises, ``SystemExit`` included, becomes an
error that says where it happened (see ``errors.user_code``).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specprune_cli.checkpoint_file import torch_load
from specprune_cli.errors import CheckpointError, ConfigError, reason, user_code

#: Where training scripts keep the weights in a checkpoint dict, in the order they are looked for.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "model_state", "net", "network", "weights")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
_SHOW = 5


def _import_callable(arch: str) -> Any:
    module_part, _, attr = arch.rpartition(":")
    if not module_part or not attr:
        raise ConfigError(f"model.arch {arch!r} must have the form 'package.module:callable' or "
                          "'path/to/file.py:callable'")

    def failed(exc: BaseException) -> ConfigError:
        return ConfigError(f"model.arch {arch!r} could not be imported ({reason(exc)}); check "
                           "that the module is installed (or the file exists, relative to the working "
                           "directory) and that it defines the callable after the ':'")

    with user_code(failed):
        if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
            path = Path(module_part).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {module_part}")
            # A stable, unique name per file: the same file imported twice gives the same classes.
            name = "specprune_arch_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module  # registered first so classes in it can be pickled
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            module = importlib.import_module(module_part)
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj


def build_model(arch: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Instantiate ``arch`` with ``kwargs``.

    Args:
        arch: "package.module:callable" (e.g. "torchvision.models:resnet18") or
            "path/to/file.py:callable" (relative to the working directory).
        kwargs: keyword arguments for the callable.

    Returns:
        The freshly built module (random weights), in eval mode.

    Raises:
        ConfigError: the arch does not import, its call fails, or it does not return an nn.Module.
    """
    fn = _import_callable(arch)
    with user_code(lambda exc: ConfigError(f"model.arch {arch!r} failed to build with model.kwargs "
                                           f"{dict(kwargs or {})!r} ({reason(exc)}); check "
                                           "model.kwargs")):
        model = fn(**dict(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.arch {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _holds_weights(obj: Any) -> bool:
    """A whole module or a state_dict: what a checkpoint's weights can be."""
    return isinstance(obj, nn.Module) or _is_state_dict(obj)


def _few(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _fill_tied(model: nn.Module, state: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state`` with a missing key filled from a present one whose tensor the model shares with it (tied
    weights, which ``safetensors.torch.save_model`` stores once)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if not missing:
        return state
    by_storage = {(v.data_ptr(), tuple(v.shape)): k for k, v in expected.items() if k in state and v.numel()}
    filled = dict(state)
    for key in missing:
        twin = by_storage.get((expected[key].data_ptr(), tuple(expected[key].shape)))
        if twin is not None:  # (an empty tensor is in no pair: by_storage leaves them out)
            filled[key] = state[twin]
    return filled


def load_checkpoint(path: str | os.PathLike, *, arch: str | None, kwargs: Mapping[str, Any] | None = None,
                    trust: bool = False, key: str | None = None) -> nn.Module:
    """Load a trained model from a checkpoint file.

    Accepts a state_dict (a torch.save file, a safetensors file, or with ``trust`` a TorchScript
    archive's weights), or a dict holding one: under ``key`` when given (dotted for nested dicts), else
    under the first of ``STATE_DICT_KEYS`` it has, else the only state_dict among its values;
    ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes are stripped, and so is the
    attribute a training wrapper holds the model under (Lightning's ``model.``) when every key has it
    and the rest matches the architecture exactly. With ``trust``
    a pickled whole module is accepted too, and then ``arch`` may be None.

    Args:
        path: the checkpoint.
        arch: the architecture (see ``build_model``); required unless the file holds a whole module.
        kwargs: keyword arguments for ``arch``.
        trust: allow unpickling arbitrary objects (``torch.load(weights_only=False)``).
        key: where the weights are in a checkpoint dict (``model.checkpoint_key``, e.g. "ema").

    Returns:
        The model with the checkpoint's weights, in eval mode.

    Raises:
        CheckpointError: unreadable file, pickled objects without ``trust``, no state_dict inside, or
            keys/shapes that do not match the architecture.
        ConfigError: ``arch`` is missing or does not build.
    """
    path = Path(path)
    obj = torch_load(path, trust=trust)
    if key is not None:
        obj = _under_key(obj, key, path)
    found = _weights_in(obj, path)
    if isinstance(found, nn.Module):
        return found.eval()
    state = found
    if state is None:
        if isinstance(obj, Mapping):
            found = f"a dict with keys {_few([str(k) for k in obj])}" if obj else "an empty dict"
        elif isinstance(obj, torch.Tensor):
            found = f"a single tensor of shape {tuple(obj.shape)}"
        else:
            found = f"a {type(obj).__name__}"
        raise CheckpointError(f"checkpoint {path} holds {found}, not a state_dict; save "
                              "model.state_dict(), or a dict with it under 'state_dict' or 'model'")
    if arch is None:
        raise ConfigError(f"model.arch is not set; checkpoint {path} holds a state_dict, so specprune must "
                          "build the architecture: set model.arch to 'package.module:callable' or "
                          "'path/to/file.py:callable'")
    state = _strip_prefixes(state)
    model = build_model(arch, kwargs)
    state = _fill_tied(model, _drop_wrapper_prefix(model, state))
    check_keys(model, state, f"checkpoint {path} does not match model.arch {arch!r}",
                "check that model.arch and model.kwargs are the ones the checkpoint was trained with")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # keys and shapes match; what is left is e.g. a tensor subclass or dtype
        raise CheckpointError(f"checkpoint {path} does not load into model.arch {arch!r} "
                              f"({reason(exc)})") from None
    return model.eval()


def _under_key(obj: Any, key: str, path: Path) -> Any:
    """The value at ``key`` (dotted through nested dicts) of a checkpoint dict."""
    for part in key.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            keys = (f"its keys there: {_few([str(k) for k in obj])}" if isinstance(obj, Mapping)
                    else "there is no dict there")
            raise CheckpointError(f"checkpoint {path} has no key {key!r} (model.checkpoint_key); {keys}")
        obj = obj[part]
    if not _holds_weights(obj):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__} under {key!r}, not a "
                              "state_dict (model.checkpoint_key); name the key that holds the weights")
    return obj


def _weights_in(obj: Any, path: Path) -> nn.Module | Mapping[str, Any] | None:
    """The module or state_dict a checkpoint holds: itself, under a known key, or as the only one among a
    dict's values; None if there is none. Several and no known key: an error naming them."""
    if _holds_weights(obj):
        return obj
    if not isinstance(obj, Mapping):
        return None
    for key in STATE_DICT_KEYS:
        if _holds_weights(obj.get(key)):
            return obj[key]
    found = [k for k, v in obj.items() if _holds_weights(v)]
    if len(found) > 1:
        names = _few([str(k) for k in found])
        raise CheckpointError(f"checkpoint {path} holds {len(found)} sets of weights ({names}); set "
                              "model.checkpoint_key to the one to prune")
    return obj[found[0]] if found else None


def _drop_wrapper_prefix(model: nn.Module, state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The attribute a training wrapper keeps the model under (a LightningModule's ``self.model.`` or
    ``self.net.``), dropped when every key starts with it and dropping it gives exactly the model's
    keys; otherwise ``state`` as it is (a mismatch is then reported key by key)."""
    expected = set(model.state_dict())
    heads = {key.split(".", 1)[0] for key in state}
    if set(state) == expected or len(heads) != 1 or not all("." in key for key in state):
        return state
    cut = len(next(iter(heads))) + 1
    stripped = {key[cut:]: value for key, value in state.items()}
    return stripped if set(stripped) == expected else state


def check_keys(model: nn.Module, state: Mapping[str, torch.Tensor], what: str, fix: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' * (len(missing) != 1)} ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) != 1)} ({_few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch{'es' * (len(shapes) != 1)} ({_few(shapes)})")
    raise CheckpointError(f"{what}: {'; '.join(parts)}; {fix}")
