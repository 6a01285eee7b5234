"""
Figures for VICRegL: the paper's Figure 3 (matches between two views), training curves, and the local
features in colour (PCA).

Figure 3 of the paper: the seed image with the crop boxes of two views (red, blue), then two panels that
show the two views side by side with their feature-map grid: left the feature-based matches, right
the location-based matches, a few of the gamma = 20 kept matches drawn as lines between cell centres.
    python visualize.py --out matches.png                         # random-init convnext_small
    python visualize.py --arch resnet_toy --pretrained EXP_DIR/backbone.pth --size 48 --toy-image 1 --out m.png
With --toy-image N the seed image is a toy val image, and the script also prints how many of the kept
matches join two cells on the same region of its mask (a number to compare random init and trained).
The matches are computed by matching.py: location matching on matching.location_grid, as in training;
feature matching on the cells of the backbone's final map (B, C, h, w), *not* on the local projector's
outputs z that the loss matches (so that a released backbone file, which has no projector, works as
well as a full checkpoint), and with the top gamma = 20 kept, where the loss keeps every cell by default
(--feature-matches). The feature-based panel therefore shows what the backbone's cells match, which can
differ from the feature matches of the loss. This script only draws them.

Training curves from train.py's EXP_DIR/stats.jsonl (with --eval-freq, kNN top-1 and dense kNN mIoU
against epoch in one panel):
    python visualize.py --stats EXP_DIR/stats.jsonl --out curves.png

The local features in colour, as the DINO and DINOv2 papers show theirs: the first three principal
components of the cells of several toy val images (one PCA over all their cells), mapped to red, green and
blue, for the backbone's last map and for the local projector's outputs z, the run's random init beside its
trained weights (a train.py checkpoint holds both networks and the seed of the init):
    python visualize.py --pca EXP_DIR/model.pth --out pca.png

Headless: figures are matplotlib.figure.Figure objects rendered by Agg when saved; pyplot (and so a
window system) is never used.
"""
import argparse
import json
import os
import random
import sys

import numpy as np
import torch
from matplotlib import cbook
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

import data
from matching import location_grid, match_by_features, match_by_location
from model import ARCHS, VICRegL, build_backbone

TOY_IMAGE_SIZE = 128  # --toy-image: toy images drawn at twice their training size, for a sharp figure
NUM_KEPT = 20  # gamma: location and feature matches kept (the paper draws 10 of the 20 kept matches)
VIEW_GAP = 0.1  # blank space between the two views of a panel, as a fraction of the view size
VIEW_COLORS = ("tab:red", "tab:blue")  # view 1, view 2: crop boxes and view frames
DPI = 100


# -----------------------------------------------------------------------------
# Views and matches

def load_image(path):
    """The seed image as PIL RGB; ValueError when it cannot be opened or decoded."""
    try:
        with Image.open(path) as file:
            return file.convert("RGB")  # forces the full decode, so errors surface here
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path} ({type(error).__name__}: {error})") from None


def make_views(image, size, seed):
    """Two size x size views of `image` from the training augmentation (data.MultiCropTransform),
    reproducible from `seed`. Crop scale 0.4-1 (ConvNeXt large-view range) makes overlapping views
    likely. The blur's sigma range is the recipe's at 224 px, scaled to the view size (as the toy recipe's
    at 48 px), so that small views keep their detail. Returns views (2, 3, S, S) normalised, boxes (2, 4)
    (top, left, height, width) in seed-image pixels, flips (2,) bool. Views are what the network sees:
    colour-augmented, flipped if flips[v]."""
    blur_sigma = [sigma * size / 224 for sigma in data.BLUR_SIGMA]
    transform = data.MultiCropTransform(size_crops=(size,), num_crops=(2,), min_scale_crops=(0.4,),
                                        max_scale_crops=(1.0,), blur_sigma=blur_sigma)
    random.seed(seed)  # the transform draws everything from Python's `random`
    torch.manual_seed(seed)
    views, boxes, flips = transform(image)
    return torch.stack(views), boxes, flips


