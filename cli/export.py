"""`geocmid export`: a run's network as an ONNX file with the model card inside."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument('run_dir', type=click.Path(path_type=Path))
@click.option(
    '-o', '--output', required=True, type=click.Path(path_type=Path), help='The .onnx file.'
)
@click.option(
    '--fp16', is_flag=True,
    help='Store the weights in float16 (inputs and outputs stay float32); needs '
    'onnxconverter-common.',
)  # fmt: skip
@click.option('--overwrite', is_flag=True, help='Replace an existing file.')
def export(run_dir: Path, output: Path, fp16: bool, overwrite: bool) -> None:
    """Export RUN_DIR's network to ONNX (-o model.onnx), with its model card inside.

    RUN_DIR is a fine-tuning run folder (segmentation, change, classification) or a pretraining
    run folder or encoder.pt (the bare encoder, giving pooled features). The whole model card is
    stored in the file's metadata (key geocmid.card); normalisation stays outside the graph:
    feed (x - mean) / std with the card's mean and std, per band, in the card's band order.
    """
    from geocmid.runs.export import export_onnx

    path = export_onnx(run_dir, output, overwrite=overwrite, fp16=fp16)
    click.echo(f'onnx: {path}')
