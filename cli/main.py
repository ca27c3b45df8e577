"""The ``geocmid`` command group and the mapping from errors to exit codes."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import click

import geocmid
from geocmid.errors import InputError

# Exit codes: 0 success, 2 bad input (InputError or a usage error), 1 internal error.
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1

#: Environment variable that shows everything: tracebacks, warnings, Lightning's messages.
DEBUG_VARIABLE = 'GEOCMID_DEBUG'

# Command name -> ('module:attribute' in this package, the first line of its docstring).
# Commands are imported only when run, so `geocmid --help` and `geocmid info` do not pay for
# importing torch, timm and Lightning; tests/test_cli_main.py checks each help line against the
# command's docstring.
COMMANDS: dict[str, tuple[str, str]] = {
    'info': (
        'info:info',
        'Describe each raster under PATH, or the scenes of a STAC document or a --stack folder.',
    ),
    'pretrain': (
        'pretrain:pretrain',
        'Pretrain an encoder (CMID, GeRSP) on --rasters DIR or --images DIR, writing -o RUN_DIR.',
    ),
    'import-weights': (
        'import_weights:import_weights_command',
        'Import an official CMID or GeRSP checkpoint as a timm encoder with a model card.',
    ),
    'export-encoder': (
        'export_encoder:export_encoder',
        'Write RUN/encoder.pt and RUN/model_card.json from RUN/checkpoints/last.ckpt.',
    ),
    'export': (
        'export:export',
        "Export RUN_DIR's network to ONNX (-o model.onnx), with its model card inside.",
    ),
    'train': ('train:train', 'Fine-tune a pretrained encoder on labelled rasters.'),
    'segment': (
        'segment:segment',
        'Segment SCENE... with a trained model: class polygons, label and probability COGs.',
    ),
    'change': (
        'change:change',
        'Detect changes between BEFORE and AFTER, or in every pair of --pairs.',
    ),
    'evaluate': (
        'evaluate:evaluate',
        'Evaluate a frozen encoder on labelled image chips (k-NN or linear probe).',
    ),
    'classify': (
        'classify:classify',
        'Predict the class of every chip under IMAGES, writing one CSV row per chip.',
    ),
    'embed': (
        'embed:embed',
        'Embed each window of a grid over --rasters with a frozen encoder, writing -o FILE.',
    ),
}

#: Commands that train with Lightning, which handles SIGTERM itself.
TRAINING_COMMANDS = ('pretrain', 'train')

# GDAL settings that TorchGeo's own CLI sets (Pangeo COG best practices); a user's environment
# wins. GDAL_DISABLE_READDIR_ON_OPEN is left alone: EMPTY_DIR hides local sidecars that
# geocmid reads (ENVI .hdr headers, .msk masks, .aux.xml colour tables).
# AWS_NO_SIGN_REQUEST is decided with the other network settings in geocmid/raster/locations.py:
# only without credentials, which it would otherwise ignore.
GDAL_DEFAULTS = {
    'GDAL_MAX_RAW_BLOCK_CACHE_SIZE': '200000000',
    'GDAL_SWATH_SIZE': '200000000',
    'VSI_CURL_CACHE_SIZE': '200000000',
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The command names, sorted."""
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import and return the command ``cmd_name``; None if there is no such command."""
        if cmd_name not in COMMANDS:
            return None
        module_name, attribute = COMMANDS[cmd_name][0].split(':')
        module = importlib.import_module(f'{__package__}.{module_name}')
        command: click.Command = getattr(module, attribute)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List the commands from the table, without importing them."""
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names))  # as click.Group does
        # A stand-in command gives click's own shortening of the help line.
        rows = [
            (name, click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit))
            for name in names
        ]
        with formatter.section('Commands'):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={'help_option_names': ['-h', '--help']})
@click.version_option(geocmid.__version__, prog_name='geocmid')
def cli() -> None:
    """geocmid: pretrain remote-sensing encoders (CMID, GeRSP) and map whole scenes with them."""


def one_line(text: str) -> str:
    """``text`` with its lines joined by spaces: an error message is always one line."""
    return ' '.join(line.strip() for line in str(text).splitlines() if line.strip())


@contextmanager
def quiet_libraries(debug: bool, messages: bool = False) -> Iterator[None]:
    """Hide the warnings and log messages of the libraries (GDAL, torch, Lightning).

    Python warnings are ignored. Log records below ERROR are dropped, whichever handlers the
    libraries install (Lightning adds its own, for its start-up banner), unless ``messages``:
    then the INFO messages of training (Lightning's and geocmid's) are shown. A root handler
    that drops what reaches it keeps GDAL's messages, which rasterio logs, from stderr. With
    ``debug``, nothing is hidden. Everything is restored on exit.
    """
    if debug:
        yield
        return
    root = logging.getLogger()
    handler = logging.NullHandler()
    root.addHandler(handler)
    disabled = logging.root.manager.disable
    if not messages:
        logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            yield
    finally:
        logging.disable(disabled)
        root.removeHandler(handler)


@contextmanager
def exit_on_terminate() -> Iterator[None]:
    """Turn SIGTERM (``kill``, ``timeout``) into :class:`SystemExit`, so that cleanup runs.

    Python dies on SIGTERM without unwinding: hidden temporary files and scratch folders would
    stay behind. Raising SystemExit instead runs every ``finally`` block and context exit.
    """

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fail(message: str, code: int) -> None:
    """Print ``message`` as one line on stderr and exit with ``code``."""
    click.echo(one_line(message), err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the group and turns exceptions into one-line errors."""
    for key, value in GDAL_DEFAULTS.items():
        os.environ.setdefault(key, value)
    debug = bool(os.environ.get(DEBUG_VARIABLE))
    args = sys.argv[1:] if argv is None else argv
    training = bool(args) and args[0] in TRAINING_COMMANDS
    # Training shows its messages (Lightning's set-up, where a stopped run resumes) unless
    # --quiet. It stops on SIGTERM at a step boundary with a checkpoint: Lightning's handler,
    # which would also call this one, so SIGTERM is left to it.
    messages = training and '--quiet' not in args
    terminate = nullcontext() if training else exit_on_terminate()
    with quiet_libraries(debug, messages), terminate:
        try:
            cli.main(args=args, prog_name='geocmid', standalone_mode=False)
        except click.exceptions.Exit as exc:  # --help, --version
            sys.exit(exc.exit_code)
        except click.exceptions.NoArgsIsHelpError as exc:  # `geocmid train`: show its help
            click.echo(exc.format_message())
            sys.exit(exc.exit_code)
        except click.Abort:
            fail('aborted', EXIT_INTERNAL)
        except click.ClickException as exc:  # usage errors: bad option, missing argument
            fail(f'error: {exc.format_message()}', EXIT_BAD_INPUT)
        except InputError as exc:
            fail(f'error: {exc}', EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            fail('interrupted', 130)
        except Exception as exc:  # the last line of defence for the user
            if debug:
                raise
            problem = f'{type(exc).__name__}: {exc}'
            fail(f'internal error: {problem} (set {DEBUG_VARIABLE}=1 for a traceback)', 1)
    sys.exit(0)


if __name__ == '__main__':
    main()
