"""Training-time image transforms of BLIP's recipe, in PIL + torch (torchvision is not a dependency).

BLIP's training transform is, in order: random resized crop to the model's
size (scale (0.2, 1) in pre-training, (0.5, 1) in fine-tuning; aspect ratio
(3/4, 4/3); bicubic), horizontal flip with p 0.5, RandAugment (2 ops,
magnitude 5, over the op list below, each chosen op applied with p 0.5), then
scaling to [0, 1] and normalising with the OpenAI CLIP mean/std.

Written here from those descriptions, not from torchvision's code:
- the crop follows torchvision's ``RandomResizedCrop`` algorithm (10 tries
  at a random area and log-uniform ratio, else a centre crop);
- RandAugment's magnitude m (0..10) maps to: brightness/sharpness factor
  1 +/- 0.9 m/10, shear +/- 0.3 m/10, translation +/- 0.45 m/10 of the side,
  rotation +/- 30 m/10 degrees (RandAugment paper ranges); geometric ops fill
  with grey (128).

Before all of these, capfilt (not BLIP) can change an image's rendering
details (``jitter_rendering``, ``AugmentConfig.render_jitter``: scale and
shift, blur, colour curve, JPEG re-encoding), for synthetic worlds such as
the demo models' shapes world.

Every random choice comes from the ``numpy.random.Generator`` passed in, so
a sample's augmentation depends only on its seed: the same on any rank and
after a resume.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from capfilt.models.config import AugmentConfig

FILL = (128, 128, 128)
RANDAUGMENT_OPS = ("identity", "autocontrast", "equalize", "brightness", "sharpness",
                   "shear_x", "shear_y", "translate_x", "translate_y", "rotate")  # BLIP's list
MAX_MAGNITUDE = 10


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator, min_scale: float,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """A random crop of ``min_scale``..1 of the area and ``ratio`` aspect, resized (bicubic) to ``size``."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            break
    else:  # centre crop at the nearest allowed aspect ratio
        aspect = width / height
        if aspect < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif aspect > ratio[1]:
            w, h = round(height * ratio[1]), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))


def _signed(rng: np.random.Generator, value: float) -> float:
    return value if rng.random() < 0.5 else -value


def apply_op(image: Image.Image, op: str, magnitude: int, rng: np.random.Generator) -> Image.Image:
    """One RandAugment op at ``magnitude`` (0..10)."""
    level = magnitude / MAX_MAGNITUDE
    width, height = image.size
    if op == "identity":
        return image
    if op == "autocontrast":
        return ImageOps.autocontrast(image)
    if op == "equalize":
        return ImageOps.equalize(image)
    if op == "brightness":
        return ImageEnhance.Brightness(image).enhance(1 + _signed(rng, 0.9 * level))
    if op == "sharpness":
        return ImageEnhance.Sharpness(image).enhance(1 + _signed(rng, 0.9 * level))
    if op == "shear_x":
        return image.transform(image.size, Image.AFFINE, (1, _signed(rng, 0.3 * level), 0, 0, 1, 0),
                               Image.BICUBIC, fillcolor=FILL)
    if op == "shear_y":
        return image.transform(image.size, Image.AFFINE, (1, 0, 0, _signed(rng, 0.3 * level), 1, 0),
                               Image.BICUBIC, fillcolor=FILL)
    if op == "translate_x":
        return image.transform(image.size, Image.AFFINE, (1, 0, _signed(rng, 0.45 * level) * width, 0, 1, 0),
                               fillcolor=FILL)
    if op == "translate_y":
        return image.transform(image.size, Image.AFFINE, (1, 0, 0, 0, 1, _signed(rng, 0.45 * level) * height),
                               fillcolor=FILL)
    if op == "rotate":
        return image.rotate(_signed(rng, 30 * level), Image.BICUBIC, fillcolor=FILL)
    raise ValueError(f"unknown RandAugment op {op!r}; choose from {RANDAUGMENT_OPS}")


