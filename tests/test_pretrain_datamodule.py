"""PretrainDataModule's raster batches: native on the host, cast and validity on the device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from geocmid.datamodules.pretrain import PretrainDataModule
from geocmid.datasets.geo_raster import GeoRasterDataset
from geocmid.samplers.valid_patch import ValidPatchSampler


def test_raster_batches_are_cast_and_masked_on_the_device(
    make_geotiff: Callable[..., Path], tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(1, 256, (4, 96, 96), dtype=np.uint8)
    data[:, :40, :40] = 0  # every 64 px patch overlaps this nodata block ...
    data[2, 60:62, 60:62] = 0  # ... and these pixels, invalid through one band only
    make_geotiff('rasters/a.tif', data, nodata=0)
    module = PretrainDataModule(
        rasters=tmp_path / 'rasters', patch_size=64, batch_size=4, samples_per_epoch=4
    )
    assert module.sentinel == 0
    module.setup('fit')
    batch = next(iter(module.train_dataloader()))
    assert batch['image'].dtype == torch.uint8 and 'valid' not in batch

    # The same patches read as float32 with the mask computed on the host.
    reference = GeoRasterDataset(tmp_path / 'rasters')
    queries = list(ValidPatchSampler(reference, size=64, length=4, seed=0))
    image = torch.stack([reference[query]['image'] for query in queries])
    valid = torch.stack([reference[query]['valid'] for query in queries])
    assert not valid.all() and bool((valid.float().mean(dim=(1, 2)) >= 0.5).all())

    out = module.on_after_batch_transfer(batch, 0)
    assert torch.equal(out['valid'], valid)
    assert out['image'].dtype == torch.float32
    mean, std = module.mean[None, :, None, None], module.std[None, :, None, None]
    expected = torch.where(valid[:, None], (image - mean) / std, 0.0)
    torch.testing.assert_close(out['image'], expected)
