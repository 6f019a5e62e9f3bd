"""The ``specprune`` command line: parse, call the library, echo, exit codes.

Exit codes: 0 success; 1 the run failed; 2 bad usage or bad config; 3 a quality gate failed.
Errors from the library (``SpecpruneError``) are translated here, and only here
(:func:`translate_errors`), into click exceptions carrying the error's ``exit_code``. Messages and
progress go to stderr; stdout carries only the result (the table, or the ``--json`` report), so
anything the user's model prints while it runs goes to stderr too.

Under ``torchrun`` (WORLD_SIZE > 1) ``compress`` runs inside ``distributed.process_group``; only process 0
shows progress and prints the result, and a failure in any process ends every one with its message.
"""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from specprune_cli import distributed
from specprune_cli._version import __version__
from specprune_cli.errors import ConfigError, GateError, SpecpruneError, reason


class SpecpruneClickError(click.ClickException):
    """A library error shown as ``Error: <message>`` on stderr, exiting with the error's exit code.

    A plain ClickException rather than click.BadParameter for config errors: BadParameter prints the
    usage block, which is noise when the problem is a key inside a YAML file.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Run library code: its errors become click errors with their exit codes, and nothing else escapes.

    ``SystemExit`` from the user's model code and any exception specprune did not expect become exit 1
    with a message; ``KeyboardInterrupt`` still interrupts (click prints "Aborted!"). The library's
    prints to stdout go to stderr, so stdout holds only what the command echoes afterwards.
    """
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except SpecpruneError as exc:
        raise SpecpruneClickError(str(exc), exc.exit_code) from exc
    except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
        raise
    except SystemExit as exc:  # the library never exits: this came from the model's code
        raise SpecpruneClickError(f"the model's code called sys.exit({exc.code!r}) while specprune ran it; "
                                  "remove the exit from the model's module or forward") from exc
    except Exception as exc:
        raise SpecpruneClickError(f"unexpected error ({reason(exc)}); this is a bug in specprune: please "
                                  "report it with the command, the config and the model "
                                  "architecture") from exc


def _logger(quiet: bool) -> Callable[[str], None]:
    """Progress lines to stderr; with ``--quiet`` only warnings."""
    def log(message: str) -> None:
        if not quiet or message.startswith("warning:"):
            click.echo(message, err=True)

    return log