def _border_colour(image: Image.Image) -> tuple[int, ...]:
    """The median colour of the image's outermost pixels: the background, where objects leave it."""
    pixels = np.asarray(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def jitter_rendering(image: Image.Image, rng: np.random.Generator, each: float = 0.5) -> Image.Image:
    """The image as another renderer might have drawn it; each change applied with p ``each`` (``render_jitter``,
    ``render_jitter_each``).

    Size: scaled by 0.94..1.06 about the centre and moved by up to 0.75 px
    (bilinear; the uncovered border takes the background's colour). Edges:
    Gaussian blur of radius 0.2..1 px. Colour: a gamma curve of 0.85..1.15,
    then per channel a gain of 0.95..1.05 and an offset of up to ±6.
    Compression: JPEG re-encoded at quality 60..95, chroma 4:4:4, 4:2:2 or
    4:2:0. Small enough that every word of a caption stays true.
    """
    if rng.random() < each:
        scale = rng.uniform(0.94, 1.06)
        dx, dy = rng.uniform(-0.75, 0.75, size=2)
        cx, cy = image.width / 2, image.height / 2
        # Output pixel (x, y) reads input ((x - cx) / scale + cx - dx, (y - cy) / scale + cy - dy).
        coefficients = (1 / scale, 0, cx - cx / scale - dx, 0, 1 / scale, cy - cy / scale - dy)
        image = image.transform(image.size, Image.AFFINE, coefficients, Image.BILINEAR,
                                fillcolor=_border_colour(image))
    if rng.random() < each:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.0)))
    if rng.random() < each:
        pixels = 255.0 * (np.asarray(image, dtype=np.float64) / 255.0) ** rng.uniform(0.85, 1.15)
        pixels = pixels * rng.uniform(0.95, 1.05, size=3) + rng.uniform(-6, 6, size=3)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if rng.random() < each:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(60, 96)), subsampling=int(rng.integers(0, 3)))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def rand_augment(image: Image.Image, rng: np.random.Generator, num_ops: int, magnitude: int) -> Image.Image:
    """``num_ops`` ops drawn with replacement from BLIP's list, each applied with p 0.5."""
    for op in rng.choice(RANDAUGMENT_OPS, size=num_ops):
        if rng.random() < 0.5:
            image = apply_op(image, str(op), magnitude, rng)
    return image


_MEAN = np.array(OPENAI_CLIP_MEAN, dtype=np.float32).reshape(1, 1, 1, 3)
_STD = np.array(OPENAI_CLIP_STD, dtype=np.float32).reshape(1, 1, 1, 3)


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """uint8 RGB ``[N, H, W, 3]`` -> ``[N, 3, H, W]`` float, scaled to [0, 1] and CLIP-normalised."""
    scaled = pixels.astype(np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(((scaled - _MEAN) / _STD).transpose(0, 3, 1, 2)))


def to_normalised_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``[3, H, W]`` float, scaled to [0, 1] and CLIP-normalised."""
    return normalise(np.asarray(image.convert("RGB"))[None])[0]


def augmented_image(image: Image.Image, size: int, config: AugmentConfig, rng: np.random.Generator | None
                    ) -> Image.Image:
    """BLIP's training augmentation (or, with ``augment=False``, its square resize), before normalisation; first,
    with ``render_jitter``, the rendering changes of ``jitter_rendering``."""
    image = image.convert("RGB")
    if config.render_jitter and rng.random() < config.render_jitter:
        image = jitter_rendering(image, rng, config.render_jitter_each)
    if not config.augment:
        return image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)
    image = random_resized_crop(image, size, rng, config.crop_min_scale)
    if config.hflip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if config.randaugment:
        image = rand_augment(image, rng, config.randaugment_ops, config.randaugment_magnitude)
    return image


def transform(image: Image.Image, size: int, config: AugmentConfig, rng: np.random.Generator | None) -> torch.Tensor:
    """BLIP's training transform: ``augmented_image`` as a normalised ``[3, size, size]`` tensor."""
    return to_normalised_tensor(augmented_image(image, size, config, rng))
