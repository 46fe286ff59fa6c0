"""The input images of image-to-image sampling (SDEdit, Meng et al. 2022) and the masks of inpainting: read and
checked before any model is loaded, then resized to the sampling size and turned into what the sampler takes
(:func:`init_latents`, :func:`latent_masks`).

The policy, stated once (``TextToImagePipeline.generate(image=...)`` and ``cli.py sample --image`` follow it):

- An image is a PIL image or the path of a file Pillow reads; a list holds one for every prompt or one per prompt.
- A file's EXIF orientation is applied (``ImageOps.exif_transpose``, as diffusers' ``load_image``): a photo
  comes the way a viewer shows it. 16-bit images (PNG's I;16) are scaled to 8 bits, not clipped to white.
- It is converted to RGB with ``Image.convert("RGB")``: an alpha channel is dropped, not composited on a
  background, so transparent pixels show whatever colour they hold.
- It is resized to the sampling size (H, W) (the ``image_size`` option, else the training resolution) with
  Lanczos filtering, without cropping: an image of another aspect ratio is stretched, as diffusers'
  ``VaeImageProcessor`` does with its default ``resize_mode`` when given a height and a width. Crop it first to
  keep its proportions.
- A mask (``mask_image=``, ``--mask``) is read the same way, converted to grayscale with ``Image.convert("L")``,
  resized as an image is (Lanczos), then thresholded: levels >= 128 (white) are regenerated, the rest kept, as
  diffusers' inpainting ``mask_processor`` does (``do_binarize`` at 0.5). It is then reduced to the latent grid
  by ``inpainting.latent_mask``: a latent cell with any white pixel in it is regenerated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffusion.model_spec import SampleOptionError


def _is_image(value: Any) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def _read_one(value: Any, option: str, mode: str) -> Any:
    """A PIL image or a path -> a PIL image in `mode` ("RGB", "L"), fully decoded (a truncated file fails here, not
    mid-sampling). Raises SampleOptionError(`option`)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if _is_image(value):  # one opened from a file may still carry its EXIF orientation
        return _to_mode(ImageOps.exif_transpose(value), mode)
    if not isinstance(value, (str, os.PathLike)):
        raise SampleOptionError(option, f"expected a PIL image or the path of an image file, got {_what(value)}")
    path = Path(value)
    if not path.is_file():
        raise SampleOptionError(option, f"{path}: no such file" + (" (a folder)" if path.is_dir() else ""))
    try:
        with Image.open(path) as im:
            im.load()
            return _to_mode(ImageOps.exif_transpose(im), mode)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:  # not an image, truncated
        raise SampleOptionError(option, f"{path}: cannot read it as an image ({e})") from None


