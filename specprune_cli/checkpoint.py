"""Building architectures, loading trained checkpoints, saving and loading pruned models.

Loading uses ``torch.load(weights_only=True)`` unless the user vouches for the file
(``--trust-checkpoint``): unpickling arbitrary objects can run arbitrary code. The pruned-model file
holds only tensors and plain Python values, so it always loads with ``weights_only=True``.
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

from specprune_cli.errors import CheckpointError, ConfigError

PRUNED_FORMAT = "specprune-pruned/1"
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
_SHOW = 5


def _import_callable(arch: str) -> Any:
    module_part, _, attr = arch.rpartition(":")
    if not module_part or not attr:
        raise ConfigError(f"model.arch {arch!r} must have the form 'package.module:callable' or "
                          "'path/to/file.py:callable'")
    try:
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
    except Exception as exc:  # any failure while importing user code is the user's to fix
        raise ConfigError(f"model.arch {arch!r} could not be imported ({type(exc).__name__}: {exc}); check "
                          "that the module is installed (or the file exists, relative to the working "
                          "directory) and that it defines the callable after the ':'") from exc


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
    try:
        model = fn(**dict(kwargs or {}))
    except Exception as exc:
        raise ConfigError(f"model.arch {arch!r} failed to build with model.kwargs {dict(kwargs or {})!r} "
                          f"({type(exc).__name__}: {exc}); check model.kwargs") from exc
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


def _torch_load(path: Path, *, trust: bool) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
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
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); is it a file "
                              "written by torch.save?") from None
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        # A trusted whole-module pickle needs its class importable under the name it was saved with.
        raise CheckpointError(f"cannot unpickle checkpoint {path} ({type(exc).__name__}: {exc}); the code "
                              "that defines the saved model must be importable; or save a state_dict and "
                              "set model.arch") from None


def load_checkpoint(path: str | os.PathLike, *, arch: str | None, kwargs: Mapping[str, Any] | None = None,
                    trust: bool = False) -> nn.Module:
    """Load a trained model from a checkpoint file.

    Accepts a state_dict, or a dict holding one under ``state_dict``, ``model_state_dict`` or ``model``;
    ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes are stripped. With ``trust``
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
    obj = _torch_load(path, trust=trust)
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
        found = f"a dict with keys {_few([str(k) for k in obj])}" if isinstance(obj, Mapping) \
            else type(obj).__name__
        raise CheckpointError(f"checkpoint {path} holds {found}, not a state_dict; save "
                              "model.state_dict(), or a dict with it under 'state_dict' or 'model'")
    if arch is None:
        raise ConfigError(f"model.arch is not set; checkpoint {path} holds a state_dict, so specprune must "
                          "build the architecture: set model.arch to 'package.module:callable' or "
                          "'path/to/file.py:callable'")
    state = _strip_prefixes(state)
    model = build_model(arch, kwargs)
    _check_keys(model, state, f"checkpoint {path} does not match model.arch {arch!r}",
                "check that model.arch and model.kwargs are the ones the checkpoint was trained with")
    model.load_state_dict(state, strict=True)
    return model.eval()


def _check_keys(model: nn.Module, state: Mapping[str, torch.Tensor], what: str, fix: str) -> None:
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


def save_pruned(path: str | os.PathLike, model: nn.Module, plan: dict, *, arch: str | None,
                kwargs: Mapping[str, Any] | None, input_shape: tuple[int, ...] | list[int]) -> None:
    """Write a pruned model as one file of tensors and plain values (loads with weights_only=True).

    The file holds the state_dict, the plan (kept widths and indices per unit), arch, kwargs,
    input_shape and a format version. It is written under a temporary name and renamed, so a failure
    never leaves a half-written file.

    Args:
        path: destination (conventionally ``model.pt``).
        model: the pruned network.
        plan: the JSON-serialisable plan from ``prune_model``.
        arch, kwargs: how to build the original architecture (``load_pruned`` resizes it to the plan).
        input_shape: one sample's shape, to trace the fresh model when applying the plan.
    """
    path = Path(path)
    payload = {
        "format": PRUNED_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "plan": plan,
        "arch": arch,
        "kwargs": dict(kwargs or {}),
        "input_shape": [int(d) for d in input_shape],
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_pruned(path: str | os.PathLike) -> nn.Module:
    """Load a file written by ``save_pruned``: build the original arch, resize it to the plan, load.

    Args:
        path: the pruned-model file.

    Returns:
        The pruned model in eval mode.

    Raises:
        CheckpointError: not a specprune file, or the plan/weights do not fit the architecture.
    """
    from specprune_cli.surgery import apply_plan_shapes

    path = Path(path)
    payload = _torch_load(path, trust=False)
    if not isinstance(payload, Mapping) or payload.get("format") != PRUNED_FORMAT:
        raise CheckpointError(f"{path} is not a pruned model written by specprune (expected format "
                              f"{PRUNED_FORMAT!r}); to load an original checkpoint use load_checkpoint")
    if payload["arch"] is None:
        raise CheckpointError(f"{path} records no model.arch (the original was a pickled module), so it "
                              "cannot be rebuilt from the plan; export with formats: [module] instead")
    model = build_model(payload["arch"], payload["kwargs"])
    apply_plan_shapes(model, payload["plan"], torch.zeros(1, *payload["input_shape"]))
    _check_keys(model, payload["state_dict"], f"{path} does not fit its own plan",
                "the file is damaged or was written by a different specprune version")
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval()