@torch.no_grad()
def compute_matches(backbone, views, boxes, flips, num_matches=NUM_KEPT, ignore_flips=False):
    """Matches of view 1's cells (queries) to view 2's cells (candidates), from matching.py.

    views (2, 3, S, S), boxes (2, 4), flips (2,). Returns (feature_matches, location_matches, (h, w)):
    each matches a pair (query_idx, candidate_idx) of (k,) long tensors, k = min(num_matches, h*w),
    cells indexed row-major (r * w + c) on the backbone's h x w map. ignore_flips: location grids as if
    no view were flipped (train.py --ignore-flips, the reference code's default): a flipped view's cells
    then get the centres of their mirror images, and location matching pairs mirrored places.
    """
    backbone.eval()
    maps = backbone(views)  # (2, C, h, w)
    _, C, h, w = maps.shape
    cells = maps.permute(0, 2, 3, 1).reshape(2, h * w, C)  # (2, h*w, C)
    feature_query, feature_candidate = match_by_features(cells[:1], cells[1:], num_matches)  # (1, k) each

    # cell centres in seed-image pixels; a flipped view's column c looks at column w-1-c of its box
    grid_flips = torch.zeros_like(flips) if ignore_flips else flips
    grids = location_grid(boxes, grid_flips, (h, w)).reshape(2, h * w, 2)  # (2, h*w, 2) as (row, col)
    location_query, location_candidate = match_by_location(grids[:1], grids[1:], num_matches)  # (1, k) each
    return (feature_query[0], feature_candidate[0]), (location_query[0], location_candidate[0]), (h, w)


def same_region_counts(mask, boxes, flips, map_size, matches):
    """For each (query_idx, candidate_idx) matches: how many join two cells whose centres lie on the
    same region of the seed image, read from its mask (H, W) (the same object class, or background on
    both). Cell centres are the true ones (flips honoured), whatever grids the matching used."""
    grids = location_grid(boxes, flips, map_size).reshape(2, -1, 2)  # (2, h*w, 2) (row, col), seed pixels
    rows = grids[..., 0].long().clamp(0, mask.shape[0] - 1)
    cols = grids[..., 1].long().clamp(0, mask.shape[1] - 1)
    region = torch.from_numpy(mask)[rows, cols]  # (2, h*w): the mask's value under each cell centre
    return [int((region[0, query] == region[1, candidate]).sum()) for query, candidate in matches]


# -----------------------------------------------------------------------------
# Figure 3

