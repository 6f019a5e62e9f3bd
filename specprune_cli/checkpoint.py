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
import pickle
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specprune_cli.errors import CheckpointError, ConfigError, reason, user_code

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
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


def _few(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def torch_load(path: Path, *, trust: bool) -> Any:
    """``torch.load`` on CPU; any failure to read the file is a CheckpointError that says what to do.

    Args:
        path: the file.
        trust: allow unpickling arbitrary objects (this runs code from the file).
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file; check the path")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the file was not written completely: "
                              "save it again with torch.save(model.state_dict(), path)")
    if _is_safetensors(path):
        return _load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except KeyboardInterrupt:
        raise
    except pickle.UnpicklingError as exc:
        # torch names the class it refused ("Unsupported global"); anything else is not a checkpoint.
        if not trust and "Unsupported global" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects (a whole model, not only tensors), which "
                "specprune will not unpickle by default because unpickling can run arbitrary code. If you "
                "trust this file, pass --trust-checkpoint; better, re-save it with "
                "torch.save(model.state_dict(), path).") from None
        raise CheckpointError(f"cannot read checkpoint {path} (it does not unpickle as a torch.save file: it "
                              "is damaged or in another format); check the path, or re-save the weights with "
                              "torch.save(model.state_dict(), path)") from None
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        # A trusted whole-module pickle needs its class importable under the name it was saved with.
        raise CheckpointError(f"cannot unpickle checkpoint {path} ({type(exc).__name__}: {exc}); the code "
                              "that defines the saved model must be importable; or save a state_dict and "
                              "set model.arch") from None
    except PermissionError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}; check its "
                              "permissions") from None
    except BaseException as exc:  # noqa: B036 - random bytes fail anywhere in torch.load; a pickle may exit
        raise CheckpointError(f"cannot read checkpoint {path} ({reason(exc)}); is it a file written by "
                              "torch.save? Re-save the weights with torch.save(model.state_dict(), "
                              "path)") from None


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does: an 8-byte little-endian header length that fits
    the file, then the header's JSON."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False  # torch.load reports it
    return (len(head) == 9 and head[8:9] == b"{"
            and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: B036 - SafetensorError, OSError, a header that is not JSON
        raise CheckpointError(f"cannot read checkpoint {path} as a safetensors file ({reason(exc)}); it is "
                              "damaged or truncated: save or download it again") from None


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
        if twin is not None and expected[key].numel():
            filled[key] = state[twin]
    return filled


def load_checkpoint(path: str | os.PathLike, *, arch: str | None, kwargs: Mapping[str, Any] | None = None,
                    trust: bool = False) -> nn.Module:
    """Load a trained model from a checkpoint file.

    Accepts a state_dict (a torch.save file, or a safetensors file), or a dict holding one under
    ``state_dict``, ``model_state_dict`` or ``model``;
    ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes are stripped, and so is the
    attribute a training wrapper holds the model under (Lightning's ``model.``) when every key has it
    and the rest matches the architecture exactly. With ``trust``
    a pickled whole module is accepted too, and then ``arch`` may be None.

    Args:
        path: the checkpoint.
        arch: the architecture (see ``build_model``); required unless the file holds a whole module.
        kwargs: keyword arguments for ``arch``.
        trust: allow unpickling arbitrary objects (``torch.load(weights_only=False)``).

    Returns:
        The model with the checkpoint's weights, in eval mode.

    Raises:
        CheckpointError: unreadable file, pickled objects without ``trust``, no state_dict inside, or
            keys/shapes that do not match the architecture.
        ConfigError: ``arch`` is missing or does not build.
    """
    path = Path(path)
    obj = torch_load(path, trust=trust)
    if isinstance(obj, nn.Module):
        return obj.eval()
    state = None
    if _is_state_dict(obj):
        state = obj
    elif isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key].eval()
            if _is_state_dict(obj.get(key)):
                state = obj[key]
                break
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
