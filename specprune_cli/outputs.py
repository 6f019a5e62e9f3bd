"""The output directory as a transaction: all of a run's files appear together, or none do.

Outputs are written into ``OUTDIR.tmp-<pid>`` beside OUTDIR and renamed into place only when every step
succeeded, so a failed or interrupted run leaves OUTDIR absent (or, with ``overwrite``, as it was).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from specprune_cli.errors import ConfigError, OutputError


def check_output_dir(output_dir: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse to clobber results: OUTDIR may be absent or empty; non-empty needs ``overwrite``.

    Args:
        output_dir: OUTDIR.
        overwrite: replacing a non-empty OUTDIR is allowed.
        inputs: the run's input files; none may lie inside OUTDIR when it would be replaced.

    Raises:
        ConfigError: OUTDIR is a file, non-empty without ``overwrite``, or holds one of the inputs.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"--output {output_dir} is a file, not a directory; choose another path")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"--output {output_dir} already exists and is not empty; pass --overwrite to "
                              "replace it, or choose another directory")
        root = output_dir.resolve()
        inside = [p for p in inputs if root in Path(p).resolve().parents]
        if inside:
            raise ConfigError(f"--output {output_dir} holds {inside[0]}, an input of this run, and "
                              "--overwrite would delete it; write the results to another directory")


@contextlib.contextmanager
def staged_output(output_dir: Path) -> Iterator[Path]:
    """A temporary folder beside ``output_dir`` that replaces it when the block succeeds.

    On any error (or interrupt) the temporary folder is removed and ``output_dir`` is left as it was.

    Raises:
        OutputError: the folder cannot be created, or a file cannot be written into it (a full disk,
            missing permissions); nothing is left behind.
    """
    tmp = output_dir.with_name(f"{output_dir.name}.tmp-{os.getpid()}")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a killed run with our pid: nothing in it is ours to keep
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output directory {output_dir} ({exc.strerror or exc}); choose "
                          "a --output where you can write") from None
    try:
        yield tmp
        _commit(tmp, output_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"writing the results to {output_dir} failed ({exc.strerror or exc}: "
                          f"{exc.filename or ''}); nothing was written. Free space or choose another "
                          "--output") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, output_dir: Path) -> None:
    """Move the finished temp dir into place; an old OUTDIR (allowed by overwrite) goes only after."""
    old = None
    if output_dir.exists():
        old = output_dir.with_name(f"{output_dir.name}.old-{os.getpid()}")
        os.replace(output_dir, old)
    try:
        os.replace(tmp, output_dir)
    except OSError:
        if old is not None:
            os.replace(old, output_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, with a final newline."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
