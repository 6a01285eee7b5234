"""Data for VICRegL: the multi-crop augmentation (the reference code's recipe, paper §3.2-3.3), the
built-in ToyShapes data set, image folders, and epoch-seeded data loaders.

Every dataset item is `(transform(img), label, unreadable)`. With MultiCropTransform, transform(img)
is `(views, boxes, flips)`, so after default collation a pretraining batch unpacks as
`(views, boxes, flips), labels, unreadable = batch`: views a list of (B, 3, S, S), boxes (B, V, 4),
flips (B, V), labels (B,), unreadable (B,) bool.
"""

import collections
import functools
import math
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# Multi-crop augmentation, as the recipe reads: the reference code's (paper §3.3: VICReg's
# implementation [Bardes et al., 2022]; §3.2: the multi-crop of [Caron et al., 2020]), composed from
# torchvision's transforms on PIL images. MultiCropTransform(simple=True) runs exactly this; its
# default runs the same augmentation on tensors (next section).

CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio range (width / height) of RandomResizedCrop
FLIP_PROB = 0.5
JITTER_PROB = 0.8  # ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
JITTER_RANGES = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
GRAYSCALE_PROB = 0.2
BLUR_SIGMA = (0.1, 2.0)


class PILGaussianBlur:
    """PIL's ImageFilter.GaussianBlur, the reference's blur (PIL's radius is the standard deviation),
    sigma uniform in `sigma_range` as torchvision's GaussianBlur draws it. (torchvision's GaussianBlur
    itself is another filter: a truncated kernel convolved with a tensor copy of the image.)"""

    def __init__(self, sigma_range):
        self.sigma_range = sigma_range

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(transforms.GaussianBlur.get_params(*self.sigma_range)))


