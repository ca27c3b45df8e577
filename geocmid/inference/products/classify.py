"""Scene classification of a folder of chips with a classification run's model, to a CSV table."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from geocmid.datasets.chips import ChipFolder, select_bands
from geocmid.inference.features import extract_features
from geocmid.inference.onnx_model import load_model
from geocmid.inference.tta import check_tta, with_tta
from geocmid.io.atomic import atomic_output, check_writable
from geocmid.types import PathLike


def classify_folder(
    model_dir: PathLike,
    images: PathLike,
    output: PathLike | None = None,
    *,
    batch_size: int = 32,
    workers: int = 0,
    device: torch.device | str = 'auto',
    overwrite: bool = False,
    tta: str = 'none',
    bands: Sequence[int | str] | None = None,
    classes: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Predict the class of every chip in a folder (searched recursively).

    Args:
        model_dir: A classification run folder, or its ``.onnx`` export (``geocmid export``).
        images: The chips; they need the bands the card's ``band_indices`` name.
        output: CSV file to write; None only returns the table.
        batch_size: Chips per forward pass.
        workers: Data-loading worker processes.
        device: Where the model runs; ``'auto'`` picks CUDA when available.
        overwrite: Replace an existing ``output``.
        tta: Test-time augmentation: 'none', 'flips' or 'd4' (:mod:`geocmid.inference.tta`).
        bands: Only for a ``.onnx`` file without model card: the chip bands it takes.
        classes: Only for a ``.onnx`` file without model card: its class names.

    Returns:
        One row per chip, in sorted path order: ``path`` (relative to ``images``), ``class``
        (the predicted name), ``probability`` (its softmax probability), then the probability
        of every class in columns named ``p_<class>``.

    Raises:
        InputError: A bad run folder, an unreadable chip, mixed band counts, chips lacking
            the model's bands, an unknown device, or an existing ``output`` without
            ``overwrite``.
    """
    check_tta(tta)
    if output is not None:
        check_writable(output, overwrite)
    loaded = load_model(model_dir, 'classification', bands=bands, classes=classes)
    model, card = with_tta(loaded.network, tta), loaded.card
    assert card.classes is not None
    chips = ChipFolder(images, size=card.patch_size)
    select_bands(chips, card.band_indices)
    # A card-less ONNX file states no normalisation: its chips go in unchanged.
    mean = card.mean if card.mean is not None else [0.0] * len(card.band_indices)
    std = card.std if card.std is not None else [1.0] * len(card.band_indices)
    logits = extract_features(
        model, chips, mean, std, batch_size=batch_size, workers=workers, device=device
    )
    probabilities = logits.double().softmax(dim=1)
    best, index = probabilities.max(dim=1)
    names = [c.name for c in card.classes]
    table = pd.DataFrame(
        {
            'path': [path.relative_to(chips.root).as_posix() for path in chips.files],
            'class': [names[i] for i in index.tolist()],
            'probability': best.tolist(),
            **{f'p_{name}': probabilities[:, i].tolist() for i, name in enumerate(names)},
        }
    )
    if output is not None:
        with atomic_output(output, overwrite=overwrite) as tmp:
            table.to_csv(tmp, index=False, float_format='%.6f')
    return table
