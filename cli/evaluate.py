"""`geocmid evaluate knn|linear`: accuracy of a frozen encoder on labelled chips."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click

from .options import BANDS, NON_NEGATIVE, POSITIVE, check_output


def _common_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options both protocols take (data, encoder, features, output)."""
    options = [
        click.option(
            '--encoder',
            required=True,
            help='encoder.pt (with model_card.json beside it), a run folder, or '
            'random:<backbone> (e.g. random:resnet18) for the random-initialisation baseline.',
        ),
        click.option(
            '--images',
            type=click.Path(path_type=Path),
            help='Labelled folder (one sub-folder per class) to split with --split.',
        ),
        click.option('--train', type=click.Path(path_type=Path), help='Labelled training folder.'),
        click.option('--test', type=click.Path(path_type=Path), help='Labelled test folder.'),
        click.option(
            '--split',
            type=float,
            help='Share of each class used for training when --images is split (default 0.8).',
        ),
        click.option(
            '--seed',
            type=int,
            help='Seed of the split and of a random initialisation (default 0).',
        ),
        click.option(
            '--bands',
            type=BANDS,
            help="Image bands to feed, 1-based, in the encoder's order (e.g. 1,2,3); "
            'default all (with random:<backbone>: all bands of the images, which must agree).',
        ),
        click.option(
            '--size',
            type=POSITIVE,
            help="Image side in pixels; default the card's patch size (else 224).",
        ),
        click.option('--batch-size', type=POSITIVE, help='Images per forward pass (default 64).'),
        click.option('--workers', type=NON_NEGATIVE, help='Data-loading processes (default 0).'),
        click.option('--device', help="Torch device, e.g. 'cpu' or 'cuda'; default CUDA if any."),
        click.option('--verbose', is_flag=True, help='Also print the accuracy of each class.'),
        click.option(
            '--json', 'json_path', type=click.Path(path_type=Path), help='Write the result here.'
        ),
        click.option('--overwrite', is_flag=True, help='Replace an existing --json file.'),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _run(
    protocol: Literal['knn', 'linear'],
    json_path: Path | None,
    overwrite: bool,
    verbose: bool,
    **options: Any,
) -> None:
    """Evaluate, print the top-1 accuracy (and per-class accuracy), write the JSON."""
    from geocmid.evaluation.evaluate import evaluate, write_result
    from geocmid.io.atomic import check_writable

    check_output(json_path)
    if json_path is not None:
        check_writable(json_path, overwrite)  # fail before the features are computed
    given = {key: value for key, value in options.items() if value is not None}
    result = evaluate(protocol, given.pop('encoder'), given.pop('images', None), **given)
    label = {'knn': 'k-NN', 'linear': 'linear probe'}[protocol]
    click.echo(
        f'{label} top-1: {result.top1:.4f} ({result.num_test} test / {result.num_train} '
        f'train images, {len(result.classes)} classes)'
    )
    if verbose:
        for name, accuracy in result.per_class.items():
            shown = 'n/a (no test image)' if accuracy is None else f'{accuracy:.4f}'
            click.echo(f'  {name}: {shown}')
    if json_path is not None:
        click.echo(f'result: {write_result(result, json_path, overwrite=overwrite)}')


@click.group()
def evaluate() -> None:
    """Evaluate a frozen encoder on labelled image chips (k-NN or linear probe)."""


@evaluate.command()
@_common_options
@click.option('--k', type=POSITIVE, help='Neighbours that vote (default 20).')
@click.option(
    '--temperature',
    type=float,
    help='Vote weight is exp(cosine similarity / temperature) (default 0.07).',
)
def knn(**options: Any) -> None:
    """Weighted k-NN on frozen, average-pooled features (DINO's protocol).

    Every image is resized to the card's patch size and normalised as the card says (a random
    encoder: with the training images' band statistics).
    """
    _run('knn', **options)


@evaluate.command()
@_common_options
@click.option(
    '--l2',
    type=float,
    help='L2 penalty of the logistic regression on standardised features (default 0.001).',
)
def linear(**options: Any) -> None:
    """Linear probe: logistic regression (L-BFGS, L2) on frozen, average-pooled features."""
    _run('linear', **options)
