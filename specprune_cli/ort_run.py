"""Running an exported file in ONNX Runtime, for every check, calibration and timing that does.

``ort_feed`` is the one place a tensor becomes an ONNX Runtime input: in the type the file declares.
``OrtModel`` calls a file like the torch model it was exported from, output structure included.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from specprune_cli.model_io import with_tensors


#: ONNX Runtime's names for input types, and the numpy dtypes it takes for them.
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
              "tensor(bool)": np.bool_}


def ort_input(x: torch.Tensor, dtype: Any = None) -> np.ndarray:
    """``x`` as ONNX Runtime takes it: in ``dtype``, the file's declared input type, when it is known;
    else float inputs as float32 and integer ones (token ids) as they are."""
    t = x.detach().cpu()
    array = (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16
    if dtype is None:
        dtype = np.float32 if t.is_floating_point() else array.dtype
    return array.astype(dtype, copy=False)


def ort_feed(session, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The feed of a one-input ONNX Runtime session: ``x`` in the type the file declares. The one place
    a tensor becomes an ONNX Runtime input (export checks, int8 calibration and checks, latency)."""
    spec = session.get_inputs()[0]
    return {spec.name: ort_input(x, ORT_DTYPES.get(spec.type))}


def ort_outputs(session, x: torch.Tensor) -> list[torch.Tensor]:
    """Run an ONNX Runtime session on ``x``: its output tensors, in the file's order."""
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, ort_feed(session, x))]


class OrtModel(nn.Module):
    """An ONNX file run by ONNX Runtime, called like the torch model it was exported from.

    ``forward`` returns the torch model's output structure (``template``, e.g. its output on the example
    input) holding the file's output tensors, so ``ModelCall`` selects the evaluated tensor from it as
    from the torch model. Forward keyword arguments are ignored: the export fixed them.
    """

    def __init__(self, path: str | os.PathLike, template: Any, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.template = template

    def forward(self, x: torch.Tensor, **_fixed_at_export: Any) -> Any:
        return with_tensors(self.template, iter(ort_outputs(self.session, x)))
