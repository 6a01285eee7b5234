"""Tests for data.py: view geometry, augmentation statistics, loaders, ToyShapes, image folders."""

import math
import random
from collections import Counter

import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms
from torchvision.transforms import functional as TF

import data


def coordinate_image(size=256):
    """An RGB image whose pixel (row, col) holds R = row, G = col, B = 0."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return Image.fromarray(np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8))


def denormalize(view):
    """(3, S, S) normalised tensor -> (S, S, 3) float pixel values in [0, 255]."""
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    return ((view * std + mean) * 255).permute(1, 2, 0).numpy()


# -----------------------------------------------------------------------------
# Geometry: boxes and flips describe exactly what each view shows.

def geometry_only(monkeypatch, simple):
    """MultiCropTransform's views without their colour augmentation: cut out, resized, flipped, normalised."""
    if simple:
        normalize = transforms.Compose([transforms.ToTensor(),
                                        transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
        monkeypatch.setattr(data, "recipe_view_colour", lambda *args: normalize)
    else:
        monkeypatch.setattr(data, "apply_color", lambda img, params: img)


@pytest.mark.parametrize("simple", [False, True])
def test_views_show_exactly_their_boxes(monkeypatch, simple):
    geometry_only(monkeypatch, simple)
    transform = data.MultiCropTransform((64, 32), (2, 4), (0.3, 0.08), (1.0, 0.4), simple=simple)
    random.seed(0)
    torch.manual_seed(0)
    checked_flips = set()
    for _ in range(20):
        views, boxes, flips = transform(coordinate_image())
        assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 4
        assert boxes.dtype == torch.float32 and boxes.shape == (6, 4)
        assert flips.dtype == torch.bool and flips.shape == (6,)
        for view, (top, left, height, width), flip in zip(views, boxes.tolist(), flips.tolist()):
            pixels, size = denormalize(view), view.shape[-1]
            for r in (size // 4, size // 2, 3 * size // 4):
                for c in (size // 4, size // 2, 3 * size // 4):
                    # Output pixel centre (r + .5, c + .5) samples input point top + (r + .5) h / S;
                    # the input pixel value k sits at its centre k + .5, so value = point - .5.
                    source_col = (size - 1 - c) if flip else c
                    expected_row = top + (r + 0.5) * height / size - 0.5
                    expected_col = left + (source_col + 0.5) * width / size - 0.5
                    assert abs(pixels[r, c, 0] - expected_row) < 1.0
                    assert abs(pixels[r, c, 1] - expected_col) < 1.0
            # Corners too, looser: the resampling kernel is cut at the image border.
            corner_col = (size - 1) if flip else 0
            assert abs(pixels[0, corner_col, 0] - (top + 0.5 * height / size - 0.5)) < 1 + height / size
            assert abs(pixels[0, corner_col, 1] - (left + 0.5 * width / size - 0.5)) < 1 + width / size
            checked_flips.add(flip)
    assert checked_flips == {False, True}


def test_crop_box_ranges_and_fallback():
    random.seed(1)
    height, width = 300, 500
    for scale in ((0.08, 0.4), (0.4, 1.0)):
        for _ in range(2000):
            top, left, h, w = data.sample_crop_box(height, width, scale)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
            # w, h are rounded to whole pixels: allow that rounding on area and ratio.
            assert scale[0] * 0.97 <= h * w / (height * width) <= scale[1] * 1.03
            assert 3 / 4 * 0.98 <= w / h <= 4 / 3 * 1.02
    # Every try fails on a very elongated image -> largest centred crop with ratio 4/3 or 3/4.
    assert data.sample_crop_box(30, 1000, (0.9, 1.0)) == (0, (1000 - 40) // 2, 30, 40)
    assert data.sample_crop_box(1000, 30, (0.9, 1.0)) == ((1000 - 40) // 2, 0, 40, 30)
    assert data.sample_crop_box(100, 100, (1.0, 1.0), ratio=(1.0, 1.0)) == (0, 0, 100, 100)


def test_crop_box_distribution_matches_torchvision():
    height, width, scale, ratio, n = 300, 500, (0.08, 1.0), (3 / 4, 4 / 3), 4000
    random.seed(2)
    torch.manual_seed(2)
    ours = np.array([data.sample_crop_box(height, width, scale) for _ in range(n)], dtype=float)
    image = torch.empty(3, height, width)
    theirs = np.array([transforms.RandomResizedCrop.get_params(image, scale, ratio) for _ in range(n)], dtype=float)

    def summary(boxes):
        top, left, h, w = boxes.T
        return {"scale": h * w / (height * width), "log_ratio": np.log(w / h),
                "center_row": (top + h / 2) / height, "center_col": (left + w / 2) / width}

    ours, theirs = summary(ours), summary(theirs)
    for key in ours:
        # Means within 4.5 standard errors of their difference (~0.006 for the scale, ~0.004 for
        # the log-ratio: tight enough to tell a log-uniform ratio from a uniform one, 0.028 apart).
        standard_error = math.sqrt((ours[key].var() + theirs[key].var()) / n)
        assert abs(ours[key].mean() - theirs[key].mean()) < 4.5 * standard_error, key
        assert abs(ours[key].std() - theirs[key].std()) < 0.02, key
    # Quartiles of the area fraction agree too.
    assert np.allclose(np.quantile(ours["scale"], [0.25, 0.5, 0.75]),
                       np.quantile(theirs["scale"], [0.25, 0.5, 0.75]), atol=0.04)


# -----------------------------------------------------------------------------
# The two paths, MultiCropTransform(simple=True) (the recipe as torchvision composes it on PIL images)
# and the default (the same on tensors), draw from the same distributions and return the same structure.

DRAW_CROPS = ((16, 8), (2, 4), (0.4, 0.08), (1.0, 0.4))  # tiny views: only the random draws count here
DRAW_BLUR_SIGMA, DRAW_HUE = (0.3, 0.9), 0.3  # not the defaults: both paths must honour the arguments
DRAW_CALLS, DRAW_VIEWS = 300, 6
# The recipe's probabilities per view (2 large, then 4 small views): blur p = 1 on the first view of each
# size and every other one after it, p = 0.1 on the others, which also get solarization p = 0.2
RECIPE_RATES = {"jitter": [0.8] * 6, "grayscale": [0.2] * 6, "blur": [1.0, 0.1] * 3, "solarize": [0.0, 0.2] * 3}


def log_tensor_path(monkeypatch, log):
    """Log each view's colour parameters (apply_color then does nothing)."""
    def logged(x, params):
        hue = dict(params.jitter).get("hue", math.nan)
        log.append({"jitter": bool(params.jitter), "hue": hue, "grayscale": params.grayscale,
                    "blur": params.blur_sigma is not None, "sigma": params.blur_sigma or math.nan,
                    "solarize": params.solarize})
        return x
    monkeypatch.setattr(data, "apply_color", logged)


def log_recipe_path(monkeypatch, log):
    """Log the colour operations torchvision's transforms apply to each view (the jitter, drawn but not
    applied, keeps the test fast)."""
    resized_crop, rgb_to_grayscale, solarize = TF.resized_crop, TF.rgb_to_grayscale, TF.solarize

    def new_view(*args, **kwargs):  # each view starts with its crop
        log.append({"jitter": False, "hue": math.nan, "grayscale": False, "blur": False, "sigma": math.nan,
                    "solarize": False})
        return resized_crop(*args, **kwargs)

    def drawn_jitter(self, img):
        hue = self.get_params(self.brightness, self.contrast, self.saturation, self.hue)[4]
        log[-1].update(jitter=True, hue=hue)
        return img

    def logged(name, operation):
        def wrapper(*args, **kwargs):
            log[-1][name] = True
            return operation(*args, **kwargs)
        return wrapper

    class LoggedBlur(ImageFilter.GaussianBlur):
        def __init__(self, radius):
            log[-1].update(blur=True, sigma=radius)
            super().__init__(radius)

    monkeypatch.setattr(TF, "resized_crop", new_view)
    monkeypatch.setattr(transforms.ColorJitter, "forward", drawn_jitter)
    monkeypatch.setattr(TF, "rgb_to_grayscale", logged("grayscale", rgb_to_grayscale))
    monkeypatch.setattr(ImageFilter, "GaussianBlur", LoggedBlur)
    monkeypatch.setattr(TF, "solarize", logged("solarize", solarize))


@pytest.fixture(scope="module")
def draws():
    """{"recipe" / "tensor": (boxes (N, V, 4), flips (N, V), {operation: (N, V) array})} of N calls of
    each path on one 120 x 90 image."""
    img = Image.fromarray(np.random.default_rng(12).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    results = {}
    for path, simple, log_path in (("recipe", True, log_recipe_path), ("tensor", False, log_tensor_path)):
        random.seed(13)
        torch.manual_seed(13)
        log = []
        with pytest.MonkeyPatch.context() as monkeypatch:
            log_path(monkeypatch, log)
            transform = data.MultiCropTransform(*DRAW_CROPS, blur_sigma=DRAW_BLUR_SIGMA, hue=DRAW_HUE, simple=simple)
            outputs = [transform(img) for _ in range(DRAW_CALLS)]
        assert len(log) == DRAW_VIEWS * DRAW_CALLS
        operations = {name: np.array([entry[name] for entry in log]).reshape(DRAW_CALLS, DRAW_VIEWS)
                      for name in log[0]}
        results[path] = (torch.stack([boxes for _, boxes, _ in outputs]).numpy(),
                         torch.stack([flips for _, _, flips in outputs]).numpy(), operations)
    return results


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), points, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), points, side="right") / len(b)
    return np.abs(cdf_a - cdf_b).max()


def test_both_paths_draw_the_same_boxes_and_flips(draws):
    (recipe_boxes, recipe_flips, _), (tensor_boxes, tensor_flips, _) = draws["recipe"], draws["tensor"]
    height, width = 90, 120
    for views in (slice(0, 2), slice(2, None)):  # large views: scale (0.4, 1); small views: (0.08, 0.4)
        summaries = []
        for boxes in (recipe_boxes, tensor_boxes):
            top, left, h, w = boxes[:, views].reshape(-1, 4).T
            summaries.append({"scale": h * w / (height * width), "log_ratio": np.log(w / h),
                              "center_row": (top + h / 2) / height, "center_col": (left + w / 2) / width})
        for key, recipe in summaries[0].items():
            tensor, n = summaries[1][key], len(recipe)
            # means within 4.5 standard errors of their difference; the whole distributions by a KS test
            # at the 1e-4 level (critical distance sqrt(-ln(1e-4 / 2) / 2) sqrt(2 / n))
            assert abs(recipe.mean() - tensor.mean()) < 4.5 * math.sqrt((recipe.var() + tensor.var()) / n), key
            assert ks_distance(recipe, tensor) < math.sqrt(-math.log(1e-4 / 2) / 2) * math.sqrt(2 / n), key
    # The recipe's scale ranges, up to the rounding of the box to whole pixels
    for boxes in (recipe_boxes, tensor_boxes):
        scale = boxes[..., 2] * boxes[..., 3] / (height * width)
        assert 0.4 * 0.95 <= scale[:, :2].min() and scale[:, 2:].max() <= 0.4 * 1.05
    for flips in (recipe_flips, tensor_flips):
        assert abs(flips.mean() - 0.5) < 4.5 * math.sqrt(0.25 / flips.size)


def test_both_paths_apply_colour_operations_at_the_recipes_rates(draws):
    for path, (_, _, operations) in draws.items():
        for name, rates in RECIPE_RATES.items():
            rates = np.array(rates)
            for view, p in enumerate(rates):  # each view (p = 0 or 1: exactly), within 4.5 standard errors
                rate = operations[name][:, view].mean()
                assert abs(rate - p) <= 4.5 * math.sqrt(p * (1 - p) / DRAW_CALLS), (path, name, view, rate)
            for p in np.unique(rates):  # the views of equal probability together, more precisely
                rate, n = operations[name][:, rates == p].mean(), DRAW_CALLS * (rates == p).sum()
                assert abs(rate - p) <= 4.5 * math.sqrt(p * (1 - p) / n), (path, name, p, rate)
        # sigma uniform in DRAW_BLUR_SIGMA = (0.3, 0.9), hue factor uniform in [-DRAW_HUE, DRAW_HUE]
        for name, (low, high) in (("sigma", DRAW_BLUR_SIGMA), ("hue", (-DRAW_HUE, DRAW_HUE))):
            values = operations[name][~np.isnan(operations[name])]
            mean, std = (low + high) / 2, (high - low) / math.sqrt(12)
            assert low <= values.min() and values.max() <= high, (path, name)
            assert abs(values.mean() - mean) < 4.5 * std / math.sqrt(len(values)), (path, name)
            # the standard error of a uniform sample's standard deviation: sqrt(0.2) std / sqrt(n)
            assert abs(values.std() - std) < 4.5 * math.sqrt(0.2) * std / math.sqrt(len(values)), (path, name)


def test_both_paths_return_the_same_structure():
    img = Image.fromarray(np.random.default_rng(6).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    # normalised grey levels 0..255 lie in [-mean / std, (1 - mean) / std], channel by channel
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    low, high = -mean / std - 1e-4, (1 - mean) / std + 1e-4
    for simple in (False, True):
        random.seed(6)
        torch.manual_seed(6)
        views, boxes, flips = data.MultiCropTransform(simple=simple)(img)
        assert isinstance(views, list)
        assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
        assert all(v.dtype == torch.float32 and v.is_contiguous() for v in views)
        assert all(((low <= v) & (v <= high)).all() for v in views)
        assert boxes.dtype == torch.float32 and boxes.shape == (8, 4)
        assert flips.dtype == torch.bool and flips.shape == (8,)
        top, left, height, width = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + height <= 300).all() and (left + width <= 400).all()


# -----------------------------------------------------------------------------
# Colour augmentation: the recipe's probabilities and ranges, and the operations themselves.

def test_view_specs_follow_the_recipe():
    specs = data.MultiCropTransform().view_specs
    assert [s[0] for s in specs] == [224, 224] + [96] * 6
    assert [s[1] for s in specs] == [(0.4, 1.0)] * 2 + [(0.08, 0.4)] * 6
    # First view of each size and every other one after it: blur always, no solarization.
    assert [s[2] for s in specs] == [1.0, 0.1, 1.0, 0.1, 1.0, 0.1, 1.0, 0.1]
    assert [s[3] for s in specs] == [0.0, 0.2, 0.0, 0.2, 0.0, 0.2, 0.0, 0.2]
    with pytest.raises(ValueError):
        data.MultiCropTransform((96, 224), (6, 2), (0.08, 0.4), (0.4, 1.0))
    with pytest.raises(ValueError):
        data.MultiCropTransform((224,), (2,), (0.5,), (0.4,))
    with pytest.raises(ValueError):
        data.MultiCropTransform((224, 96), (2,), (0.4, 0.08), (1.0, 0.4))


def test_color_params_rates_and_ranges():
    random.seed(4)
    n = 5000
    always_blur = [data.draw_color_params(1.0, 0.0) for _ in range(n)]
    rarely_blur = [data.draw_color_params(0.1, 0.2) for _ in range(n)]
    jittered = [p.jitter for p in always_blur if p.jitter]
    assert abs(len(jittered) / n - 0.8) < 0.025
    assert abs(sum(p.grayscale for p in always_blur) / n - 0.2) < 0.025
    ranges = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
    for jitter in jittered:
        assert sorted(name for name, _ in jitter) == sorted(ranges)
        assert all(ranges[name][0] <= factor <= ranges[name][1] for name, factor in jitter)
    # The application order is a uniformly random permutation: each op comes first ~1/4 of the time.
    first = Counter(jitter[0][0] for jitter in jittered)
    assert all(abs(first[name] / len(jittered) - 0.25) < 0.03 for name in ranges)
    sigmas = [p.blur_sigma for p in always_blur]
    assert all(s is not None and 0.1 <= s <= 2.0 for s in sigmas)
    assert abs(np.mean(sigmas) - 1.05) < 0.03  # uniform on [0.1, 2]
    assert not any(p.solarize for p in always_blur)
    assert abs(sum(p.blur_sigma is not None for p in rarely_blur) / n - 0.1) < 0.015
    assert abs(sum(p.solarize for p in rarely_blur) / n - 0.2) < 0.025


def as_pixels(img):
    """PIL RGB image -> (3, H, W) float32 pixel values, what the colour operations take."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().contiguous()


def as_array(x):
    """(C, H, W) pixel values -> (H, W, 3) float array (one channel = grey: three equal channels)."""
    return x.expand(3, -1, -1).permute(1, 2, 0).float().numpy()


def sample_images(size=48):
    """A crop of matplotlib's photo (natural statistics) and uniformly random colours (every hue,
    saturation and value, and edges everywhere)."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(path) as photo:
        face = photo.convert("RGB").resize((size, size), Image.BICUBIC, box=(150, 100, 400, 350))
    noise = Image.fromarray(np.random.default_rng(10).integers(0, 256, (size, size, 3), dtype=np.uint8))
    return [face, noise]


@pytest.fixture
def one_thread():
    """The colour operations on one thread, as MultiCropTransform runs them (small operations split
    over threads stall when other processes hold the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# torchvision's ColorJitter operations on PIL images: what the reference code runs
PIL_JITTER = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
              "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
@pytest.mark.usefixtures("one_thread")
def test_blends_equal_torchvision_on_pil(name):
    # PIL blends in floating point and truncates to 8 bits (contrast: around the mean grey level
    # rounded to a whole level); ours keeps the fraction: within one level and a half
    low, high = data.JITTER_RANGES[name]
    for img in sample_images():
        for factor in (low, (low + 1) / 2, (1 + high) / 2, high):
            ours = as_array(data.ADJUST[name](as_pixels(img), factor))
            theirs = np.asarray(PIL_JITTER[name](img, factor), dtype=float)
            assert np.abs(ours - theirs).max() <= 1.5, (name, factor)


@pytest.mark.usefixtures("one_thread")
def test_hue_equals_torchvision_on_pil():
    # PIL's 8-bit hue is reproduced; what remains is PIL's rounding of the saturation and the
    # channels (a level), and hues on the edge of one of the 256 steps, rare (a step moves a
    # channel by up to 6/255 of the chroma, up to 6 levels)
    for img in sample_images():
        for factor in (-0.1, -0.037, 0.052, 0.1):
            diff = np.abs(as_array(data.adjust_hue(as_pixels(img), factor)) - np.asarray(TF.adjust_hue(img, factor)))
            assert diff.max() <= 7 and diff.mean() < 0.25, factor
    # Independent of PIL: a third of a turn takes pure red to pure green (R 0 -> G 2 sixths), greys stay
    red_and_grey = torch.tensor([[[255.0, 90.0]], [[0.0, 90.0]], [[0.0, 90.0]]])  # (3, 1, 2)
    turned = data.adjust_hue(red_and_grey.clone(), 1 / 3 + 1e-9)
    assert torch.equal(turned, torch.tensor([[[0.0, 90.0]], [[255.0, 90.0]], [[0.0, 90.0]]]))


@pytest.mark.usefixtures("one_thread")
def test_grayscale_blur_and_solarize():
    for img in sample_images():
        # Grayscale: the ITU-R 601-2 luma, which PIL's convert("L") rounds to a whole level.
        gray = data.luma(as_pixels(img))
        assert gray.shape == (1, 48, 48)
        assert np.abs(gray[0].numpy() - np.asarray(img.convert("L"))).max() <= 0.51
        # Blur: PIL's GaussianBlur within the rounding of its six 1-D passes.
        for sigma in (0.1, 0.6, 1.3, 2.0):
            diff = np.abs(as_array(data.gaussian_blur(as_pixels(img), sigma))
                          - np.asarray(img.filter(ImageFilter.GaussianBlur(sigma))))
            assert diff.max() <= 3 and diff.mean() < 1.1, sigma
    # Blur, independent of PIL: the blurred image of a point has standard deviation sigma.
    point = torch.zeros(1, 81, 81)
    point[0, 40, 40] = 255
    for sigma in (0.7, 1.5):
        profile = data.gaussian_blur(point, sigma)[0].sum(0).double()
        std = math.sqrt((profile * (torch.arange(81) - 40) ** 2).sum() / profile.sum())
        assert abs(std - sigma) < 0.1 * sigma
    # Solarize: values >= 128 inverted.
    assert data.solarize(torch.arange(256.0)).tolist() == [v if v < 128 else 255 - v for v in range(256)]


def naive_box_pass(line, n, a):
    """One extended box pass over a list of values, a loop: the 2n + 1 whole taps and a fraction a of
    the next value on each side, the edge values repeated beyond the ends, normalised to sum 1."""
    at = lambda i: line[min(max(i, 0), len(line) - 1)]
    return [(sum(at(i + k) for k in range(-n, n + 1)) + a * (at(i - n - 1) + at(i + n + 1))) / (2 * (n + a) + 1)
            for i in range(len(line))]


@pytest.mark.parametrize("size", [40, 160])  # the whole products and the banded ones (views over 128 pixels)
def test_blur_equals_three_box_passes_along_each_axis(size):
    image = torch.rand(2, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size)) * 255
    for sigma in (0.1, 0.9, 2.0):
        variance = sigma ** 2 / 3  # per pass, and the box radius n + a that PIL derives from it
        n = math.floor((math.sqrt(12 * variance + 1) - 1) / 2)
        a = (2 * n + 1) * (n * (n + 1) - 3 * variance) / (6 * (variance - (n + 1) ** 2))
        expected = []
        for channel in image.tolist():
            rows = [naive_box_pass(naive_box_pass(naive_box_pass(row, n, a), n, a), n, a) for row in channel]
            columns = [naive_box_pass(naive_box_pass(naive_box_pass(col, n, a), n, a), n, a) for col in zip(*rows)]
            expected.append(list(zip(*columns)))
        blurred = data.gaussian_blur(image.float(), sigma)
        assert torch.allclose(blurred.double(), torch.tensor(expected, dtype=torch.float64), atol=2e-3), sigma


@pytest.mark.usefixtures("one_thread")
def test_crop_resize_equals_torchvision_resized_crop():
    img = sample_images(size=160)[0]
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0)  # channels-last, as the transform
    for box, size in (((0, 0, 160, 160), 64), ((10, 37, 91, 70), 32), ((100, 5, 50, 41), 96), ((3, 4, 20, 30), 64)):
        ours = data.crop_resize(pixels, box, size, flip=False)
        theirs = np.asarray(TF.resized_crop(img, *box, [size, size], TF.InterpolationMode.BICUBIC), dtype=float)
        diff = np.abs(as_array(ours) - theirs)
        assert ours.shape == (3, size, size) and diff.max() <= 2 and (diff > 0).mean() < 0.02, box
        assert torch.equal(data.crop_resize(pixels, box, size, flip=True), ours.flip(-1))


@pytest.mark.usefixtures("one_thread")
def test_color_chain_equals_the_reference_operations():
    """A whole view's colour augmentation for drawn parameters against the reference's operations on
    PIL images: within rounding on average; PIL truncates after every blend, so up to ~2 levels of bias."""
    def reference(img, params):
        for name, factor in params.jitter:
            img = PIL_JITTER[name](img, factor)
        if params.grayscale:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if params.blur_sigma is not None:
            img = img.filter(ImageFilter.GaussianBlur(params.blur_sigma))
        if params.solarize:
            img = ImageOps.solarize(img, 128)
        return np.asarray(img, dtype=float)

    random.seed(11)
    nothing = data.ColorParams((), False, None, False)
    for img in sample_images():
        assert torch.equal(data.apply_color(as_pixels(img), nothing), as_pixels(img))
        for _ in range(20):
            params = data.draw_color_params(0.5, 0.5)
            diff = np.abs(as_array(data.apply_color(as_pixels(img), params)) - reference(img, params))
            assert diff.mean() < 2 and np.quantile(diff, 0.99) <= 8, params


def test_to_normalized_tensor_matches_torchvision():
    rgb = Image.fromarray(np.random.default_rng(5).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    expected = transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)(transforms.ToTensor()(rgb))
    ours = data.to_normalized_tensor(rgb)
    assert ours.shape == (3, 20, 30) and ours.is_contiguous()
    assert torch.allclose(ours, expected, atol=1e-5)
    # A one-channel (grey) view gives three equal channels, normalised each with its own mean and std.
    gray = rgb.convert("L")
    expected = transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)(transforms.ToTensor()(gray.convert("RGB")))
    ours = data.normalize(torch.from_numpy(np.array(gray)).float()[None])
    assert ours.shape == (3, 20, 30) and ours.is_contiguous()
    assert torch.allclose(ours, expected, atol=1e-5)


def test_linear_transforms():
    img = Image.fromarray(np.random.default_rng(7).integers(0, 256, (100, 120, 3), dtype=np.uint8))
    assert data.linear_train_transform(64)(img).shape == (3, 64, 64)
    val = data.linear_val_transform(80, 64)
    assert val(img).shape == (3, 64, 64) and torch.equal(val(img), val(img))


def test_linear_train_crop_is_bilinear_as_the_reference_evaluation():
    img = Image.fromarray(np.random.default_rng(8).integers(0, 256, (100, 120, 3), dtype=np.uint8))
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    for seed in range(4):
        torch.manual_seed(seed)
        ours = data.linear_train_transform(64)(img)
        # the same draws (crop box, then flip) from torchvision's functional pieces
        torch.manual_seed(seed)
        box = transforms.RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        flip = bool(torch.rand(1) < 0.5)
        crops = {mode: TF.resized_crop(img, *box, [64, 64], interpolation=mode)
                 for mode in (transforms.InterpolationMode.BILINEAR, transforms.InterpolationMode.BICUBIC)}
        crops = {mode: to_tensor(TF.hflip(crop) if flip else crop) for mode, crop in crops.items()}
        assert torch.equal(ours, crops[transforms.InterpolationMode.BILINEAR])
        assert not torch.equal(ours, crops[transforms.InterpolationMode.BICUBIC])  # pretraining's crops


# -----------------------------------------------------------------------------
# Loaders.

def small_multicrop_dataset(simple=False):
    transform = data.MultiCropTransform((32, 16), (2, 2), (0.4, 0.1), (1.0, 0.4), simple=simple)
    return data.ToyShapes("train", num_images=24, image_size=32, transform=transform)


def collect(loader):
    return [((views, boxes, flips), labels, unreadable) for (views, boxes, flips), labels, unreadable in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for ((views_a, boxes_a, flips_a), labels_a, _), ((views_b, boxes_b, flips_b), labels_b, _) in zip(a, b):
        assert all(torch.equal(x, y) for x, y in zip(views_a, views_b))
        assert torch.equal(boxes_a, boxes_b) and torch.equal(flips_a, flips_b) and torch.equal(labels_a, labels_b)


@pytest.mark.parametrize("num_workers, simple", [(0, False), (2, False), (2, True)])
def test_make_loader_replays_an_epoch(num_workers, simple):
    dataset = small_multicrop_dataset(simple)
    first = collect(data.make_loader(dataset, 5, num_workers, epoch=3, seed=1))
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # outside state must not matter
    again = collect(data.make_loader(dataset, 5, num_workers, epoch=3, seed=1))
    assert_same_batches(first, again)
    assert len(first) == 24 // 5  # drop_last
    (views, boxes, flips), labels, unreadable = first[0]
    assert [tuple(v.shape) for v in views] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 2
    assert boxes.shape == (5, 4, 4) and flips.shape == (5, 4) and flips.dtype == torch.bool
    assert labels.shape == (5,) and unreadable.dtype == torch.bool and not unreadable.any()
    # Another epoch (or seed): another order and other augmentations.
    other = collect(data.make_loader(dataset, 5, num_workers, epoch=4, seed=1))
    assert not torch.equal(torch.cat([b[1] for b in first]), torch.cat([b[1] for b in other]))
    assert not torch.equal(torch.cat([b[0][1] for b in first]), torch.cat([b[0][1] for b in other]))


def test_make_loader_epoch_is_a_permutation_and_workers_differ():
    dataset = data.ToyShapes("train", num_images=24, image_size=32)
    dataset.transform = lambda img: torch.from_numpy(np.array(img))
    indices = []
    for _, labels, _ in data.make_loader(dataset, 5, 0, epoch=0, drop_last=False):
        indices += labels.tolist()
    assert sorted(indices) == sorted(i % data.ToyShapes.NUM_CLASSES for i in range(24))
    # Two workers, in-order loading of identical-size images: worker 0 makes batch 0, worker 1
    # batch 1; differently seeded workers draw different crop boxes.
    same_image = data.ToyShapes("train", num_images=8, image_size=32,
                                transform=data.MultiCropTransform((32,), (2,), (0.1,), (1.0,)))
    batches = collect(data.make_loader(same_image, 4, 2, epoch=0, shuffle=False))
    assert not torch.equal(batches[0][0][1], batches[1][0][1])


def test_make_loader_under_torch_distributed(tmp_path):
    import torch.distributed as dist
    dataset = data.ToyShapes("train", num_images=20, image_size=16, transform=lambda img: 0)
    alone = [labels for _, labels, _ in data.make_loader(dataset, 4, 0, epoch=2, seed=5)]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        order = [labels for _, labels, _ in data.make_loader(dataset, 4, 0, epoch=2, seed=5)]
        assert all(torch.equal(a, b) for a, b in zip(order, alone)) and len(order) == 5
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("num_items, world_size, drop_last", [(23, 1, True), (23, 3, True), (23, 4, False), (24, 4, True)])
def test_the_processes_batches_of_a_step_are_the_one_process_batch(num_items, world_size, drop_last):
    per_process = 2
    alone = data.epoch_order(num_items, 7, 3, 0, 1)  # one process: the epoch's permutation
    assert sorted(alone) == list(range(num_items))
    shards = [data.epoch_order(num_items, 7, 3, r, world_size, drop_last=drop_last) for r in range(world_size)]
    assert len({len(shard) for shard in shards}) == 1  # as many steps on every process
    for step in range(num_items // (per_process * world_size)):
        together = [i for shard in shards for i in shard[step * per_process:(step + 1) * per_process]]
        size = per_process * world_size
        assert sorted(together) == sorted(alone[step * size:(step + 1) * size])
    if drop_last:  # a partition of the permutation's first items
        assert sorted(i for shard in shards for i in shard) == sorted(alone[:num_items - num_items % world_size])
    else:  # every item, the first ones again to fill the last step
        assert set(i for shard in shards for i in shard) == set(range(num_items))


# -----------------------------------------------------------------------------
# ToyShapes.

def test_toyshapes_deterministic_and_split_disjoint():
    a, b = data.ToyShapes("train", seed=0), data.ToyShapes("train", seed=0)
    assert len(a) == 4000 and len(data.ToyShapes("val")) == 1000
    assert len(a.classes) == data.ToyShapes.NUM_CLASSES == 8  # .classes as ImageFiles (train.py uses it)
    for i in (0, 7, 3999):
        assert np.array_equal(np.asarray(a.image(i)), np.asarray(b.image(i)))
        assert np.array_equal(a.mask(i), b.mask(i))
    val, other_seed = data.ToyShapes("val", seed=0), data.ToyShapes("train", seed=1)
    assert not np.array_equal(np.asarray(a.image(3)), np.asarray(val.image(3)))
    assert not np.array_equal(np.asarray(a.image(3)), np.asarray(other_seed.image(3)))
    with pytest.raises(ValueError):
        data.ToyShapes("test")


def colour_clusters(pixels, tolerance):
    """Greedy clustering of (n, 3) pixels: each pixel joins the first centre within `tolerance` levels
    (max over channels), else becomes a new centre. The number of centres."""
    centres = []
    for pixel in pixels:
        if not any(np.abs(pixel - centre).max() <= tolerance for centre in centres):
            centres.append(pixel)
    return len(centres)


def test_toyshapes_labels_balanced_and_masks_agree_with_pixels():
    dataset = data.ToyShapes("val")
    labels = [dataset.label(i) for i in range(400)]
    assert Counter(labels) == {c: 50 for c in range(data.ToyShapes.NUM_CLASSES)}  # balanced
    for i in range(0, 400, 7):
        img, label, unreadable = dataset[i]
        mask = dataset.mask(i)
        assert img.mode == "RGB" and img.size == (64, 64) and label == labels[i] and unreadable is False
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        assert mask.max() <= data.ToyShapes.NUM_CLASSES
        # The main object (>= 30 % of the side, drawn last, so whole) is the largest region.
        counts = np.bincount(mask.ravel(), minlength=data.ToyShapes.NUM_CLASSES + 1)
        assert counts[label + 1] >= 500 and counts[label + 1] == counts[1:].max()
        # Every object is painted in exactly its two colours (at least 0.4 apart, ~59 levels on some
        # channel), plus grain (+-0.03, 8 levels, so two pixels of one colour differ by <= 16): the
        # pixels under a class's mask form two colour clusters (a sliver of a hidden object may show
        # one). A mask pixel that belonged to the background or to another object would make a third.
        pixels = np.asarray(img).astype(int)
        for cls in np.unique(mask[mask > 0]):
            clusters = colour_clusters(pixels[mask == cls], tolerance=17)
            assert clusters == 2 if cls == label + 1 else clusters in (1, 2), (i, cls, clusters)


def test_toyshapes_texture_is_the_class():
    # The main object's texture, read off its pixels along the texture's axes, is its class: horizontal
    # stripes vary down a column only, vertical stripes along a row only, checks and dots both ways; and
    # the period (from the colour changes per pixel) is in the class's band.
    dataset = data.ToyShapes("train", num_images=80)
    for i in range(80):
        label, image, mask = dataset.label(i), np.asarray(dataset.image(i)).astype(int), dataset.mask(i)
        inside = mask == label + 1
        changes = np.abs(np.diff(image, axis=0)).max(-1) > 40  # (S-1, S) colour edges going down
        changes_down = changes[inside[1:] & inside[:-1]].mean()
        changes = np.abs(np.diff(image, axis=1)).max(-1) > 40  # (S, S-1) going right
        changes_right = changes[inside[:, 1:] & inside[:, :-1]].mean()
        pattern = data.ToyShapes.classes[label].split("_")[1]
        fine = data.ToyShapes.classes[label].startswith("fine")
        if pattern == "hstripes":
            assert changes_down > 4 * changes_right, (i, changes_down, changes_right)
        elif pattern == "vstripes":
            assert changes_right > 4 * changes_down, (i, changes_down, changes_right)
        else:
            assert min(changes_down, changes_right) > 0.3 * max(changes_down, changes_right), i
        # two edges per period (dots: fewer, a line can pass between them): fine periods (3.8-5.1 px)
        # change colour about twice as often per pixel as coarse ones (10-14 px)
        rate, threshold = max(changes_down, changes_right), 0.17 if pattern == "dots" else 0.3
        assert (rate > threshold) if fine else (rate < threshold), (i, rate)


def test_toyshapes_speed():
    import time
    dataset = data.ToyShapes("train")
    start = time.process_time()  # CPU time of this process: robust to a busy machine
    for i in range(100):
        dataset.image(i)
    assert (time.process_time() - start) / 100 < 0.004  # ~1 ms per image on one core


# -----------------------------------------------------------------------------
# Image folders.

def write_tree(root):
    rng = np.random.default_rng(8)
    for name in ("cat/a.png", "cat/b.jpg", "dog/c.png", "dog/sub/e.png"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
    (root / "dog" / "d_corrupt.jpg").write_bytes(b"this is not an image")
    (root / "dog" / "notes.txt").write_text("ignored: not an image extension")


def test_image_files_listing_and_unreadable(tmp_path, capsys):
    write_tree(tmp_path)
    dataset = data.ImageFiles(str(tmp_path), transform=lambda img: img.size)
    assert dataset.classes == ["cat", "dog"]
    assert [p.split(str(tmp_path))[1] for p, _ in dataset.samples] == [
        "/cat/a.png", "/cat/b.jpg", "/dog/c.png", "/dog/d_corrupt.jpg", "/dog/sub/e.png"]
    assert [label for _, label in dataset.samples] == [0, 0, 1, 1, 1]
    assert dataset[0] == ((10, 12), 0, False)
    # The corrupt file (index 3) is replaced by the next readable one (index 4), flagged, reported once.
    assert dataset[3] == ((10, 12), 1, True)
    assert dataset[3] == ((10, 12), 1, True)
    err = capsys.readouterr().err
    assert err.count("warning: unreadable image skipped: ") == 1
    assert str(tmp_path / "dog" / "d_corrupt.jpg") + " (" in err


def test_image_files_truncated_image_wraps_around(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "x" / "0.png")
    good = np.random.default_rng(9).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(good).save(tmp_path / "x" / "1.png")
    content = (tmp_path / "x" / "1.png").read_bytes()
    (tmp_path / "x" / "1.png").write_bytes(content[: len(content) // 2])  # truncated
    dataset = data.ImageFiles(str(tmp_path), transform=None)
    img, label, unreadable = dataset[1]  # last index unreadable -> wraps to index 0
    assert img.size == (40, 40) and label == 0 and unreadable is True
    assert "1.png" in capsys.readouterr().err


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="data folder not found"):
        data.ImageFiles(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.ImageFiles(str(tmp_path))
    (tmp_path / "train" / "empty_class").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found under .*train"):
        data.build_pretrain_dataset("imagenet", str(tmp_path), None)
    with pytest.raises(ValueError, match="data folder not found"):
        data.build_pretrain_dataset("imagenet", str(tmp_path / "nowhere"), None)
    with pytest.raises(ValueError, match="data folder not found: .*train"):
        data.build_pretrain_dataset("imagenet", str(tmp_path / "train"), None)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build_pretrain_dataset("cifar", str(tmp_path), None)
    (tmp_path / "train" / "empty_class" / "bad.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable images"):
        data.build_pretrain_dataset("imagenet", str(tmp_path), None)[0]
    toy = data.build_pretrain_dataset("toy", "unused", None, toy_images=10)
    assert isinstance(toy, data.ToyShapes) and len(toy) == 10
