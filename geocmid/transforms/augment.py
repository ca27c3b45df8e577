"""CMID's two views of a patch, cut on the device, with the geometry of every crop recorded.

Each sampled patch (B, C, S, S), already normalised, yields two crops
(``docs/cmid.md#views-and-augmentations``):

* crop A: RandomResizedCrop (scale (0.3, 1), ratio (3/4, 4/3)) and a horizontal flip (p 0.5);
* crop B: an independent crop and flip, then the photometric set (colour jitter, blur, noise,
  solarisation, grayscale for RGB; brightness, contrast, blur and noise for other bands).

GeRSP's views need no geometry: :func:`moco_view` is one MoCo v1 view
(``docs/gersp.md#augmentation``).

Every crop is described by its box in patch pixels and its flip flag (:class:`CropGeometry`), so the
local branch can match tokens by where they really lie in the patch (geocmid's fix of the official
local matching, ``docs/cmid.md#deviations``; see :mod:`geocmid.models.matching`).

Coordinates are continuous pixel coordinates: pixel ``(i, j)`` of the patch covers
``[j, j + 1) x [i, i + 1)`` and its centre is ``(j + 0.5, i + 0.5)``. A box ``[x0, y0, x1, y1]``
covers ``[x0, x1) x [y0, y1)``, and output pixel ``j`` of a crop of size ``out`` samples source
``x = x0 + (j + 0.5) (x1 - x0) / out`` (``x1 - (j + 0.5) (x1 - x0) / out`` when flipped).

All random draws except the noise itself come from Kornia's parameter generators, which sample on
the CPU from the global generator: the crops are the same on CPU and CUDA for the same
``torch.manual_seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import kornia.augmentation as K
import torch
from kornia.augmentation import random_generator as rg
from kornia.geometry.transform import crop_and_resize
from torch import Tensor, nn

from geocmid.errors import InputError

__all__ = (
    'CropGeometry',
    'RandomGaussNoise',
    'TwoViewAugmentation',
    'View',
    'band_photometric',
    'crop_to_geometry',
    'moco_view',
    'rgb_photometric',
)

#: Variance range of albumentations' GaussNoise default, on the 0-255 scale of 8-bit imagery.
NOISE_VARIANCE = (10.0, 50.0)

#: The 8-bit full scale on which albumentations draws the noise variance.
UINT8_FULL_SCALE = 255.0


@dataclass(frozen=True)
class CropGeometry:
    """Where each crop of a batch was cut from its patch.

    Attributes:
        boxes: (B, 4) float boxes ``[x0, y0, x1, y1]`` in patch pixels, ``x1``/``y1`` exclusive.
        flipped: (B,) bool, True where the crop was flipped horizontally after cutting.
    """

    boxes: Tensor
    flipped: Tensor


@dataclass(frozen=True)
class View:
    """One augmented view of a batch.

    Attributes:
        image: (B, C, out, out) normalised crops.
        geometry: The crop boxes and flip flags the crops were cut with.
        valid: (B, out, out) bool mask of valid (not nodata) pixels, cut like the image, or None.
    """

    image: Tensor
    geometry: CropGeometry
    valid: Tensor | None = None


def crop_to_geometry(
    image: Tensor, geometry: CropGeometry, size: int, mode: str = 'bilinear'
) -> Tensor:
    """Cut, resize and flip every image of a batch in one batched warp.

    Args:
        image: (B, C, H, W) float batch.
        geometry: One box and flip flag per image.
        size: Side of the square output in pixels.
        mode: ``'bilinear'`` for images, ``'nearest'`` for masks.

    Returns:
        (B, C, size, size) crops; output pixel ``j`` samples the box at ``x0 + (j + 0.5) w / size``.
    """
    x0, y0, x1, y1 = geometry.boxes.to(image).unbind(-1)
    # crop_and_resize maps the given corner points onto the centres of the output's corner pixels
    # (pixel-index coordinates, align_corners=True). Moving the corners half an output pixel inward
    # from the box edges (and half a source pixel for the index origin) makes the outer edges of the
    # box land on the outer edges of the output, the geometry the matching relies on.
    half_x = (x1 - x0) / (2 * size)
    half_y = (y1 - y0) / (2 * size)
    left, right = x0 - 0.5 + half_x, x1 - 0.5 - half_x
    top, bottom = y0 - 0.5 + half_y, y1 - 0.5 - half_y
    flipped = geometry.flipped.to(image.device)
    # A flip is the same warp with the left and right corners swapped.
    left, right = torch.where(flipped, right, left), torch.where(flipped, left, right)
    corners = torch.stack(
        [
            torch.stack([left, top], dim=-1),
            torch.stack([right, top], dim=-1),
            torch.stack([right, bottom], dim=-1),
            torch.stack([left, bottom], dim=-1),
        ],
        dim=1,
    )
    # 'border' so that upsampled crops touching the patch edge repeat the edge pixel instead of
    # fading to zero over the last half pixel.
    return crop_and_resize(
        image, corners, (size, size), mode=mode, padding_mode='border', align_corners=True
    )


class RandomGaussNoise(K.IntensityAugmentationBase2D):
    """Gaussian noise whose variance is drawn per image, as albumentations' ``GaussNoise``.

    Kornia's ``RandomGaussianNoise`` has one fixed standard deviation and draws the full noise
    tensor on the CPU; this draws only the variance there and the noise on the input's device.
    """

    scale: Tensor  # buffer, (C or 1, 1, 1)

    def __init__(
        self,
        variance: tuple[float, float] = NOISE_VARIANCE,
        scale: float | Tensor = 1.0,
        clip_output: bool = False,
        p: float = 0.5,
    ) -> None:
        """Initialise the augmentation.

        Args:
            variance: Range of the noise variance, in units of the noise before ``scale``.
            scale: Factor from those units to the input's units, a float or one value per band.
            clip_output: Clamp the result into [0, 1], as integer images clip.
            p: Probability of adding noise to an image.
        """
        super().__init__(p=p)
        self._param_generator = rg.PlainUniformGenerator((variance, 'variance', None, None))
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1, 1)
        self.register_buffer('scale', scale, persistent=False)
        self.clip_output = clip_output

    def apply_transform(
        self,
        input: Tensor,
        params: dict[str, Tensor],
        flags: dict[str, Any],
        transform: Tensor | None = None,
    ) -> Tensor:
        """Add the noise to the images the probability gate selected."""
        sigma = params['variance'].to(input).sqrt().view(-1, 1, 1, 1)
        noisy = input + torch.randn_like(input) * sigma * self.scale.to(input)
        return noisy.clamp(0, 1) if self.clip_output else noisy


def rgb_photometric(mean: Tensor, std: Tensor) -> K.ImageSequential:
    """Crop B's photometric set for RGB (docs/cmid.md#views-and-augmentations), normalised.

    The official pipeline applies these operations to uint8 images, and hue, saturation,
    solarisation and clipping only make sense on a fixed [0, 1] range. The batch is therefore
    denormalised to [0, 1], augmented with the official constants, clipped after the noise as
    uint8 clips, and normalised again.

    Args:
        mean: (3,) normalisation mean on the [0, 1] scale (raw mean / full-scale value).
        std: (3,) normalisation standard deviation on the same scale.

    Returns:
        A Kornia pipeline mapping normalised (B, 3, H, W) to normalised (B, 3, H, W).
    """
    return K.ImageSequential(
        K.Denormalize(mean, std),
        # torchvision's jitter formulas, as albumentations'; the order of the four steps is drawn
        # once per batch here rather than once per image.
        K.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8),
        # Albumentations draws the kernel from 3, 5 or 7 as well as sigma; Kornia takes one kernel
        # size, and the largest keeps the Gaussian untruncated so that sigma alone sets the blur.
        K.RandomGaussianBlur((7, 7), sigma=(0.1, 2.0), p=1.0),
        RandomGaussNoise(scale=1 / UINT8_FULL_SCALE, clip_output=True, p=0.6),
        # thresholds=0 draws exactly 0.5, the [0, 1] equivalent of the uint8 threshold 128.
        K.RandomSolarize(thresholds=0.0, additions=0.0, p=0.2),
        K.RandomGrayscale(p=0.2),
        K.Normalize(mean, std),
    )


def band_photometric(std: Tensor) -> K.ImageSequential:
    """Crop B's photometric set for bands that are not RGB, applied in normalised space.

    Hue, saturation, grayscale and solarisation are skipped: they mix bands or assume an RGB
    range. Brightness and contrast become affine changes of the normalised values, with no clipping
    because normalised values have no fixed range: brightness shifts every band by the same number
    of its standard deviations (+-0.4), contrast scales every band about its dataset mean
    (0.6 to 1.4). Blur is linear and acts per band. The noise variance is the official one on the
    0-255 scale, converted to each band's normalised units.

    Args:
        std: (C,) normalisation standard deviation on the [0, 1] scale (raw std / full-scale value).

    Returns:
        A Kornia pipeline mapping normalised (B, C, H, W) to normalised (B, C, H, W).
    """
    return K.ImageSequential(
        K.RandomBrightness((0.6, 1.4), clip_output=False, p=0.8),
        K.RandomContrast((0.6, 1.4), clip_output=False, p=0.8),
        K.RandomGaussianBlur((7, 7), sigma=(0.1, 2.0), p=1.0),
        RandomGaussNoise(scale=1 / (UINT8_FULL_SCALE * std), p=0.6),
    )


class TwoViewAugmentation(nn.Module):
    """CMID's crops A and B of a normalised batch, with each crop's geometry.

    Runs on the device after the batch transfer. Crop A is cut and flipped only; crop B is cut and
    flipped independently, then photometrically augmented (:func:`rgb_photometric` or
    :func:`band_photometric`). Deterministic under ``torch.manual_seed``.
    """

    def __init__(
        self,
        out_size: int,
        mean: Sequence[float] | Tensor,
        std: Sequence[float] | Tensor,
        *,
        max_value: float = 255.0,
        rgb: bool = False,
        scale: tuple[float, float] = (0.3, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
    ) -> None:
        """Initialise the augmentation.

        Args:
            out_size: Side of both crops in pixels.
            mean: Per-band mean the batch was normalised with, in raw data units.
            std: Per-band standard deviation the batch was normalised with, in raw data units.
            max_value: Raw value of full scale (255 for 8-bit imagery), which relates the official
                uint8 constants (noise variance, solarisation threshold) to the data.
            rgb: Whether the three bands are red, green and blue, which enables hue, saturation,
                grayscale and solarisation.
            scale: Range of the crop area as a fraction of the patch area.
            ratio: Range of the crop aspect ratio (width / height).
            flip_p: Probability of a horizontal flip, per crop.

        Raises:
            InputError: If the statistics are inconsistent or ``rgb`` is set for other than 3 bands.
        """
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() != std.numel():
            raise InputError('band statistics', f'{mean.numel()} means but {std.numel()} stds')
        if not bool((std > 0).all()):
            raise InputError('band statistics', f'every std must be positive, got {std.tolist()}')
        if max_value <= 0:
            raise InputError('max_value', f'must be positive, got {max_value}')
        if rgb and mean.numel() != 3:
            raise InputError('rgb', f'needs exactly 3 bands, got {mean.numel()}')
        if out_size < 1:
            raise InputError('out_size', f'must be positive, got {out_size}')
        self.out_size = out_size
        self.num_bands = mean.numel()
        self.flip_p = flip_p
        # Used only for its parameter generator: the crop itself is done by crop_to_geometry,
        # whose sampling convention the recorded boxes describe exactly.
        self.crop = K.RandomResizedCrop((out_size, out_size), scale=scale, ratio=ratio)
        if rgb:
            self.photometric = rgb_photometric(mean / max_value, std / max_value)
        else:
            self.photometric = band_photometric(std / max_value)

    def sample_geometry(self, batch_size: int, height: int, width: int) -> CropGeometry:
        """Draw a crop box and a flip flag for every patch of a batch.

        Args:
            batch_size: Number of patches.
            height: Patch height in pixels.
            width: Patch width in pixels.

        Returns:
            The geometry on the CPU.
        """
        params = self.crop.forward_parameters(torch.Size((batch_size, 1, height, width)))
        # Kornia's box corners are inclusive pixel indices: the top-left corner is the first
        # pixel, the bottom-right one the last pixel, hence + 1 for the exclusive far edge.
        corners = params['src']
        boxes = torch.cat([corners[:, 0], corners[:, 2] + 1], dim=-1)
        flipped = torch.rand(batch_size) < self.flip_p
        return CropGeometry(boxes=boxes, flipped=flipped)

    def cut(self, image: Tensor, valid: Tensor | None = None) -> View:
        """Cut one randomly placed, possibly flipped crop from every patch, without colour change.

        Args:
            image: (B, C, H, W) normalised batch.
            valid: (B, H, W) bool mask of valid pixels, or None.

        Returns:
            The crops, their geometry (on the image's device) and the cut mask.
        """
        batch_size, _, height, width = image.shape
        cpu_geometry = self.sample_geometry(batch_size, height, width)
        geometry = CropGeometry(
            boxes=cpu_geometry.boxes.to(image.device),
            flipped=cpu_geometry.flipped.to(image.device),
        )
        crop = crop_to_geometry(image, geometry, self.out_size)
        if valid is not None:
            mask = valid[:, None].to(image.dtype)
            valid = crop_to_geometry(mask, geometry, self.out_size, 'nearest')[:, 0] > 0.5
        return View(image=crop, geometry=geometry, valid=valid)

    def forward(self, image: Tensor, valid: Tensor | None = None) -> tuple[View, View]:
        """Produce crops A and B of a batch.

        Args:
            image: (B, C, S, S) normalised float batch.
            valid: (B, S, S) bool mask of valid pixels, or None.

        Returns:
            Crop A (geometric only) and crop B (geometric and photometric).

        Raises:
            ValueError: If the batch does not have the bands the statistics describe.
        """
        if image.ndim != 4 or image.shape[1] != self.num_bands:
            raise ValueError(
                f'expected a (B, {self.num_bands}, H, W) batch, got {tuple(image.shape)}'
            )
        if valid is not None and valid.shape != (image.shape[0], *image.shape[2:]):
            raise ValueError(f'valid mask {tuple(valid.shape)} does not match {tuple(image.shape)}')
        view_a = self.cut(image, valid)
        view_b = self.cut(image, valid)
        return view_a, replace(view_b, image=self.photometric(view_b.image))


def moco_view(
    size: int,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
    *,
    max_value: float = 255.0,
    rgb: bool = False,
    scale: tuple[float, float] = (0.2, 1.0),
) -> K.ImageSequential:
    """One MoCo v1 view of a normalised batch (docs/gersp.md#augmentation).

    In MoCo v1 order: RandomResizedCrop to ``size`` (area ``scale``), then for RGB grayscale
    (p 0.2) and colour jitter (brightness, contrast, saturation and hue 0.4, always applied), then
    a horizontal flip. As in :func:`rgb_photometric`, RGB is jittered on the [0, 1] scale and
    normalised again. Other bands get no hue, saturation or grayscale, which mix bands; brightness
    and contrast (0.4) become the affine changes of :func:`band_photometric`, always applied.

    Args:
        size: Side of the square output in pixels.
        mean: Per-band mean the batch was normalised with, in raw data units.
        std: Per-band standard deviation the batch was normalised with, in raw data units.
        max_value: Raw value of full scale, which maps raw units to [0, 1] for RGB.
        rgb: Whether the three bands are red, green and blue.
        scale: Range of the crop area as a fraction of the input area.

    Returns:
        A Kornia pipeline mapping normalised (B, C, H, W) to normalised (B, C, size, size).

    Raises:
        InputError: If ``rgb`` is set for other than 3 bands.
    """
    mean = torch.as_tensor(mean, dtype=torch.float32).flatten() / max_value
    std = torch.as_tensor(std, dtype=torch.float32).flatten() / max_value
    if rgb and mean.numel() != 3:
        raise InputError('rgb', f'needs exactly 3 bands, got {mean.numel()}')
    photometric: list[nn.Module]
    if rgb:
        photometric = [
            K.Denormalize(mean, std),
            K.RandomGrayscale(p=0.2),
            K.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4, p=1.0),
            K.Normalize(mean, std),
        ]
    else:
        photometric = [
            K.RandomBrightness((0.6, 1.4), clip_output=False, p=1.0),
            K.RandomContrast((0.6, 1.4), clip_output=False, p=1.0),
        ]
    return K.ImageSequential(
        K.RandomResizedCrop((size, size), scale=scale), *photometric, K.RandomHorizontalFlip()
    )


def fine_tuning_augmentations(
    mean: Tensor, std: Tensor, *, rotate: bool
) -> tuple[K.AugmentationSequential, K.AugmentationSequential]:
    """The pipelines of a fine-tuning data module: ``(aug, train_aug)``.

    Both normalise; training also flips at random and, with ``rotate``, turns by multiples of
    90 degrees. Masks in the batch follow the geometric steps.

    Args:
        mean: Per-channel mean in raw pixel units.
        std: Per-channel standard deviation.
        rotate: Add random 90-degree rotations to training.
    """
    normalize = K.Normalize(mean=mean, std=std)
    aug = K.AugmentationSequential(normalize, data_keys=None, keepdim=True)
    geometric = [K.RandomHorizontalFlip(), K.RandomVerticalFlip()]
    if rotate:
        geometric.append(K.RandomRotation90(times=(0, 3)))
    train_aug = K.AugmentationSequential(normalize, *geometric, data_keys=None, keepdim=True)
    return aug, train_aug
