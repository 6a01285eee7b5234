"""Tests of visualize.py: Figure 3 draws exactly matching.py's matches (flipped views included), the
location matches agree with a brute-force nearest-centre search, the PNG renders headless, the
training curves carry the file's values, and bad input gives a one-line error with exit code 2."""
import json
import re
import math
import pathlib
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib import cbook

import visualize
from model import build_backbone

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 128  # convnext_toy (total stride 16): an 8 x 8 map of 64 cells, of which 20 are kept


@pytest.fixture(scope="module")
def image():
    return visualize.load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone("convnext_toy").eval()


@pytest.fixture(scope="module")
def flipped_case(image):
    """Views of the first seed whose two views differ in their flip (one flipped, one not)."""
    for seed in range(100):
        views, boxes, flips = visualize.make_views(image, SIZE, seed)
        if flips[0] != flips[1]:
            return views, boxes, flips
    raise AssertionError("no seed in 0..99 gives one flipped and one unflipped view")


def brute_force_matches(queries, candidates, k):
    """Nearest candidate of every query by explicit loops (float64), then the k queries closest to
    their match (ties: lower index), in ascending query order -> list of (query, candidate)."""
    nearest = []
    for q in queries:
        distances = [math.dist(q, c) for c in candidates]
        best = min(range(len(candidates)), key=lambda j: (distances[j], j))
        nearest.append((distances[best], best))
    kept = sorted(range(len(queries)), key=lambda i: (nearest[i][0], i))[:k]
    return [(i, nearest[i][1]) for i in sorted(kept)]


def cell_centres_in_seed_image(box, flip, h, w):
    """Centres of an h x w map's cells in seed-image (row, col) pixels, cells row-major. A flipped
    view's column c shows the box's column w-1-c."""
    top, left, height, width = box
    centres = []
    for r in range(h):
        for c in range(w):
            box_col = w - 1 - c if flip else c
            centres.append((top + (r + 0.5) * height / h, left + (box_col + 0.5) * width / w))
    return centres


def drawn_segments(ax):
    """The match lines of a panel as ((x0, y0), (x1, y1)) rounded to 1e-6."""
    segments = set()
    for line in ax.lines:
        if line.get_gid() == "match":
            (x0, x1), (y0, y1) = line.get_xdata(), line.get_ydata()
            segments.add(tuple(round(float(v), 6) for v in (x0, y0, x1, y1)))
    return segments


