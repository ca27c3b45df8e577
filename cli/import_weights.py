"""`geocmid import-weights CKPT --format ... -o encoder.pt`: convert an official checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from geocmid.models.weights import IMPORT_FORMATS, ImportFormat, import_weights

from .options import check_output


@click.command('import-weights')
@click.argument('checkpoint', type=click.Path(path_type=Path))
@click.option(
    '--format',
    'fmt',
    type=click.Choice(IMPORT_FORMATS),
    required=True,
    help='Which official release the file is.',
)
@click.option(
    '-o',
    '--output',
    type=click.Path(path_type=Path),
    required=True,
    help='Encoder file to write (a folder gets encoder.pt); model_card.json goes beside it.',
)
@click.option('--overwrite', is_flag=True, help='Replace existing outputs.')
def import_weights_command(
    checkpoint: Path, fmt: ImportFormat, output: Path, overwrite: bool
) -> None:
    """Import an official CMID or GeRSP checkpoint as a timm encoder with a model card.

    CHECKPOINT is a backbone-only file or a full pre-training checkpoint; from a full one the
    student backbone is taken.
    """
    check_output(output, folder=output.is_dir())
    encoder, card = import_weights(checkpoint, fmt, output, overwrite=overwrite)
    click.echo(f'wrote {encoder} ({card.backbone}, {card.in_chans} bands, method {card.method})')
    click.echo(f'source sha256 {card.provenance["sha256"]}')
