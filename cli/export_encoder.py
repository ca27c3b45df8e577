"""`geocmid export-encoder`: encoder.pt and model_card.json from any pretraining checkpoint."""

from __future__ import annotations

from pathlib import Path

import click


@click.command('export-encoder')
@click.argument('run', type=click.Path(path_type=Path))
@click.option('--overwrite', is_flag=True, help='Replace an existing encoder.pt and card.')
def export_encoder(run: Path, overwrite: bool) -> None:
    """Write RUN/encoder.pt and RUN/model_card.json from RUN/checkpoints/last.ckpt.

    RUN is a pretraining run folder, finished or not (a crashed or preempted run keeps a
    recent last.ckpt), or a checkpoint file inside one.
    """
    from geocmid.runs.pretrain import export_encoder as export

    encoder, card = export(run, overwrite=overwrite)
    click.echo(f'encoder: {encoder}')
    click.echo(f'model card: {card}')
