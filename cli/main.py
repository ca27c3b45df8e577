"""The ``geocmid`` command group and the mapping from errors to exit codes."""

from __future__ import annotations

import importlib
import os
import sys

import click

import geocmid
from geocmid.errors import InputError

# Exit codes: 0 success, 2 bad input (InputError or a usage error), 1 internal error.
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1

# Command name -> 'module:attribute' in this package. Commands are imported only when run, so
# `geocmid info` does not pay for importing torch, timm and Lightning.
COMMANDS: dict[str, str] = {
    'info': 'info:info',
    'pretrain': 'pretrain:pretrain',
    'import-weights': 'import_weights:import_weights_command',
    'train': 'train:train',
    'segment': 'segment:segment',
    'change': 'change:change',
    'evaluate': 'evaluate:evaluate',
    'classify': 'classify:classify',
    'embed': 'embed:embed',
}

# GDAL settings that TorchGeo's own CLI sets (Pangeo COG best practices); a user's environment
# wins. GDAL_DISABLE_READDIR_ON_OPEN is left alone: EMPTY_DIR hides local sidecars that
# geocmid reads (ENVI .hdr headers, .msk masks, .aux.xml colour tables).
GDAL_DEFAULTS = {
    'AWS_NO_SIGN_REQUEST': 'YES',
    'GDAL_MAX_RAW_BLOCK_CACHE_SIZE': '200000000',
    'GDAL_SWATH_SIZE': '200000000',
    'VSI_CURL_CACHE_SIZE': '200000000',
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(':')
        module = importlib.import_module(f'{__package__}.{module_name}')
        command: click.Command = getattr(module, attribute)
        return command


@click.group(cls=LazyGroup, context_settings={'help_option_names': ['-h', '--help']})
@click.version_option(geocmid.__version__, prog_name='geocmid')
def cli() -> None:
    """geocmid: pretrain remote-sensing encoders (CMID, GeRSP) and map whole scenes with them."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the group and turns exceptions into one-line errors."""
    for key, value in GDAL_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        cli.main(args=argv, prog_name='geocmid', standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help, --version
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo('Aborted.', err=True)
        sys.exit(EXIT_INTERNAL)
    except click.ClickException as exc:  # usage errors: bad option, missing argument
        exc.show()
        sys.exit(EXIT_BAD_INPUT)
    except InputError as exc:
        click.echo(f'error: {exc}', err=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        click.echo('interrupted', err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence for the user
        if os.environ.get('GEOCMID_DEBUG'):
            raise
        click.echo(
            f'internal error: {type(exc).__name__}: {exc} (set GEOCMID_DEBUG=1 for a traceback)',
            err=True,
        )
        sys.exit(EXIT_INTERNAL)
    sys.exit(0)


if __name__ == '__main__':
    main()