def expected_segments(pairs, h, w):
    """Lines from view 1's cell centre to view 2's, view 2 drawn S (1 + VIEW_GAP) to the right."""
    offset = SIZE * (1 + visualize.VIEW_GAP)
    segments = set()
    for q, c in pairs:
        x0, y0 = (q % w + 0.5) * SIZE / w, (q // w + 0.5) * SIZE / h
        x1, y1 = offset + (c % w + 0.5) * SIZE / w, (c // w + 0.5) * SIZE / h
        segments.add(tuple(round(v, 6) for v in (x0, y0, x1, y1)))
    return segments


def test_views_are_reproducible_and_match_their_boxes(image):
    views_a, boxes_a, flips_a = visualize.make_views(image, SIZE, seed=5)
    views_b, boxes_b, flips_b = visualize.make_views(image, SIZE, seed=5)
    assert views_a.shape == (2, 3, SIZE, SIZE)
    assert torch.equal(views_a, views_b) and torch.equal(boxes_a, boxes_b) and torch.equal(flips_a, flips_b)
    assert not torch.equal(boxes_a, visualize.make_views(image, SIZE, seed=6)[1])
    for top, left, height, width in boxes_a.tolist():  # inside the image, area fraction 0.4-1
        assert 0 <= top and top + height <= image.height and 0 <= left and left + width <= image.width
        assert 0.4 - 0.02 <= height * width / (image.width * image.height) <= 1.0


def test_location_matches_pair_nearest_seed_image_centres_with_a_flip(backbone, flipped_case):
    views, boxes, flips = flipped_case
    _, (query, candidate), (h, w) = visualize.compute_matches(backbone, views, boxes, flips)
    assert (h, w) == (SIZE // 16, SIZE // 16)
    centres = [cell_centres_in_seed_image(boxes[v].tolist(), bool(flips[v]), h, w) for v in range(2)]
    expected = brute_force_matches(centres[0], centres[1], visualize.NUM_KEPT)
    assert list(zip(query.tolist(), candidate.tolist())) == expected
    # the flip matters: pretending no view is flipped pairs other cells
    unflipped = [cell_centres_in_seed_image(boxes[v].tolist(), False, h, w) for v in range(2)]
    assert brute_force_matches(unflipped[0], unflipped[1], visualize.NUM_KEPT) != expected


def test_feature_matches_are_nearest_cells_in_feature_space(backbone, flipped_case):
    views, boxes, flips = flipped_case
    (query, candidate), _, (h, w) = visualize.compute_matches(backbone, views, boxes, flips)
    with torch.no_grad():
        maps = backbone(views).double()  # (2, C, h, w)
    cells = [[maps[v, :, r, c].tolist() for r in range(h) for c in range(w)] for v in range(2)]
    assert list(zip(query.tolist(), candidate.tolist())) == brute_force_matches(cells[0], cells[1], visualize.NUM_KEPT)


@pytest.mark.parametrize("num_show", [visualize.NUM_KEPT, 10])
def test_drawn_lines_are_the_kept_matches(image, backbone, flipped_case, num_show):
    views, boxes, flips = flipped_case
    feature_matches, location_matches, (h, w) = visualize.compute_matches(backbone, views, boxes, flips)
    fig = visualize.draw_matches(image, views, boxes, flips, (h, w), feature_matches, location_matches,
                                 num_show=num_show)
    seed_ax, feature_ax, location_ax = fig.axes
    for ax, (query, candidate) in ((feature_ax, feature_matches), (location_ax, location_matches)):
        kept = expected_segments(zip(query.tolist(), candidate.tolist()), h, w)
        drawn = drawn_segments(ax)
        assert len(drawn) == num_show
        assert drawn == kept if num_show == visualize.NUM_KEPT else drawn < kept
        # the views are drawn as the network sees them: the (flipped) view tensors, un-normalised
        drawn_views = [im.get_array() for im in ax.get_images()]
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # ImageNet statistics
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        for v in range(2):
            expected_pixels = (views[v] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
            np.testing.assert_allclose(drawn_views[v], expected_pixels, atol=1e-6)
    # the seed panel frames the two crop boxes
    rectangles = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in seed_ax.patches]
    assert rectangles == [(l, t, wd, ht) for t, l, ht, wd in boxes.tolist()]


def test_figure_renders_headless_to_png(tmp_path, image, backbone, flipped_case):
    views, boxes, flips = flipped_case
    feature_matches, location_matches, map_size = visualize.compute_matches(backbone, views, boxes, flips)
    fig = visualize.draw_matches(image, views, boxes, flips, map_size, feature_matches, location_matches)
    path = tmp_path / "matches.png"
    fig.savefig(path)
    assert path.stat().st_size > 50_000
    pixels = matplotlib.image.imread(path)  # (H, W, 4) floats in [0, 1]
    width_in, height_in = fig.get_size_inches()
    assert pixels.shape == (round(height_in * visualize.DPI), round(width_in * visualize.DPI), 4)
    assert pixels[..., :3].std() > 0.1  # not a blank canvas


def test_curves_plot_the_file_values(tmp_path):
    keys = ["lr", "loss", "inv", "var", "cov", "local_inv", "local_var", "local_cov", "cls_loss", "top1", "rankme",
            "local_rankme"]
    records = [dict(step=s, epoch=s // 20, **{k: 0.1 * s + i for i, k in enumerate(keys)}) for s in (20, 40, 60)]
    evaluations = [dict(epoch=e, knn_top1=10.0 * e, knn_top5=20.0 * e, dense_miou=5.0 * e) for e in (1, 2)]
    path = tmp_path / "stats.jsonl"
    # as train.py --eval-freq 1 writes them: an evaluation after each epoch's log records
    path.write_text("".join(json.dumps(r) + "\n" for r in [records[0], evaluations[0], records[1], records[2],
                                                            evaluations[1]]))
    fig = visualize.draw_curves(*visualize.read_stats(path))
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert set(lines) == set(keys) | {"knn_top1", "knn_top5", "dense_miou"}
    for key in keys:
        assert list(lines[key].get_xdata()) == [20, 40, 60]
        assert list(lines[key].get_ydata()) == [r[key] for r in records]
    for key in ("knn_top1", "knn_top5", "dense_miou"):  # one panel, against epoch
        assert lines[key].axes is lines["knn_top1"].axes and list(lines[key].get_xdata()) == [1, 2]
        assert list(lines[key].get_ydata()) == [e[key] for e in evaluations]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match="line 2"):
        visualize.read_stats(path)


def test_bad_image_is_one_line_and_exit_code_2(tmp_path):
    not_an_image = tmp_path / "broken.jpg"
    not_an_image.write_text("this is not a JPEG")
    command = [sys.executable, "visualize.py", "--image", str(not_an_image), "--out", str(tmp_path / "x.png")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"visualize.py: error: cannot read image {not_an_image}")
    assert not (tmp_path / "x.png").exists()


def test_missing_stats_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="stats file not found"):
        visualize.main(["--stats", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.png")])


def test_ignore_flips_pairs_mirrored_places(backbone, flipped_case):
    views, boxes, flips = flipped_case
    _, (query, candidate), (h, w) = visualize.compute_matches(backbone, views, boxes, flips, ignore_flips=True)
    unflipped = [cell_centres_in_seed_image(boxes[v].tolist(), False, h, w) for v in range(2)]
    assert list(zip(query.tolist(), candidate.tolist())) == brute_force_matches(unflipped[0], unflipped[1],
                                                                              visualize.NUM_KEPT)


def test_toy_image_counts_the_matches_that_join_one_region(tmp_path, capsys):
    import data
    toy = data.ToyShapes("val", image_size=visualize.TOY_IMAGE_SIZE)
    # the 128-px rendering is the 64-px scene: its mask, sampled at the 64-px pixel centres, agrees
    small = data.ToyShapes("val").mask(3)
    assert (toy.mask(3)[::2, ::2] == small).mean() > 0.95
    for seed, ignore_flips in ((0, []), (1, ["--ignore-flips"])):
        out = tmp_path / f"m{seed}.png"
        visualize.main(["--arch", "resnet_toy", "--size", "48", "--toy-image", "3", "--seed", str(seed),
                        "--out", str(out)] + ignore_flips)
        line = capsys.readouterr().out.splitlines()[0]
        printed = [int(n) for pair in re.findall(r"(\d+) of (\d+)", line) for n in pair]
        assert out.exists()
        # brute force: the same views and matches, the mask read under every cell centre by hand
        image, mask = toy.image(3), toy.mask(3)
        views, boxes, flips = visualize.make_views(image, 48, seed)
        torch.manual_seed(seed)
        net = build_backbone("resnet_toy")
        matches = visualize.compute_matches(net, views, boxes, flips, ignore_flips=bool(ignore_flips))
        h, w = matches[2]
        centres = [cell_centres_in_seed_image(boxes[v].tolist(), bool(flips[v]), h, w) for v in range(2)]
        expected = []
        for query, candidate in matches[:2]:
            same = 0
            for q, c in zip(query.tolist(), candidate.tolist()):
                (r0, c0), (r1, c1) = centres[0][q], centres[1][c]
                same += int(mask[int(r0), int(c0)] == mask[int(r1), int(c1)])
            expected.append(same)
        assert printed == [expected[0], len(matches[0][0]), expected[1], len(matches[1][0])]


def test_toy_image_errors(tmp_path):
    for extra, message in ((["--toy-image", "1000"], "--toy-image must be in [0, 1000)"),
                           (["--toy-image", "1", "--image", "x.png"], "give --image or --toy-image")):
        result = subprocess.run([sys.executable, "visualize.py", "--out", str(tmp_path / "x.png")] + extra,
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- --pca

def test_pca_colours_are_the_first_three_principal_components_min_max_scaled():
    g = torch.Generator().manual_seed(0)
    # 4 images of 3 x 5 cells, 6 channels, with a clear order of variances along random directions
    basis = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    scales = torch.tensor([5.0, 3, 2, 0.5, 0.2, 0.1])
    features = (torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64) * scales) @ basis.T
    colours = visualize.pca_rgb(features.float())
    assert colours.shape == (4, 3, 5, 3)
    rows = features.reshape(-1, 6).numpy()
    covariance = np.cov(rows, rowvar=False)
    values, vectors = np.linalg.eigh(covariance)  # ascending
    top = vectors[:, ::-1][:, :3]
    projected = (rows - rows.mean(axis=0)) @ top  # (60, 3)
    for component in range(3):
        expected = (projected[:, component] - projected[:, component].min()) / np.ptp(projected[:, component])
        got = colours.reshape(-1, 3)[:, component].double().numpy()
        assert np.allclose(got, expected, atol=1e-5) or np.allclose(got, 1 - expected, atol=1e-5)  # sign free


def test_pca_figure_of_a_run_shows_its_initial_and_trained_features(tmp_path):
    """A run with learning rate 0 (AdamW: no step moves a weight, and convnext_toy has no BatchNorm
    statistics): its checkpoint's trained weights are its initial ones, so load_run's rebuilt random init
    must equal them. Then the figure's panels are the PCA colours of each model's local features."""
    import train
    train.main(["--dataset", "toy", "--arch", "convnext_toy", "--toy-images", "16", "--size-crops", "48", "24",
                "--num-crops", "2", "2", "--mlp", "16", "--maps-mlp", "8", "--batch-size", "16", "--base-lr", "0",
                "--epochs", "1", "--num-workers", "0", "--device", "cpu", "--seed", "3", "--exp-dir", str(tmp_path)])
    trained, random_init = visualize.load_run(str(tmp_path / "model.pth"))
    for key, value in trained.state_dict().items():
        assert torch.equal(value, random_init.state_dict()[key]), key
    visualize.main(["--pca", str(tmp_path / "model.pth"), "--pca-images", "2", "5", "--out", str(tmp_path / "pca.png")])
    assert (tmp_path / "pca.png").stat().st_size > 0
    toy = visualize.data.ToyShapes("val")
    images = torch.stack([visualize.data.to_normalized_tensor(toy.image(i)) for i in (2, 5)])
    features = visualize.local_features(trained, images)
    assert features["backbone"].shape == (2, 4, 4, 256) and features["projector"].shape == (2, 4, 4, 8)
    colours = visualize.pca_rgb(features["projector"])
    fig = visualize.draw_pca(images, [np.zeros((64, 64))] * 2, [("projector", colours)], "")
    shown = fig.axes[2].get_images()[0].get_array()  # row 0, the PCA column
    assert np.allclose(shown, colours[0].numpy())
    with pytest.raises(ValueError, match="not a train.py checkpoint"):
        torch.save(trained.backbone.state_dict(), tmp_path / "backbone_only.pth")
        visualize.load_run(str(tmp_path / "backbone_only.pth"))