def _to_mode(im: Any, mode: str) -> Any:
    """`im` in `mode`. Pillow's convert clips 16- and 32-bit integer images ("I;16", "I") to 0..255, so nearly every
    pixel of a 16-bit PNG would be white: those are scaled to 8 bits first."""
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I"):
        levels = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or levels.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(np.round(levels * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    return im.convert(mode)


def _what(value: Any) -> str:
    """A short description of `value` for an error message (an array is described, not printed)."""
    shape = getattr(value, "shape", None)
    return f"a {type(value).__name__} of shape {tuple(shape)}" if shape is not None else repr(value)[:80]


def _read_list(value: Any, num_prompts: int, option: str, mode: str) -> list[Any]:
    """A PIL image, a path, or a list of 1 or `num_prompts` of them -> a list of PIL images in `mode`."""
    if _is_image(value) or isinstance(value, (str, os.PathLike)):
        return [_read_one(value, option, mode)]
    if isinstance(value, (bytes, bytearray)):  # a Sequence too: "a list of 122" would be the message
        raise SampleOptionError(option, f"expected a PIL image or a path, got {len(value)} bytes (a file's contents?): "
                                        "open them first, PIL.Image.open(io.BytesIO(data))")
    if not isinstance(value, Sequence) or len(value) not in {1, max(num_prompts, 1)}:
        what = f"a list of {len(value)}" if isinstance(value, Sequence) else _what(value)
        lists = "a list of 1" if num_prompts <= 1 else f"a list of 1 or {num_prompts} of them (one for every prompt, " \
                                                       "or one per prompt)"
        raise SampleOptionError(option, f"expected a PIL image, a path, or {lists}, got {what}")
    return [_read_one(v, option, mode) for v in value]


def read_images(image: Any, num_prompts: int) -> list[Any]:
    """`image` (a PIL image, a path, or a list of 1 or `num_prompts` of them) -> a list of RGB PIL images.
    Raises SampleOptionError("image") naming the file that cannot be read, or a list of the wrong length."""
    return _read_list(image, num_prompts, "image", "RGB")


def read_masks(mask_image: Any, num_prompts: int) -> list[Any]:
    """`mask_image` (as `image` in :func:`read_images`) -> a list of grayscale ("L") PIL images.
    Raises SampleOptionError("mask_image") naming the file that cannot be read, or a list of the wrong length."""
    return _read_list(mask_image, num_prompts, "mask_image", "L")


def to_model_input(images: Sequence[Any], size: tuple[int, int]) -> Any:
    """RGB PIL images -> (K, 3, H, W) float32 tensor in [-1, 1] (the VAE's input range), each resized to `size`
    (H, W) with Lanczos filtering where it differs (the module docstring's policy)."""
    import numpy as np
    import torch
    from PIL import Image

    H, W = size
    arrays = [np.asarray(im if im.size == (W, H) else im.resize((W, H), Image.Resampling.LANCZOS)) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()  # (K, H, W, 3) -> (K, 3, H, W)
    return x / 127.5 - 1.0  # [0, 255] -> [-1, 1]


def to_pixel_mask(masks: Sequence[Any], size: tuple[int, int]) -> Any:
    """Grayscale ("L") PIL masks -> (K, 1, H, W) float32 tensor of 0s and 1s (1: regenerate, levels >= 128), each
    resized to `size` (H, W) with Lanczos filtering where it differs, then thresholded (the module docstring)."""
    import numpy as np
    import torch
    from PIL import Image

    H, W = size
    arrays = [np.asarray(m if m.size == (W, H) else m.resize((W, H), Image.Resampling.LANCZOS)) for m in masks]
    white = torch.from_numpy(np.stack(arrays) >= 128)  # (K, H, W) bool: 128 of 255 is diffusers' 0.5
    return white[:, None].float()  # (K, 1, H, W)


def init_latents(model: Any, images: Sequence[Any], num_prompts: int, n: int, size: tuple[int, int]) -> Any:
    """Image to image's starting latents: (N, C, h, w), N = num_prompts * n, prompt-major as the tokens, from
    1 image for every prompt or one per prompt (RGB PIL, :func:`read_images`), resized to `size`, encoded by
    `model` (a LatentDiffusionModel).

    Each of the K images given is encoded once (not once per sampled image: :func:`per_image` repeats its latent),
    alone, with the posterior mean: no draw from the generator (so its draws are text to image's: at strength 1
    with a zero-terminal-SNR schedule the images are text to image's), and the same latent whatever the batch or
    the other images."""
    import torch

    x = to_model_input(images, size).to(model.device)  # (K, 3, H, W) in [-1, 1]
    with torch.no_grad():
        latents = torch.cat([model.encode_images(x[k : k + 1], sample=False) for k in range(len(x))])
    return per_image(latents, num_prompts, n)  # (N, C, h, w)


def latent_masks(model: Any, masks: Sequence[Any], num_prompts: int, n: int, size: tuple[int, int]) -> Any:
    """Inpainting's latent masks: (N, 1, h, w) 0/1, prompt-major as the tokens, from 1 mask for every prompt or
    one per prompt (grayscale PIL, :func:`read_masks`): thresholded at the sampling `size`, then a latent cell
    of `model`'s VAE is regenerated where any of its pixels is (``inpainting.latent_mask``)."""
    from diffusion.inpainting import latent_mask

    pixels = to_pixel_mask(masks, size).to(model.device)  # (K, 1, H, W)
    return per_image(latent_mask(pixels, model.vae.downsample_factor), num_prompts, n)  # (N, 1, h, w)


def mask_warnings(masks: Sequence[Any], size: tuple[int, int]) -> list[str]:
    """Warnings for inpainting masks (grayscale PIL, :func:`read_masks`) at the sampling `size` (H, W): one with
    no white pixel regenerates nothing (a mask drawn the wrong way round returns the image)."""
    empty = [i for i, m in enumerate(to_pixel_mask(masks, size), 1) if not bool(m.any())]
    if not empty:
        return []
    which = "the mask" if len(masks) == 1 else "mask " + ", ".join(map(str, empty))
    return [(f"{which} has no white pixel (>= 128 of 255) at {size[1]}x{size[0]}, so nothing of its image is "
             "regenerated (white marks what to repaint, black what to keep)")]


def per_image(per_input: Any, num_prompts: int, n: int) -> Any:
    """(K, ...) values of 1 input for every prompt or one per prompt -> (N, ...), N = num_prompts * n, prompt-major
    as the tokens (the prompt of image j is j // n)."""
    import torch

    which = torch.arange(num_prompts * n, device=per_input.device) // n  # the prompt of each of the N images
    return per_input[which if len(per_input) > 1 else torch.zeros_like(which)]