def unnormalize(view):
    """(3, S, S) ImageNet-normalised tensor -> (S, S, 3) float array in [0, 1], as drawn."""
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    return (view * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def cell_centre(index, map_size, size, x_offset=0.0):
    """(x, y) of cell `index` (row-major) of an h x w map in the drawn view's pixels: the view is
    S x S and cut into h x w cells, so cell (r, c) is centred at ((c + .5) S / w, (r + .5) S / h).
    No flip correction: the view is drawn as the network sees it (already flipped), and the map's
    column c is the view's column c. x_offset places the view in its panel."""
    h, w = map_size
    r, c = divmod(int(index), w)
    return x_offset + (c + 0.5) * size / w, (r + 0.5) * size / h


def shown_matches(matches, num_show):
    """num_show of the kept matches, evenly spread over the kept list (ascending query index, so the
    lines spread over view 1), as (query, candidate) int pairs."""
    query_idx, candidate_idx = matches
    k = len(query_idx)
    picks = np.unique(np.linspace(0, k - 1, min(num_show, k)).round().astype(int))
    return [(int(query_idx[i]), int(candidate_idx[i])) for i in picks]


def draw_seed_image(ax, image, boxes, flips):
    ax.imshow(np.asarray(image), extent=(0, image.width, image.height, 0))  # pixel edges, like the boxes
    for v, ((top, left, height, width), flip) in enumerate(zip(boxes.tolist(), flips.tolist())):
        ax.add_patch(Rectangle((left, top), width, height, fill=False, lw=2.5, color=VIEW_COLORS[v]))
        # view 1 labelled at its top-left corner, view 2 at its bottom-left one, so labels never collide
        y, va = (top + 4, "top") if v == 0 else (top + height - 4, "bottom")
        ax.text(left + 4, y, f"{v + 1}" + (" (flipped)" if flip else ""), color="white", va=va,
                fontsize=9, bbox=dict(facecolor=VIEW_COLORS[v], edgecolor="none", pad=1.5))
    ax.set_title(f"seed image and the two crops ({image.width}x{image.height})", fontsize=10)
    ax.set_axis_off()


def draw_views_with_matches(ax, views, flips, map_size, pairs, title):
    """Both views side by side (view 2 shifted right by S (1 + VIEW_GAP)), each framed in its colour,
    with the h x w cell grid, and one line per (query, candidate) pair between cell centres."""
    size = views.shape[-1]
    h, w = map_size
    offsets = (0.0, size * (1 + VIEW_GAP))
    for v, x0 in enumerate(offsets):
        ax.imshow(unnormalize(views[v]), extent=(x0, x0 + size, size, 0))
        ax.vlines(x0 + np.arange(1, w) * size / w, 0, size, colors="white", lw=0.6, alpha=0.6)
        ax.hlines(np.arange(1, h) * size / h, x0, x0 + size, colors="white", lw=0.6, alpha=0.6)
        ax.add_patch(Rectangle((x0, 0), size, size, fill=False, lw=3, color=VIEW_COLORS[v]))
        label = f"view {v + 1}" + (" (flipped)" if flips[v] else "")
        ax.text(x0 + size / 2, size * 1.02, label, ha="center", va="top", fontsize=9, color=VIEW_COLORS[v])
    colors = [f"C{i % 10}" for i in range(len(pairs))]
    for (query, candidate), color in zip(pairs, colors):
        xa, ya = cell_centre(query, map_size, size, offsets[0])
        xb, yb = cell_centre(candidate, map_size, size, offsets[1])
        # matches along one row of cells draw collinear lines: the coloured end points tell them apart
        ax.plot([xa, xb], [ya, yb], "-o", color=color, lw=1.6, ms=6, mec="white", mew=1.0, gid="match")
    ax.set_xlim(0, offsets[1] + size)
    ax.set_ylim(size * 1.1, 0)  # image rows grow downwards; room for the view labels
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


def draw_matches(image, views, boxes, flips, map_size, feature_matches, location_matches, num_show=10,
                 backbone_note=""):
    """Figure 3: seed image with the crops | feature-based matches | location-based matches.
    Each drawn match is a Line2D with gid "match" whose data are the two cell centres (panel x, y)."""
    aspect = image.width / image.height
    fig = Figure(figsize=(17, 4), dpi=DPI, layout="constrained")  # whole inches: exact pixel sizes
    axes = fig.subplots(1, 3, width_ratios=[aspect, (2 + VIEW_GAP) / 1.1, (2 + VIEW_GAP) / 1.1])
    draw_seed_image(axes[0], image, boxes, flips)
    for ax, matches, kind in ((axes[1], feature_matches, "feature"), (axes[2], location_matches, "location")):
        pairs = shown_matches(matches, num_show)
        title = f"{kind}-based matches: {len(pairs)} of the {len(matches[0])} kept"
        draw_views_with_matches(ax, views, flips, map_size, pairs, title)
    if backbone_note:
        fig.suptitle(backbone_note, fontsize=10)
    return fig


# -----------------------------------------------------------------------------
# Training curves

CURVE_PANELS = (  # (title, stats.jsonl keys drawn in it), against step
    ("loss", ("loss",)),
    ("global terms", ("inv", "var", "cov")),
    ("local terms", ("local_inv", "local_var", "local_cov")),
    ("learning rate", ("lr",)),
    ("online linear probe top-1 (%)", ("top1",)),
    ("online linear probe loss", ("cls_loss",)),
    ("RankMe: effective rank of the logged batch", ("rankme", "local_rankme")),
)
# against epoch (--eval-freq): the kNN classifier and the dense kNN probe (eval_seg.py --knn) together
KNN_PANEL = ("val split: kNN top-1/top-5, dense kNN mIoU (%)", ("knn_top1", "knn_top5", "dense_miou"))


def read_stats(path):
    """The records of a stats.jsonl: (log-step records sorted by step, kNN evaluations sorted by epoch).
    A resumed run may have logged a step or an evaluation twice; the later record wins. ValueError for a
    missing, empty or corrupt file."""
    if not os.path.isfile(path):
        raise ValueError(f"stats file not found: {path}")
    by_step, by_epoch = {}, {}
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if "knn_top1" in record:
                    by_epoch[int(record["epoch"])] = record
                else:
                    by_step[int(record["step"])] = record
            except (ValueError, TypeError, KeyError) as error:
                raise ValueError(f"{path}, line {line_number}: not a stats record with a step or an epoch "
                                 f"({type(error).__name__}: {error})") from None
    if not by_step:
        raise ValueError(f"stats file {path} holds no records")
    return [by_step[step] for step in sorted(by_step)], [by_epoch[epoch] for epoch in sorted(by_epoch)]


def draw_curves(records, evaluations=()):
    """One panel per CURVE_PANELS entry, each key a line (labelled by the key) against step, and the kNN
    evaluations against epoch; keys absent from some record are left out."""
    fig = Figure(figsize=(17, 6.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 4).ravel()
    panels = [(title, keys, records, "step") for title, keys in CURVE_PANELS] + [(*KNN_PANEL, evaluations, "epoch")]
    for ax, (title, keys, rows, x_key) in zip(axes, panels):
        for key in keys:
            if rows and all(key in row for row in rows):
                ax.plot([row[x_key] for row in rows], [row[key] for row in rows], label=key,
                        marker="o" if x_key == "epoch" else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.get_lines():
            ax.legend(fontsize=8)
    return fig


# -----------------------------------------------------------------------------
# The local features in colour (--pca)

def pca_rgb(features):
    """features (..., C) -> (..., 3) in [0, 1]: the projections on the first three principal components of
    all the rows (centred; the right singular vectors of the largest singular values), each component
    min-max scaled to [0, 1] over all the rows (a component's sign is arbitrary: its colour may invert)."""
    rows = features.reshape(-1, features.shape[-1]).double()
    centred = rows - rows.mean(dim=0)
    components = torch.linalg.svd(centred, full_matrices=False).Vh[:3]  # (3, C)
    projected = centred @ components.T  # (N, 3)
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    colours = (projected - low) / (high - low).clamp(min=1e-12)
    return colours.float().reshape(*features.shape[:-1], 3)


def load_run(path):
    """A train.py checkpoint -> (trained VICRegL, the same model at the run's initial weights), both in eval
    mode. The initial weights are rebuilt as train.py draws them: torch.manual_seed(--seed), then the model."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        args = ckpt["args"]
        state = {key.removeprefix("module."): value for key, value in ckpt["model"].items()}
    except FileNotFoundError:
        raise ValueError(f"checkpoint not found: {path}") from None
    except Exception as error:
        raise ValueError(f"{path} is not a train.py checkpoint (model.pth) ({type(error).__name__})") from None
    models = []
    for weights in (state, None):
        torch.manual_seed(args["seed"])
        model = VICRegL(args["arch"], mlp=args["mlp"], maps_mlp=args["maps_mlp"],
                        num_classes=state["classifier.weight"].shape[0], local=args["alpha"] < 1)
        if weights is not None:
            model.load_state_dict(weights)
        models.append(model.eval())
    return models


@torch.no_grad()
def local_features(model, images):
    """images (N, 3, S, S) -> {"backbone": (N, h, w, C) the last map's cells, "projector": (N, h, w, D) the
    local projector's z of each cell (eval mode), when the model has one}."""
    maps = model.backbone(images).permute(0, 2, 3, 1)  # (N, h, w, C)
    features = {"backbone": maps}
    if model.local:
        features["projector"] = model.maps_projector(maps.reshape(-1, maps.shape[-1])).reshape(*maps.shape[:3], -1)
    return features


def draw_pca(images, masks, columns, note):
    """One row per image: the image, its mask, then one PCA picture per (title, (N, h, w, 3)) column."""
    fig = Figure(figsize=(1.6 * (2 + len(columns)), 1.6 * len(images) + 0.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(images), 2 + len(columns), squeeze=False)
    for row, (image, mask) in enumerate(zip(images, masks)):
        pictures = [("image", unnormalize(image)), ("mask", mask)]
        pictures += [(title, rgb[row].numpy()) for title, rgb in columns]
        for ax, (title, picture) in zip(axes[row], pictures):
            ax.imshow(picture, interpolation="nearest", cmap="tab10" if title == "mask" else None,
                      vmin=0, vmax=9 if title == "mask" else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.suptitle(note, fontsize=8)
    return fig


# -----------------------------------------------------------------------------

def get_arguments(argv=None):
    parser = argparse.ArgumentParser(
        description="Draw the paper's Figure 3 (feature- and location-based matches between two views "
        "of an image), or, with --stats, the training curves of a stats.jsonl, or, with --pca, the local "
        "features of toy images in colour (random init beside trained).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = parser.add_argument
    a("--out", required=True, help="output image file (.png, .pdf, .svg, ...)")
    a("--stats", default=None, help="EXP_DIR/stats.jsonl of train.py: draw the training curves instead")
    a("--pca", default=None, metavar="MODEL_PTH",
      help="a train.py checkpoint (EXP_DIR/model.pth): draw the first three principal components of the local "
      "features of toy val images (--pca-images) as RGB, random init beside trained, instead")
    a("--pca-images", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5], metavar="INDEX",
      help="--pca: toy val images, drawn at their training size (64 px)")
    a("--image", default=None, help="seed image (default: matplotlib's sample photo grace_hopper.jpg)")
    a("--toy-image", type=int, default=None, metavar="INDEX",
      help=f"seed image: this toy val image, drawn at {TOY_IMAGE_SIZE} px (the same scene as at 64, sharper); "
      "also prints how many matches join two cells on the same region of its mask")
    a("--arch", default="convnext_small", choices=ARCHS, help="backbone (random init without --pretrained)")
    a("--pretrained", default=None, help="backbone.pth, a full model.pth, or a released backbone file")
    a("--size", type=int, default=224, help="view resolution")
    a("--seed", type=int, default=0, help="seed of the views (and of a random-init backbone)")
    a("--num-show", type=int, default=10, help=f"matches drawn per panel, of the {NUM_KEPT} kept")
    a("--ignore-flips", action="store_true",
      help="location matches as if no view were flipped (train.py --ignore-flips): mirrored places get matched")
    args = parser.parse_args(argv)
    if args.image is not None and args.toy_image is not None:
        parser.error("give --image or --toy-image, not both")
    if args.toy_image is not None and not 0 <= args.toy_image < data.ToyShapes.SPLITS["val"][1]:
        parser.error(f"--toy-image must be in [0, {data.ToyShapes.SPLITS['val'][1]}), got {args.toy_image}")
    if args.size < 32:
        parser.error("--size must be at least 32")
    if args.num_show < 1:
        parser.error("--num-show must be at least 1")
    return args


def main(argv=None):
    args = get_arguments(argv)
    if args.stats is not None:
        fig = draw_curves(*read_stats(args.stats))
    elif args.pca is not None:
        trained, random_init = load_run(args.pca)
        toy = data.ToyShapes("val")
        if not all(0 <= i < len(toy) for i in args.pca_images):
            raise ValueError(f"--pca-images must be in [0, {len(toy)})")
        images = torch.stack([data.to_normalized_tensor(toy.image(i)) for i in args.pca_images])  # (N, 3, 64, 64)
        columns = []
        for name, model in (("random init", random_init), ("trained", trained)):
            for layer, features in local_features(model, images).items():
                columns.append((f"{layer}, {name}", pca_rgb(features)))
        columns.sort(key=lambda column: column[0].split(",")[0])  # backbone pair, then projector pair
        h, w = columns[0][1].shape[1:3]
        fig = draw_pca(images, [toy.mask(i) for i in args.pca_images], columns,
                       f"{args.pca}: principal components 1-3 (R, G, B) of the {h}x{w} cells of "
                       f"{len(images)} toy val images,\none PCA per column over all its images")
    else:
        if args.toy_image is not None:
            toy = data.ToyShapes("val", image_size=TOY_IMAGE_SIZE)
            image, mask = toy.image(args.toy_image), toy.mask(args.toy_image)
        else:
            image = load_image(args.image or cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
        views, boxes, flips = make_views(image, args.size, args.seed)
        torch.manual_seed(args.seed)  # a random-init backbone is reproducible too
        backbone = build_backbone(args.arch, pretrained=args.pretrained)
        feature_matches, location_matches, map_size = compute_matches(backbone, views, boxes, flips,
                                                                      ignore_flips=args.ignore_flips)
        if args.toy_image is not None:
            same = same_region_counts(mask, boxes, flips, map_size, (feature_matches, location_matches))
            print(f"matches joining two cells on the same region of toy val image {args.toy_image}: "
                  f"feature {same[0]} of {len(feature_matches[0])}, location {same[1]} of {len(location_matches[0])}")
        weights = os.path.basename(args.pretrained) if args.pretrained else "random init"
        note = (f"backbone {args.arch} ({weights}), features: its final map, {map_size[0]}x{map_size[1]} cells "
                f"per {args.size}-px view; seed {args.seed}")
        if args.ignore_flips:
            note += "; location grids ignore flips"
        fig = draw_matches(image, views, boxes, flips, map_size, feature_matches, location_matches,
                           args.num_show, backbone_note=note)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, OSError) as error:
        message = " ".join(str(error).split())  # always one line
        print(f"visualize.py: error: {message}", file=sys.stderr)
        sys.exit(2)
