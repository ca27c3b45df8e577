"""Which bands of a scene feed a model: one rule for segmentation and change detection."""

from __future__ import annotations

from collections.abc import Sequence

from geocmid.errors import InputError
from geocmid.io.cards import ModelCard
from geocmid.raster.files import BandSelection, PathLike, check_bands


def model_bands(
    scene: PathLike, count: int, descriptions: Sequence[str | None], card: ModelCard,
    bands: BandSelection | None = None,
) -> tuple[int, ...]:  # fmt: skip
    """The scene bands fed to the model, in its channel order.

    Without ``bands``, a model trained on all bands of its rasters (band indices ``1..N``)
    needs a scene of exactly N bands, so that a scene of another sensor is not silently read
    band by band as if it matched; a model trained on a band subset needs those bands. ``bands``
    picks the scene's bands explicitly (e.g. the RGB bands of an RGBN scene for an RGB model).

    Args:
        scene: the scene, for messages.
        count: its number of bands.
        descriptions: its band descriptions (to select bands by name).
        card: the model card.
        bands: 1-based indexes or names of the scene bands; default the card's band indices.

    Raises:
        InputError: the scene lacks bands or has a different number of bands than the model
            takes, or ``bands`` selects a different number.
    """
    takes = f'the model takes {card.in_chans} ({", ".join(card.bands)})'
    if bands is not None:
        selected = check_bands(scene, count, bands, descriptions)
        if len(selected) != card.in_chans:
            raise InputError('--bands', f'{len(selected)} band(s) selected but {takes}')
        return selected
    indices = tuple(card.band_indices)
    if indices == tuple(range(1, len(indices) + 1)):  # trained on all bands
        if count != card.in_chans:
            raise InputError(scene, f'has {count} band(s) but {takes}; pick them with --bands')
    elif max(indices) > count:
        listed = ', '.join(map(str, indices))
        raise InputError(scene, f'has {count} band(s) but {takes}: band(s) {listed}')
    return indices
