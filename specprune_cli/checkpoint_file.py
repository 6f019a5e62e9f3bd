"""Reading a checkpoint file into Python objects, safely by default.

A ``torch.save`` file is read with ``weights_only=True`` unless the user vouches for it
(``--trust-checkpoint``): unpickling arbitrary objects can run arbitrary code. A safetensors file (as the
Hugging Face hub and timm ship weights) holds tensors only and is read with ``safetensors``. A TorchScript
archive (``torch.jit.save``) is compiled code: specprune prunes the Python model, so with
``--trust-checkpoint`` only the archive's weights are read out, for ``model.arch`` to load; without it the
error says what to give instead. Any failure to read is a CheckpointError that says what to do.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from specprune_cli.errors import CheckpointError, reason


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
    if _is_torchscript(path):
        return _torchscript_weights(path, trust)
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


def _is_torchscript(path: Path) -> bool:
    """A zip whose records hold compiled code (``code/``) and ``constants.pkl``, as torch.jit.save writes."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def _torchscript_weights(path: Path, trust: bool) -> dict[str, torch.Tensor]:
    if not trust:
        raise CheckpointError(
            f"checkpoint {path} is a TorchScript archive (torch.jit.save), compiled code that specprune does "
            "not load by default. specprune prunes the Python model: give the weights saved with "
            "torch.save(model.state_dict(), path) and set model.arch; or, if you trust this file, pass "
            "--trust-checkpoint to read its weights out for model.arch")
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: B036 - a damaged archive fails anywhere in torch.jit.load
        raise CheckpointError(f"cannot read TorchScript archive {path} ({reason(exc)}); it is damaged: save "
                              "it again, or save the state_dict with torch.save") from None
    return {k: v.detach().clone() for k, v in scripted.state_dict().items()}