def _shared_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options compress and analyze share (their meaning is the same in both)."""
    for option in reversed([
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config key by dotted path, value parsed as YAML, e.g. "
                          "--set prune.target.flops=0.3 (repeatable; wins over the YAML)."),
        click.option("--trust-checkpoint", is_flag=True,
                     help="Allow a checkpoint that pickles Python objects (e.g. a whole model), or read "
                          "a TorchScript archive's weights; both can run code from the file, so only for "
                          "files you trust."),
        click.option("--quiet", "-q", is_flag=True,
                     help="Hide progress bars and progress messages (warnings still show)."),
        click.option("--overwrite", is_flag=True,
                     help="Replace a non-empty OUTDIR (only after the new results are complete)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                     help="Where to run (config runtime.device; wins over --set): auto, cpu or cuda."),
    ]):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="specprune", message="%(prog)s %(version)s",
                      help="Show the version and exit.")
def main() -> None:
    """Spectral Pruning (Suzuki et al., IJCAI 2020) for trained PyTorch models.

    Exit codes: 0 success, 1 the run failed, 2 bad usage or config, 3 a quality gate failed.
    """


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--config", "-c", "config_path", required=True, metavar="CFG.yaml",
              help="YAML config (see configs/default.yaml); missing keys take their defaults.")
@click.option("--output", "-o", required=True, metavar="OUTDIR",
              help="Directory for the exports (model.pt, model.onnx, ...), report.json and "
                   "config.resolved.yaml; must be absent or empty unless --overwrite.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON on stdout (the summary table and logs go to stderr).")
@_shared_options
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), metavar="PTS", default=None,
              help="Quality gate: exit 3 if top-1 accuracy drops by more than PTS percentage points "
                   "(needs labelled data.eval).")
@click.option("--min-agreement", type=click.FloatRange(0, 1), metavar="FRAC", default=None,
              help="Quality gate: exit 3 if fewer than FRAC of the pruned model's top-1 predictions match "
                   "the original's.")
def compress(checkpoint: str, config_path: str, output: str, overrides: tuple[str, ...], as_json: bool,
             trust_checkpoint: bool, quiet: bool, overwrite: bool, device: str | None,
             max_accuracy_drop: float | None, min_agreement: float | None) -> None:
    """Prune CHECKPOINT (a state_dict file) to the configured FLOPs/params target.

    Config precedence: defaults < CFG.yaml < --set. Outputs are written to a temporary directory and
    renamed to OUTDIR only when every step succeeded. A failed quality gate exits 3 after writing them.
    Under torchrun (``torchrun --nproc_per_node=N -m specprune_cli compress ...``) the processes share the
    calibration and fine-tune data, and process 0 writes OUTDIR.
    """
    from specprune_cli.config_file import load_config
    from specprune_cli.pipeline import compress as run_compress
    from specprune_cli.prepare import resolve_device
    from specprune_cli.report import summary_table

    def show(report: dict) -> None:
        if not distributed.is_main():
            return  # process 0 prints the result once
        click.echo(summary_table(report), err=as_json)
        if as_json:
            click.echo(json.dumps(report, indent=2))

    try:
        with translate_errors():
            config = load_config(config_path, _with_device(overrides, device))
            with distributed.process_group(resolve_device(config), config.runtime.timeout_s):
                main_process = distributed.is_main()
                report = run_compress(config, checkpoint, output, trust_checkpoint=trust_checkpoint,
                                      overwrite=overwrite, progress=not quiet and main_process,
                                      max_accuracy_drop=max_accuracy_drop, min_agreement=min_agreement,
                                      log=_logger(quiet or not main_process))
    except SpecpruneClickError as exc:
        if isinstance(exc.__cause__, GateError) and exc.__cause__.report is not None:
            show(exc.__cause__.report)  # the outputs exist: show what they say before failing
        raise
    show(report)


def _with_device(overrides: tuple[str, ...], device: str | None) -> tuple[str, ...]:
    """--device is runtime.device, set after the --set overrides so that it wins."""
    return overrides if device is None else (*overrides, f"runtime.device={device}")


def _ridge_list(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[float, ...]:
    try:
        ridges = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 1e-4,1e-3,1e-2")
    if not ridges or any(r <= 0 for r in ridges):
        raise click.BadParameter(f"{value!r}: give one or more ridges > 0, e.g. 1e-4,1e-3,1e-2")
    return ridges


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--config", "-c", "config_path", required=True, metavar="CFG.yaml",
              help="YAML config; data.calibration is measured, prune.* decides the suggested widths.")
@click.option("--output", "-o", default=None, metavar="OUTDIR",
              help="Also write analysis.json, spectrum.png, dof.png and config.resolved.yaml here (absent or "
                   "empty unless --overwrite).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the analysis as JSON on stdout instead of a table.")
@click.option("--ridge", "ridges", default="1e-4,1e-3,1e-2", show_default=True, callback=_ridge_list,
              metavar="R1,R2,...",
              help="Relative ridges at which to report the degrees of freedom N(lambda).")
@click.option("--prunability", "tolerance", type=click.FloatRange(min=0), default=None, metavar="TOL",
              help="Also find the smallest uniform keep fraction whose calibration loss stays within TOL of "
                   "the original's (cross-entropy with labels, else KL to the original).")
@_shared_options
def analyze(checkpoint: str, config_path: str, output: str | None, overrides: tuple[str, ...], as_json: bool,
            ridges: tuple[float, ...], tolerance: float | None, trust_checkpoint: bool, quiet: bool,
            overwrite: bool, device: str | None) -> None:
    """Show, per prunable layer, how many channels it really uses (degrees of freedom N(lambda)),
    its eigen-spectrum, and the widths compress would choose for the configured target."""
    from specprune_cli.config_file import load_config
    from specprune_cli.pipeline import analyze as run_analyze
    from specprune_cli.prepare import resolve_device
    from specprune_cli.report import analysis_table

    with translate_errors():
        if distributed.requested_world_size() > 1:
            raise ConfigError("analyze runs in one process; start it without torchrun (only compress "
                              "shares its work between processes)")
        config = load_config(config_path, _with_device(overrides, device))
        resolve_device(config)
        analysis = run_analyze(config, checkpoint, output, ridges=ridges, prunability_tolerance=tolerance,
                               trust_checkpoint=trust_checkpoint, overwrite=overwrite, progress=not quiet,
                               log=_logger(quiet))
    click.echo(json.dumps(analysis, indent=2) if as_json else analysis_table(analysis))


if __name__ == "__main__":  # pragma: no cover
    main()