def recipe_view_colour(blur_prob, solarize_prob, blur_sigma, hue):
    """The colour augmentation and normalisation of one view: PIL image -> (3, S, S) float32."""
    return transforms.Compose([
        transforms.RandomApply([transforms.ColorJitter(**dict(JITTER_RANGES, hue=(-hue, hue)))], p=JITTER_PROB),
        transforms.RandomGrayscale(p=GRAYSCALE_PROB),
        transforms.RandomApply([PILGaussianBlur(blur_sigma)], p=blur_prob),
        transforms.RandomSolarize(threshold=128, p=solarize_prob),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class MultiCropTransform:
    """VICRegL multi-crop: num_crops[i] views of size_crops[i] pixels each, from a RandomResizedCrop
    (bicubic) with area fraction in [min_scale_crops[i], max_scale_crops[i]], large views first. Each
    view: flip p = 0.5, colour jitter p = 0.8, grayscale p = 0.2, Gaussian blur, solarization, ImageNet
    normalisation.

    Blur p = 1.0 on the first view of each size and every other one after it, p = 0.1 on the others,
    which also get solarization with p = 0.2: with j the view's index within its size group, even j ->
    blur p = 1.0, no solarization; odd j -> blur p = 0.1, solarization p = 0.2. Default 2x224 + 6x96:
    views 0 and 2, 4, 6 are always blurred.

    blur_sigma (the blur's sigma range, pixels) and hue (the jitter's hue range, [-hue, hue]) are the
    recipe's (0.1, 2.0) and 0.1 by default; the toy recipe scales the blur to its views and widens the
    hue range (docs/toy.md).

    simple=True: the recipe as torchvision composes it (recipe_views; random draws from torch's
    generator). simple=False: the same augmentation on tensors (tensor_views; random draws from Python's
    `random`), about 2.5x the images per loading worker. make_loader seeds both generators in every worker.

    __call__(img: PIL) -> (views, boxes, flips): views a list of V (3, S, S) float32 tensors,
    boxes (V, 4) float32 (top, left, height, width) in input-image pixels (exactly the region each
    view shows), flips (V,) bool (view mirrored left-right).
    """

    def __init__(self, size_crops=(224, 96), num_crops=(2, 6), min_scale_crops=(0.4, 0.08),
                 max_scale_crops=(1.0, 0.4), blur_sigma=BLUR_SIGMA, hue=JITTER_RANGES["hue"][1], simple=False):
        if not len(size_crops) == len(num_crops) == len(min_scale_crops) == len(max_scale_crops):
            raise ValueError("size_crops, num_crops, min_scale_crops and max_scale_crops must have the same length")
        if list(size_crops) != sorted(size_crops, reverse=True):
            raise ValueError(f"size_crops must list the large views first (decreasing sizes), got {list(size_crops)}")
        if not 0 <= blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur sigma range must satisfy 0 <= min <= max, got {tuple(blur_sigma)}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {hue}")
        self.blur_sigma, self.hue, self.simple = tuple(blur_sigma), hue, simple
        # One (size, scale range, blur prob, solarize prob) per view, large views first.
        self.view_specs = []
        for size, count, min_scale, max_scale in zip(size_crops, num_crops, min_scale_crops, max_scale_crops):
            if not 0 < min_scale <= max_scale <= 1:
                raise ValueError(f"crop scales must satisfy 0 < min <= max <= 1, got ({min_scale}, {max_scale})")
            for j in range(count):
                blur_prob, solarize_prob = (1.0, 0.0) if j % 2 == 0 else (0.1, 0.2)
                self.view_specs.append((size, (min_scale, max_scale), blur_prob, solarize_prob))
        self.recipe_colours = [recipe_view_colour(blur_prob, solarize_prob, self.blur_sigma, hue)
                               for _, _, blur_prob, solarize_prob in self.view_specs]

    def __call__(self, img):
        if img.mode != "RGB":
            img = img.convert("RGB")
        # One thread: the operations on a view are too small to be worth splitting. A DataLoader worker
        # runs one thread anyway; in the main process (num_workers=0) the split costs more than it
        # saves, and stalls whenever other processes hold the cores.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self.simple:
                views, boxes, flips = self.recipe_views(img)
            else:
                views, boxes, flips = tensor_views(img, self.view_specs, self.blur_sigma, self.hue)
        finally:
            torch.set_num_threads(threads)
        return views, torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips, dtype=torch.bool)

    def recipe_views(self, img):
        """The views as torchvision composes the recipe: RandomResizedCrop's own sampler and resized_crop,
        which give the box (the location grids need it), and a flip drawn as RandomHorizontalFlip's."""
        views, boxes, flips = [], [], []
        for (size, scale, _, _), colour in zip(self.view_specs, self.recipe_colours):
            box = transforms.RandomResizedCrop.get_params(img, scale, CROP_RATIO)  # (top, left, height, width)
            view = TF.resized_crop(img, *box, [size, size], transforms.InterpolationMode.BICUBIC)
            flip = torch.rand(1).item() < FLIP_PROB
            views.append(colour(TF.hflip(view) if flip else view))
            boxes.append(box)
            flips.append(flip)
        return views, boxes, flips


# -----------------------------------------------------------------------------
# The same augmentation on tensors, MultiCropTransform's default: about 2.5x the images per loading worker of
# the recipe above (tests/benchmark.py --only transform; docs/speed.md). Each view is cut
# out of the decoded image and resized by torch's uint8 kernel; PIL's colour formulas are re-derived on
# float tensors. The random parameters come from Python's `random` (scalar draws ~20x cheaper than
# torch's). tests/test_data.py holds both paths to the same distributions of boxes, flips and colour
# operations, and each operation to PIL's values.

def sample_crop_box(height, width, scale, ratio=CROP_RATIO):
    """(top, left, crop_height, crop_width) of a random crop, integer pixels, drawn like
    torchvision's RandomResizedCrop.get_params: area fraction uniform in `scale`, aspect ratio
    (width / height) log-uniform in `ratio`, up to 10 tries to fit the image, else a centre crop of
    the whole image clamped to the ratio range."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = random.randint(0, height - crop_height)
            left = random.randint(0, width - crop_width)
            return top, left, crop_height, crop_width
    # Fallback: the largest centred crop whose aspect ratio lies in the range.
    if width / height < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        crop_width, crop_height = round(height * ratio[1]), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def crop_resize(pixels, box, size, flip):
    """The view of the image `pixels` (1, 3, H, W) uint8 showing exactly `box` = (top, left, height,
    width), made as torchvision's RandomResizedCrop makes it from a PIL image: the box cut out, then
    resized to size x size with antialiased bicubic interpolation (PIL's filter; torch's uint8 kernel,
    vectorised over channels-last memory, gives PIL's values within one level), mirrored left-right if
    `flip`. Returns (3, S, S) float32 pixel values in [0, 255]."""
    top, left, height, width = box
    view = torch.nn.functional.interpolate(pixels[:, :, top:top + height, left:left + width], size=(size, size),
                                           mode="bicubic", antialias=True)  # (1, 3, S, S) uint8
    if flip:
        view = view.flip(-1)
    return view[0].to(torch.float32, memory_format=torch.contiguous_format)


# Colour parameters of one view: jitter = ((op name, factor), ...) in the order they are applied
# (empty when the jitter is skipped), grayscale bool, blur_sigma float or None, solarize bool.
ColorParams = collections.namedtuple("ColorParams", "jitter grayscale blur_sigma solarize")


def draw_color_params(blur_prob, solarize_prob, blur_sigma=BLUR_SIGMA, hue=JITTER_RANGES["hue"][1]):
    """Random colour parameters of one view, with torchvision's semantics: ColorJitter applied with
    p = 0.8, its four factors uniform in their ranges (hue in [-hue, hue]) and applied in a random order;
    grayscale p = 0.2; Gaussian blur with p = blur_prob, sigma uniform in blur_sigma (the recipe's
    [0.1, 2]); solarization p = solarize_prob."""
    jitter = ()
    if random.random() < JITTER_PROB:
        ranges = dict(JITTER_RANGES, hue=(-hue, hue))
        jitter = [(name, random.uniform(*bounds)) for name, bounds in ranges.items()]
        random.shuffle(jitter)
    grayscale = random.random() < GRAYSCALE_PROB
    blur_sigma = random.uniform(*blur_sigma) if random.random() < blur_prob else None
    solarize = random.random() < solarize_prob
    return ColorParams(tuple(jitter), grayscale, blur_sigma, solarize)


# The colour operations act on a view's (C, S, S) float32 pixel values in [0, 255] with the formulas
# of torchvision's functions on PIL images (the reference's), each result clamped to [0, 255] as PIL
# does, but not rounded to 8 bits after every step: a result differs from PIL's by that rounding, about
# one level (PIL truncates its blends), more only where a hue falls on the edge of one of PIL's 256 hue
# steps (tests/test_data.py bounds each operation).
LUMA_WEIGHTS = torch.tensor([[0.299, 0.587, 0.114]])  # ITU-R 601-2 luma, as PIL's convert("L")


def luma(x):
    """(3, S, S) -> (1, S, S) grey levels."""
    return (LUMA_WEIGHTS @ x.flatten(1)).view(1, *x.shape[1:])


def adjust_brightness(x, factor):
    return x.mul_(factor).clamp_(0, 255)  # blend with black


def adjust_contrast(x, factor):
    mean = luma(x).mean()
    return x.mul_(factor).add_(mean * (1 - factor)).clamp_(0, 255)  # blend with the mean grey level


def adjust_saturation(x, factor):
    gray = luma(x)
    return x.mul_(factor).add_(gray.mul_(1 - factor)).clamp_(0, 255)  # blend with the grey image


# In sixths of a turn: cyan, magenta and yellow, the hues opposite R, G and B
HUE_OPPOSITES = torch.tensor([3.0, 5.0, 1.0]).view(3, 1, 1)


def adjust_hue(x, factor):
    """Turn the hue of HSV by `factor` turns, saturation and value kept. PIL stores the hue in 8 bits
    (int(255 * hue) for a hue in [0, 1) turns) and adds int(255 * factor) modulo 256; so do we, which
    keeps the result within about one level of PIL's (a few where a hue falls on the edge of a step)."""
    r, g, b = x
    value = x.amax(0)  # (S, S): V = max, and V * saturation = max - min = chroma
    chroma = value - x.amin(0)
    divisor = chroma.clamp(min=1e-6)  # grey pixels: any hue, the result is V
    # hue in sixths of a turn, in (-1, 6): the largest channel picks the sector (R, then G, then B)
    sixths = (r - g).div_(divisor).add_(4)
    torch.where(value == g, (b - r).div_(divisor).add_(2), sixths, out=sixths)
    torch.where(value == r, (g - b).div_(divisor), sixths, out=sixths)
    steps = sixths.div_(6).add_(1).frac_().mul_(255).floor_().to(torch.uint8)  # PIL's 8-bit hue
    hue = (steps + math.trunc(255 * factor) % 256).float().mul_(6 / 255)  # the uint8 sum wraps; sixths in [0, 6]
    # HSV -> RGB: a channel is V within one sixth of a turn from its own hue (R 0, G 2, B 4), V - chroma
    # from two sixths on, linear between; the distance round the circle to its own hue is
    # ||hue - opposite| - 3|. `drop`: how far below V each channel is, in chromas.
    drop = (hue - HUE_OPPOSITES).abs_().sub_(3).abs_().sub_(1).clamp_(0, 1)  # (3, S, S)
    return torch.addcmul(value, chroma, drop, value=-1)


ADJUST = {"brightness": adjust_brightness, "contrast": adjust_contrast,
          "saturation": adjust_saturation, "hue": adjust_hue}


@functools.lru_cache(maxsize=64)
def box_pass_cube_terms(n, size):
    """An extended box pass of radius n + a (gaussian_blur, below) over S pixels is the (S, S) matrix
    B = (W + a E) / (2 (n + a) + 1): W adds the 2n + 1 whole taps, E the two fractional ones, the edge
    pixels repeated beyond the border. Its cube, three passes, is a polynomial in a:
    B^3 = (T0 + a T1 + a^2 T2 + a^3 T3) / (2 (n + a) + 1)^3. Returns T0..T3 as (4, S * S), computed once
    per (n, S) (a view's sigma is random, but n and S take few values), so that a view's B^3 costs one
    small product instead of two (S, S) matrix products."""
    taps = (torch.arange(size)[:, None] + torch.arange(-n - 1, n + 2)).clamp_(0, size - 1)  # (S, 2n + 3)
    W = torch.zeros(size, size, dtype=torch.float64).scatter_add_(
        1, taps[:, 1:-1], torch.ones(size, 2 * n + 1, dtype=torch.float64))
    E = torch.zeros(size, size, dtype=torch.float64).scatter_add_(
        1, taps[:, [0, -1]], torch.ones(size, 2, dtype=torch.float64))
    terms = [W @ W @ W, E @ W @ W + W @ E @ W + W @ W @ E, E @ E @ W + E @ W @ E + W @ E @ E, E @ E @ E]
    return torch.stack(terms).view(4, -1).float()


def banded_matmul(matrix, x, reach):
    """matrix @ x for an (S, S) matrix whose entries vanish more than `reach` places from the diagonal,
    x (..., S, N): each block of output rows needs only the rows of x within `reach` of it."""
    block = 32  # rows: skips most of the zeros (reach <= 6 here), still an efficient product
    out = torch.empty(*x.shape[:-2], matrix.shape[0], x.shape[-1])
    for start in range(0, matrix.shape[0], block):
        stop = start + block
        low, high = max(start - reach, 0), stop + reach
        out[..., start:stop, :] = matrix[start:stop, low:high] @ x[..., low:high, :]
    return out


def gaussian_blur(x, sigma):
    """PIL's ImageFilter.GaussianBlur (the reference's; its radius is the standard deviation) of a
    (C, S, S) view: three passes of an extended box filter (Gwosdek et al. 2011, as PIL's BoxBlur.c)
    along each axis, whose radius n + a (n whole, a in [0, 1)) gives the three passes the variance
    sigma^2; each pass repeats the edge pixels beyond the border. As matrices: one pass is an (S, S)
    band matrix B, the blur is B^3 x (B^3)^T, the same values as PIL's within its rounding (PIL rounds
    after each of its six 1-D passes)."""
    size = x.shape[-1]
    variance = sigma ** 2 / 3  # per pass
    n = math.floor((math.sqrt(12 * variance + 1) - 1) / 2)
    a = (2 * n + 1) * (n * (n + 1) - 3 * variance) / (6 * (variance - (n + 1) ** 2))
    powers_of_a = torch.tensor([[1, a, a * a, a ** 3]]) / (2 * (n + a) + 1) ** 3
    three_passes = (powers_of_a @ box_pass_cube_terms(n, size)).view(size, size)  # B^3, band of reach 3(n + 1)
    if size <= 128:  # small views: two whole products are quicker than the band's blocks
        return three_passes @ x @ three_passes.T
    reach = 3 * (n + 1)
    return banded_matmul(three_passes, banded_matmul(three_passes, x, reach).mT, reach).mT


def solarize(x):
    return torch.minimum(x, 255 - x)  # values >= 128 inverted: on whole numbers, min(v, 255 - v)


def apply_color(x, params):
    """Apply ColorParams to a (3, S, S) float view of pixel values (in place where it can). A grayscale
    result keeps one channel, (1, S, S) (normalize makes the three equal channels), which keeps blur
    and solarize 3x cheaper."""
    for name, factor in params.jitter:
        x = ADJUST[name](x, factor)
    if params.grayscale:
        x = luma(x)
    if params.blur_sigma is not None:
        x = gaussian_blur(x, params.blur_sigma)
    if params.solarize:
        x = solarize(x)
    return x


PIXEL_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
PIXEL_INV_STD = 1 / (torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255)


def normalize(x):
    """(1 or 3, S, S) pixel values in [0, 255] (any dtype and memory layout) -> contiguous (3, S, S)
    float32, (v / 255 - mean) / std per channel (ImageNet)."""
    out = torch.empty(3, *x.shape[1:])
    return torch.sub(x, PIXEL_MEAN, out=out).mul_(PIXEL_INV_STD)


def to_normalized_tensor(img):
    """PIL RGB or L image -> (3, S, S) float32, normalised as `normalize`."""
    pixels = torch.from_numpy(np.array(img)).view(img.size[1], img.size[0], -1)  # (S, S, 1 or 3) uint8
    return normalize(pixels.permute(2, 0, 1))


def tensor_views(img, view_specs, blur_sigma, hue):
    """The views of MultiCropTransform(simple=False) of a PIL RGB image: lists of V views (3, S, S),
    boxes (top, left, height, width) and flips."""
    width, height = img.size
    # (1, 3, H, W) uint8 in channels-last memory (PIL's layout), which torch's resampling vectorises
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0)
    views, boxes, flips = [], [], []
    for size, scale, blur_prob, solarize_prob in view_specs:
        box = sample_crop_box(height, width, scale)
        flip = random.random() < FLIP_PROB
        params = draw_color_params(blur_prob, solarize_prob, blur_sigma, hue)
        view = apply_color(crop_resize(pixels, box, size, flip), params)
        views.append(normalize(view))
        boxes.append(box)
        flips.append(flip)
    return views, boxes, flips


# -----------------------------------------------------------------------------
# Evaluation transforms (paper, appendix: linear evaluation): no colour augmentation.

def linear_train_transform(size=224):
    # bilinear, as the reference evaluation (pretraining views are bicubic)
    return transforms.Compose([
        transforms.RandomResizedCrop(size, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def linear_val_transform(resize=256, size=224):
    return transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# -----------------------------------------------------------------------------
# ToyShapes: procedurally generated images (no download) for the quickstart, the classroom, the tests
# and the evaluation scripts, designed so that self-supervised learning shows within minutes of CPU.
#
# The class of an object is its texture: one of four patterns (horizontal stripes, vertical stripes,
# checks, dots) at one of two coarseness bands (period 6-8 % or 16-22 % of the image side). That is what
# the augmentations keep: a crop, a horizontal flip, a colour jitter, grayscale or the (view-size scaled)
# blur of horizontal stripes still shows horizontal stripes, and the crops' zoom (0.7-1.4x) does not
# bridge the factor of two between the bands. Everything the augmentations randomise varies freely
# instead: the two colours of every object, the background colour and its gradient, the position, size
# and outline of the objects, the exact period and phase of their texture. Features of a random network
# are dominated by these nuisances (colour first), so a kNN on them is near chance; learning to ignore
# them is what self-supervision has to do. Orientation is part of the class (up to 8 degrees of
# jitter): the augmentations never rotate.
#
# Image i of a split shows three objects on a plain background (a colour gradient with grain): two
# smaller ones of two other classes (radius 14-20 % of the side, maybe cut by the border or partly
# hidden), then the main one of class label(i) = i mod 8 (radius 30-38 %, whole), which always covers
# the most pixels. The image label is the main object's class. The mask is exact: c + 1 where the
# last object painted on a pixel has class c, 0 on the background.

# (resize, crop) of the evaluation transforms on toy images: ImageNet's 256/224 at the toy recipe's 48-px views
TOY_EVAL_SIZES = (55, 48)


def _hstripes(u, v, period):
    return np.mod(v / period, 1) < 0.5


def _vstripes(u, v, period):
    return np.mod(u / period, 1) < 0.5


def _checks(u, v, period):
    return (np.mod(u / period, 1) < 0.5) ^ (np.mod(v / period, 1) < 0.5)


def _dots(u, v, period):
    # discs of radius 0.3 period on a square lattice
    return np.hypot(np.mod(u / period, 1) - 0.5, np.mod(v / period, 1) - 0.5) < 0.3


class ToyShapes(Dataset):
    PATTERNS = {"hstripes": _hstripes, "vstripes": _vstripes, "checks": _checks, "dots": _dots}
    PERIODS = {"fine": (0.06, 0.08), "coarse": (0.16, 0.22)}  # texture period, in image sides
    # class c: pattern c mod 4 at coarseness c // 4
    classes = ("fine_hstripes", "fine_vstripes", "fine_checks", "fine_dots",
               "coarse_hstripes", "coarse_vstripes", "coarse_checks", "coarse_dots")
    NUM_CLASSES = len(classes)
    SPLITS = {"train": (0, 4000), "val": (1, 1000)}  # split -> (id entering the seed, default size)
    MAIN_RADIUS, OTHER_RADIUS = (0.30, 0.38), (0.14, 0.20)  # object radii, in image sides
    MAX_TILT = 8.0  # degrees of orientation jitter of the textures

    def __init__(self, split="train", num_images=None, image_size=64, seed=0, transform=None):
        if split not in self.SPLITS:
            raise ValueError(f"unknown ToyShapes split {split!r} (expected one of {sorted(self.SPLITS)})")
        if image_size < 16:
            raise ValueError(f"ToyShapes image_size must be at least 16, got {image_size}")
        self.split_id, default_size = self.SPLITS[split]
        self.num_images = default_size if num_images is None else num_images
        self.image_size = image_size
        self.seed = seed
        self.transform = transform

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        img = self.image(index)
        return (self.transform(img) if self.transform else img), self.label(index), False

    def label(self, index):
        return index % self.NUM_CLASSES

    def image(self, index):
        return Image.fromarray(self.render(index)[0])

    def mask(self, index):
        return self.render(index)[1]

    def render(self, index):
        """(image (S, S, 3) uint8, mask (S, S) uint8), a pure function of (seed, split, index)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"ToyShapes index {index} out of range [0, {self.num_images})")
        rng = np.random.default_rng((self.seed, self.split_id, index))
        size = self.image_size
        # background: a linear gradient between two close colours (S, S, 3)
        rows, cols = np.mgrid[:size, :size] / size
        direction = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(direction) * cols + np.sin(direction) * rows)[..., None]  # (S, S, 1), in [-1.4, 1.4]
        image = rng.random(3) + rng.uniform(-0.1, 0.1, 3) * ramp
        mask = np.zeros((size, size), np.uint8)
        label = self.label(index)
        others = rng.choice([c for c in range(self.NUM_CLASSES) if c != label], size=2, replace=False)
        for cls, radius_range, whole in ((others[0], self.OTHER_RADIUS, False),
                                         (others[1], self.OTHER_RADIUS, False), (label, self.MAIN_RADIUS, True)):
            self._paint(rng, image, mask, cls, size * rng.uniform(*radius_range), whole)
        image += rng.uniform(-0.03, 0.03, (size, size, 1))  # grain
        return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), mask

    def _paint(self, rng, image, mask, cls, radius, whole):
        """Paint one textured object of class `cls` into image and mask (in place): a blob of mean radius
        `radius` pixels (a circle with two random harmonics of its outline), centred so that it lies
        inside the image if `whole`, else anywhere its centre stays in the image."""
        size = self.image_size
        reach = 1.2 * radius  # farthest outline point: harmonics of amplitude <= 0.1 each
        low, high = (reach, size - reach) if whole else (0, size)
        center_row, center_col = rng.uniform(low, high, 2)
        top, left = max(0, int(center_row - reach)), max(0, int(center_col - reach))
        bottom, right = min(size, int(center_row + reach) + 1), min(size, int(center_col + reach) + 1)
        rows = (np.arange(top, bottom) + 0.5 - center_row)[:, None]  # pixel centres relative to the object's
        cols = (np.arange(left, right) + 0.5 - center_col)[None, :]
        angle = np.deg2rad(rng.uniform(-self.MAX_TILT, self.MAX_TILT))  # the texture's small tilt
        u = np.cos(angle) * cols + np.sin(angle) * rows  # (h, w) texture-frame coordinates, pixels
        v = -np.sin(angle) * cols + np.cos(angle) * rows
        theta, rho = np.arctan2(v, u), np.hypot(u, v)
        a2, a3, p2, p3 = *rng.uniform(0, 0.1, 2), *rng.uniform(0, 2 * np.pi, 2)
        inside = rho <= radius * (1 + a2 * np.sin(2 * theta + p2) + a3 * np.sin(3 * theta + p3))  # (h, w)
        band, pattern = divmod(int(cls), len(self.PATTERNS))
        period = size * rng.uniform(*list(self.PERIODS.values())[band])
        phase_u, phase_v = rng.uniform(0, period, 2)  # where the pattern starts, free
        pattern = list(self.PATTERNS.values())[pattern](u + phase_u, v + phase_v, period)  # (h, w) bool
        # two random colours at least 0.4 apart (RGB in [0, 1]), so that the texture is always visible
        for _ in range(10):
            colors = rng.random((2, 3))
            if np.linalg.norm(colors[0] - colors[1]) >= 0.4:
                break
        region = image[top:bottom, left:right]
        region[inside] = np.where(pattern[..., None], colors[1], colors[0])[inside]
        mask[top:bottom, left:right][inside] = cls + 1


# -----------------------------------------------------------------------------
# Image folders (ImageNet layout: root/<class>/<image>).

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFiles(Dataset):
    """ImageFolder-style listing: class sub-folders of `root` (sorted) -> indices 0..K-1, their image
    files (searched recursively, sorted). An image that cannot be opened or decoded is reported once
    per process on stderr and replaced by the next readable index; that item is flagged
    unreadable=True (the training loop stops when > 1 % of seen images were unreadable)."""

    def __init__(self, root, transform=None):
        if not os.path.isdir(root):
            raise ValueError(f"data folder not found: {root}")
        self.root = root
        self.transform = transform
        self.classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        if not self.classes:
            raise ValueError(f"no class sub-folders under {root} (expected {root}/<class>/<image files>)")
        self.samples = []  # (path, class index)
        for label, name in enumerate(self.classes):
            for folder, subfolders, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                subfolders.sort()
                self.samples += [(os.path.join(folder, file), label) for file in sorted(files)
                                 if file.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.samples:
            raise ValueError(f"no images found under {root}")
        self.reported = set()  # unreadable paths already reported by this process

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as file:
                    img = file.convert("RGB")  # forces the full decode, so errors surface here
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                if path not in self.reported:
                    self.reported.add(path)
                    print(f"warning: unreadable image skipped: {path} ({type(error).__name__}: {error})",
                          file=sys.stderr, flush=True)
                continue
            return (self.transform(img) if self.transform else img), label, offset > 0
        raise ValueError(f"no readable images under {self.root}")


PRETRAIN_DATASETS = ("imagenet", "toy")


def build_pretrain_dataset(dataset, data_dir, transform, toy_images=None):
    """Pretraining data: dataset "toy" -> ToyShapes train split of toy_images images (None: the split's
    default, 4000; data_dir unused); "imagenet" -> ImageFiles over data_dir/train (any ImageFolder-style
    tree)."""
    if dataset == "toy":
        return ToyShapes("train", num_images=toy_images, transform=transform)
    if dataset != "imagenet":
        raise ValueError(f"unknown dataset {dataset!r} (expected one of {', '.join(PRETRAIN_DATASETS)})")
    if not os.path.isdir(data_dir):
        raise ValueError(f"data folder not found: {data_dir}")
    train_dir = os.path.join(data_dir, "train")
    if not os.path.isdir(train_dir):
        raise ValueError(f"data folder not found: {train_dir} (expected {data_dir}/train/<class>/<image files>)")
    return ImageFiles(train_dir, transform)


# -----------------------------------------------------------------------------
# Loaders, rebuilt every epoch so that an epoch replays identically from (seed, epoch), and the
# evaluation scripts' shards and batches of cached features.

def derive_seed(*keys):
    """A 32-bit seed mixing integer keys (SeedSequence hashing: nearby keys give unrelated seeds)."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def seed_process(seed, epoch, rank, worker_id):
    """Seed the torch, random and numpy generators of a loading process from (seed, epoch, rank, worker)."""
    process_seed = derive_seed(seed, epoch, rank, worker_id)
    torch.manual_seed(process_seed)
    random.seed(process_seed)
    np.random.seed(process_seed)


def epoch_order(num_items, seed, epoch, rank, world_size, shuffle=True, drop_last=True):
    """This process's items for one epoch: one permutation of (seed, epoch) whatever the number of processes
    W, process r taking its items r, r + W, ... (cut, or wrapped around, to a multiple of W so that every
    process takes as many steps). The W batches of a step together hold the items of the 1-process batch
    of W times their size; in one process it is the permutation itself."""
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(derive_seed(seed, epoch))) \
        if shuffle else torch.arange(num_items)
    if drop_last:
        order = order[:num_items - num_items % world_size]
    else:
        order = torch.cat([order, order[:-num_items % world_size]])  # as many items for every process
    return order[rank::world_size].tolist()


def make_loader(dataset, batch_size, num_workers, epoch, seed=0, shuffle=True, drop_last=True, pin_memory=False):
    """DataLoader for one epoch (batch_size per process), in the order of epoch_order (the processes of
    torch.distributed, if initialised, share one permutation). Each worker seeds torch/random/numpy from
    (seed, epoch, rank, worker id); with num_workers=0 the main process plays worker 0: its generators are
    seeded here. pin_memory: batches in page-locked memory, for asynchronous copies to a GPU (only for a
    process that uses CUDA)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    sampler = epoch_order(len(dataset), seed, epoch, rank, world_size, shuffle, drop_last)
    if num_workers == 0:
        seed_process(seed, epoch, rank, 0)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory, drop_last=drop_last, persistent_workers=False,
        worker_init_fn=functools.partial(seed_process, seed, epoch, rank),
        # Only feeds DataLoader's own base seed, which worker_init_fn overrides; seeded so that
        # building a loader never consumes the global torch generator.
        generator=torch.Generator().manual_seed(derive_seed(seed, epoch, rank)),
    )


def shard(dataset, rank, world_size):
    """Items rank, rank + W, rank + 2W, ... : the ranks' shards partition the dataset exactly
    (no padding, unlike DistributedSampler), so sums over ranks are exact dataset totals."""
    return Subset(dataset, range(rank, len(dataset), world_size)) if world_size > 1 else dataset


def cached_batches(num_items, batch_size, epoch, seed, rank, world_size):
    """Index batches of one epoch over cached features: a permutation seeded from (seed, epoch),
    split over ranks; the incomplete last global batch is dropped (as make_loader does)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    order = torch.randperm(num_items, generator=generator)
    global_batch = batch_size * world_size
    for start in range(0, num_items - global_batch + 1, global_batch):
        yield order[start + rank * batch_size: start + (rank + 1) * batch_size]


# -----------------------------------------------------------------------------
# Segmentation data sets (eval_seg.py), in their usual on-disk layouts. Items are
# `transform(img, mask)` = (image (3, H, W) float, label (H, W) long); labels are class indices
# 0..K-1 and 255 = ignored. Raw label values are mapped to those by a 256-entry lookup table.

IGNORE_LABEL = 255
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
# Cityscapes labelIds of the 19 evaluated classes, in trainId order (all other ids are ignored)
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
ADE20K_NUM_CLASSES = 150


def label_table(pairs):
    """uint8 lookup table (256,): raw value -> class index for the (raw, index) pairs, 255 elsewhere."""
    table = np.full(256, IGNORE_LABEL, np.uint8)
    for raw, index in pairs:
        table[raw] = index
    return table


VOC_TABLE = label_table((k, k) for k in range(len(VOC_CLASSES)))  # 0..20 kept, 255 (borders) ignored
ADE20K_TABLE = label_table((k, k - 1) for k in range(1, ADE20K_NUM_CLASSES + 1))  # 0 "other" -> 255
CITYSCAPES_TABLE = label_table((raw, k) for k, raw in enumerate(CITYSCAPES_LABEL_IDS))


class SegmentationFiles(Dataset):
    """(image file, label file) pairs; a label PNG is read as its raw values (palette indices for
    VOC's colour PNGs) and mapped through `table`."""

    def __init__(self, pairs, classes, table, transform=None):
        if not pairs:
            raise ValueError("no images found for this segmentation split")
        self.pairs, self.classes, self.table, self.transform = pairs, classes, table, transform

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image_path, label_path = self.pairs[index]
        with Image.open(image_path) as file:
            img = file.convert("RGB")
        with Image.open(label_path) as file:
            mask = Image.fromarray(self.table[np.array(file)])  # (H, W) uint8 "L"
        return self.transform(img, mask) if self.transform else (img, mask)


def _require_dir(path, expected):
    if not os.path.isdir(path):
        raise ValueError(f"data folder not found: {path} (expected {expected})")
    return path


def _read_ids(path):
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def voc_segmentation(root, split, transform=None):
    """Pascal VOC 2012 under root/VOCdevkit/VOC2012 (or root = VOCdevkit or VOC2012). val: the ids of
    ImageSets/Segmentation/val.txt with SegmentationClass. train: with SegmentationClassAug present
    (the 10,582-image "aug" set), the ids of ImageSets/SegmentationAug/train_aug.txt, else of
    ImageSets/Segmentation/aug.txt, else every PNG of SegmentationClassAug, minus the val ids, with
    their SegmentationClassAug labels; without it, ImageSets/Segmentation/train.txt."""
    candidates = [os.path.join(root, "VOCdevkit", "VOC2012"), os.path.join(root, "VOC2012"), root]
    voc = next((path for path in candidates if os.path.isdir(os.path.join(path, "JPEGImages"))), None)
    if voc is None:
        raise ValueError(f"data folder not found: {candidates[0]} (expected VOCdevkit/VOC2012/JPEGImages, ...)")
    lists = _require_dir(os.path.join(voc, "ImageSets", "Segmentation"), "ImageSets/Segmentation/{train,val}.txt")
    val_ids = _read_ids(os.path.join(lists, "val.txt"))
    aug = os.path.join(voc, "SegmentationClassAug")
    if split == "val":
        ids, label_dir = val_ids, os.path.join(voc, "SegmentationClass")
    elif os.path.isdir(aug):
        aug_lists = [os.path.join(voc, "ImageSets", "SegmentationAug", "train_aug.txt"), os.path.join(lists, "aug.txt")]
        listed = next((path for path in aug_lists if os.path.isfile(path)), None)
        ids = _read_ids(listed) if listed else sorted(name[:-4] for name in os.listdir(aug) if name.endswith(".png"))
        excluded = set(val_ids)
        ids, label_dir = [i for i in ids if i not in excluded], aug
    else:
        ids, label_dir = _read_ids(os.path.join(lists, "train.txt")), os.path.join(voc, "SegmentationClass")
    pairs = [(os.path.join(voc, "JPEGImages", i + ".jpg"), os.path.join(label_dir, i + ".png")) for i in ids]
    return SegmentationFiles(pairs, VOC_CLASSES, VOC_TABLE, transform)


def ade20k_segmentation(root, split, transform=None):
    """ADE20k (SceneParsing) under root/ADEChallengeData2016 (or root itself):
    images/{training,validation}/*.jpg with annotations/.../*.png; label 0 ("other") -> 255, k -> k-1."""
    base = os.path.join(root, "ADEChallengeData2016")
    base = base if os.path.isdir(base) else root
    folder = {"train": "training", "val": "validation"}[split]
    images = _require_dir(os.path.join(base, "images", folder), f"ADEChallengeData2016/images/{folder}/*.jpg")
    labels = _require_dir(os.path.join(base, "annotations", folder), f"ADEChallengeData2016/annotations/{folder}/*.png")
    stems = sorted(name[:-4] for name in os.listdir(images) if name.endswith(".jpg"))
    pairs = [(os.path.join(images, s + ".jpg"), os.path.join(labels, s + ".png")) for s in stems]
    classes = tuple(f"class_{k}" for k in range(ADE20K_NUM_CLASSES))
    return SegmentationFiles(pairs, classes, ADE20K_TABLE, transform)


def cityscapes_segmentation(root, split, transform=None):
    """Cityscapes: root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png with
    root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png; labelIds -> the 19 trainIds, others 255."""
    images = _require_dir(os.path.join(root, "leftImg8bit", split), f"leftImg8bit/{split}/<city>/*_leftImg8bit.png")
    labels = _require_dir(os.path.join(root, "gtFine", split), f"gtFine/{split}/<city>/*_gtFine_labelIds.png")
    pairs = []
    for city in sorted(os.listdir(images)):
        for name in sorted(os.listdir(os.path.join(images, city))):
            if name.endswith("_leftImg8bit.png"):
                stem = name[: -len("_leftImg8bit.png")]
                pairs.append((os.path.join(images, city, name),
                              os.path.join(labels, city, stem + "_gtFine_labelIds.png")))
    return SegmentationFiles(pairs, CITYSCAPES_CLASSES, CITYSCAPES_TABLE, transform)


class ToySegmentation(Dataset):
    """ToyShapes images with their masks: 0 = background, c + 1 = object of class c (9 classes)."""

    classes = ("background",) + ToyShapes.classes

    def __init__(self, split="train", num_images=None, transform=None):
        self.shapes = ToyShapes(split, num_images=num_images)
        self.transform = transform

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, index):
        img, mask = self.shapes.image(index), Image.fromarray(self.shapes.mask(index))
        return self.transform(img, mask) if self.transform else (img, mask)


SEG_DATASETS = {"voc": voc_segmentation, "ade20k": ade20k_segmentation, "cityscapes": cityscapes_segmentation}


def build_seg_dataset(dataset, data_dir, split, transform=None, toy_images=None):
    if dataset == "toy":
        return ToySegmentation(split, num_images=toy_images, transform=transform)
    if dataset not in SEG_DATASETS:
        raise ValueError(f"unknown segmentation dataset {dataset!r} (expected toy, {', '.join(SEG_DATASETS)})")
    if not os.path.isdir(data_dir):
        raise ValueError(f"data folder not found: {data_dir}")
    return SEG_DATASETS[dataset](data_dir, split, transform)


def _resize_short_side(img, short_side, resample):
    width, height = img.size
    scale = short_side / min(width, height)
    return img.resize((max(1, round(width * scale)), max(1, round(height * scale))), resample)


def _mask_tensor(mask):
    return torch.from_numpy(np.array(mask, dtype=np.int64))  # (H, W)


class SegTrainTransform:
    """(img, mask) -> (image (3, S, S), label (S, S)). augment=True (mmsegmentation-style): resize the
    short side to base_size x r, r uniform in scale_range (bilinear image, nearest mask), random
    S x S crop (padding: image 0 after normalisation, label 255), horizontal flip p = 0.5.
    augment=False: short side to base_size, centre crop (used for feature caching)."""

    def __init__(self, crop_size, base_size, scale_range=(0.5, 2.0), augment=True):
        self.crop_size, self.base_size, self.scale_range, self.augment = crop_size, base_size, scale_range, augment

    def __call__(self, img, mask):
        ratio = random.uniform(*self.scale_range) if self.augment else 1.0
        short_side = max(1, round(self.base_size * ratio))
        img = _resize_short_side(img, short_side, Image.BILINEAR)
        mask = _resize_short_side(mask, short_side, Image.NEAREST)
        width, height = img.size
        size = self.crop_size
        if self.augment:
            top, left = random.randint(0, max(height - size, 0)), random.randint(0, max(width - size, 0))
        else:
            top, left = max(height - size, 0) // 2, max(width - size, 0) // 2
        image = to_normalized_tensor(img)[:, top:top + size, left:left + size]
        label = _mask_tensor(mask)[top:top + size, left:left + size]
        pad = (0, size - image.shape[2], 0, size - image.shape[1])  # (left, right, top, bottom)
        image = torch.nn.functional.pad(image, pad, value=0.0)
        label = torch.nn.functional.pad(label, pad, value=IGNORE_LABEL)
        if self.augment and random.random() < FLIP_PROB:
            image, label = image.flip(-1), label.flip(-1)
        return image, label


class SegValTransform:
    """(img, mask) -> (image resized to short side base_size, label at its original resolution):
    predictions are resized back to the label before scoring."""

    def __init__(self, base_size):
        self.base_size = base_size

    def __call__(self, img, mask):
        return to_normalized_tensor(_resize_short_side(img, self.base_size, Image.BILINEAR)), _mask_tensor(mask)
