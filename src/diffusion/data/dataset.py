"""Map-style datasets of (image, tokens): the seed's API, for small in-memory data and quick experiments.

``from diffusion.data import create_dummy_dataset, TextImageDataset``. Items are
``(image (3, S, S) float32 in [-1, 1], tokens (T,) long)``. The pipeline's stages stream shards instead
(:mod:`diffusion.data.loader`); these classes serve tests, notebooks and the seed's ``train_diffusion_model``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tokenizers import Tokenizer

from diffusion.data.images import to_rgb
from diffusion.data.tokenizer import encode, train_tokenizer


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` (bicubic), then crop the centre square. Returns RGB.

    Any mode: 16-bit and float images are scaled to 8 bits and transparency is composited on white, as the
    shard stage does (:func:`diffusion.data.images.to_rgb`); Pillow's ``convert("RGB")`` would clip 16-bit
    values (most of the range white) and keep the colours hidden under transparent pixels."""
    image = to_rgb(image)
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3) in [0, 255]
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()  # (3, H, W)


class TextImageDataset(torch.utils.data.Dataset):
    """Base of map-style text-image datasets: subclasses give images and captions, this class the tensors.

    Subclasses implement ``__len__`` and ``get_image_caption(i) -> (image, caption)``, where the image is a
    PIL image (any mode, any size) or a (3, H, W) float tensor in [-1, 1]. ``dataset[i]`` returns
    ``(image (3, image_size, image_size) float32 in [-1, 1], tokens (T,) long)``.
    """

    def __init__(self, tokenizer: Tokenizer, image_size: int = 64):
        if image_size < 1:
            raise ValueError(f"image_size: expected >= 1, got {image_size}")
        self.tokenizer = tokenizer
        self.image_size = image_size

    def __len__(self) -> int:
        raise NotImplementedError

    def get_image_caption(self, i: int) -> tuple[Image.Image | torch.Tensor, str]:
        raise NotImplementedError

    def caption(self, i: int) -> str:
        return self.get_image_caption(i)[1]

    def _to_tensor(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return pil_to_tensor(resize_center_crop(image, self.image_size))
        x = image.float()
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"image tensor: expected shape (3, H, W), got {tuple(x.shape)}")
        h, w = x.shape[1:]
        if (h, w) != (self.image_size, self.image_size):
            side = min(h, w)  # centre-crop to a square, then resize
            top, left = (h - side) // 2, (w - side) // 2
            x = x[:, top : top + side, left : left + side]
            x = F.interpolate(x[None], size=self.image_size, mode="bilinear", antialias=True)[0]
        return x.clamp(-1.0, 1.0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)}")
        image, caption = self.get_image_caption(i % len(self))
        return self._to_tensor(image), encode(self.tokenizer, [caption])[0]  # (3, S, S), (T,)


class ListDataset(TextImageDataset):
    """A dataset from parallel lists of images (PIL or (3,H,W) tensors in [-1,1]) and captions."""

    def __init__(
        self,
        images: Sequence[Image.Image | torch.Tensor],
        captions: Sequence[str],
        tokenizer: Tokenizer,
        image_size: int = 64,
    ):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        super().__init__(tokenizer, image_size)
        self.images, self.captions = list(images), list(captions)

    def __len__(self) -> int:
        return len(self.images)

    def get_image_caption(self, i: int) -> tuple[Image.Image | torch.Tensor, str]:
        return self.images[i], self.captions[i]


# --------------------------------------------------------------------------------------------------
# The dummy dataset: one coloured shape per image, captioned with its colour, shape and place
# --------------------------------------------------------------------------------------------------

_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
_SHAPES = ("circle", "square", "triangle")
_PLACES = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
           "bottom right": (0.75, 0.75), "centre": (0.5, 0.5)}  # (x, y) as fractions of the side


def draw_shape(size: int, colour: str, shape: str, place: str) -> Image.Image:
    """A `size`-pixel image: a `colour` `shape` a quarter of the side wide at `place`, on light grey."""
    image = Image.new("RGB", (size, size), (235, 235, 235))
    cx, cy = (f * size for f in _PLACES[place])
    r = size / 8
    box = (cx - r, cy - r, cx + r, cy + r)
    draw, fill = ImageDraw.Draw(image), _COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image


def create_dummy_dataset(
    num_samples: int = 100, image_size: int = 64, seed: int = 0, tokenizer: Tokenizer | None = None
) -> ListDataset:
    """A small procedural dataset: "a red circle in the top left" and friends, seeded.

    Without a tokenizer, one is trained on these captions (vocabulary 128, 16 tokens per caption);
    it is reachable as ``dataset.tokenizer``.
    """
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(num_samples):
        colour, shape, place = rng.choice(list(_COLOURS)), rng.choice(_SHAPES), rng.choice(list(_PLACES))
        images.append(draw_shape(image_size, colour, shape, place))
        where = "in the centre" if place == "centre" else f"in the {place}"
        captions.append(f"a {colour} {shape} {where}")
    if tokenizer is None:
        tokenizer = train_tokenizer(captions, vocab_size=128, max_length=16)
    return ListDataset(images, captions, tokenizer, image_size)
