"""Speed of data.MultiCropTransform against a plain torchvision implementation of the same recipe
(2 x 224 + 6 x 96, SPEC section 3), one thread, on matplotlib's grace_hopper.jpg photo (512 x 600).

Run: python tests/benchmark_data.py   (prints images/s of each and the ratio)
"""

import pathlib
import sys
import time

import matplotlib.cbook
import torch
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run as a script: repo root
import data  # noqa: E402


def reference_transform(size_crops=(224, 96), num_crops=(2, 6), min_scale_crops=(0.4, 0.08),
                        max_scale_crops=(1.0, 0.4)):
    """The recipe written the straightforward way with torchvision.transforms: a list of V
    per-view pipelines, called one after the other on the same image."""
    pipelines = []
    for size, count, min_scale, max_scale in zip(size_crops, num_crops, min_scale_crops, max_scale_crops):
        for j in range(count):
            blur_prob, solarize_prob = (1.0, 0.0) if j % 2 == 0 else (0.1, 0.2)
            pipelines.append(transforms.Compose([
                transforms.RandomResizedCrop(size, scale=(min_scale, max_scale),
                                             interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
                transforms.RandomApply([transforms.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur_prob),
                transforms.RandomSolarize(128, p=solarize_prob),
                transforms.ToTensor(),
                transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
            ]))
    return lambda img: [pipeline(img) for pipeline in pipelines]


def images_per_second(transform, img, seconds):
    """Images per second of CPU time of this process (one thread): what one loader worker delivers
    on a core of its own, and unaffected by other processes sharing the machine."""
    transform(img)  # warm-up
    count, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        transform(img)
        count += 1
    return count / (time.process_time() - start)


def bench_transform(seconds=5.0):
    """Images/s of data.MultiCropTransform and of the torchvision reference, single thread (one
    data-loading worker); returns (ours, reference, ours / reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        img = Image.open(path).convert("RGB")
        ours = images_per_second(data.MultiCropTransform(), img, seconds)
        reference = images_per_second(reference_transform(), img, seconds)
    finally:
        torch.set_num_threads(threads)
    print(f"image {img.size[0]}x{img.size[1]}, 2x224 + 6x96 views, 1 thread, per CPU-second")
    print(f"data.MultiCropTransform : {ours:7.1f} images/s")
    print(f"torchvision reference   : {reference:7.1f} images/s")
    print(f"ratio                   : {ours / reference:7.2f}x")
    return ours, reference, ours / reference


if __name__ == "__main__":
    bench_transform()
