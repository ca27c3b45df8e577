"""The ``geocmid`` command group and the mapping from errors to exit codes."""

from __future__ import annotations

import os
import sys

import click

import geocmid
from geocmid.errors import InputError

# Exit codes: 0 success, 2 bad input (InputError or a usage error), 1 internal error.
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.version_option(geocmid.__version__, prog_name='geocmid')
def cli() -> None:
    """geocmid: pretrain remote-sensing encoders (CMID, GeRSP) and map whole scenes with them."""


def _register() -> None:
    # Imported here so that `geocmid --help` stays importable even while one command is broken.
    from .import_weights import import_weights_command
    from .info import info

    cli.add_command(info)
    cli.add_command(import_weights_command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the group and turns exceptions into one-line errors."""
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
