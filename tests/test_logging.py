"""What a run logs: `loss` is the VICRegL criterion (paper eq. 6) alone, the online probe's
cross-entropy has a name of its own (`cls_loss`), and the step still trains the probe."""
import json
import re

import pytest
import torch

import train
from loss import VICRegLLoss
from matching import location_grid
from model import VICRegL

ALPHA = 0.6  # not the default, so that a weighting fixed at 0.75 would show
# 16 toy images, batch 8: 2 steps, each logged; 32-px and 16-px views (4x4 and 2x2 maps)
RUN = ["--dataset", "toy", "--toy-images", "16", "--toy-val-images", "8", "--arch", "resnet_toy",
       "--size-crops", "32", "16", "--num-crops", "2", "2", "--num-matches", "6", "2", "--mlp", "16",
       "--maps-mlp", "16", "--batch-size", "8", "--epochs", "1", "--warmup-epochs", "1", "--num-workers", "0",
       "--device", "cpu", "--log-freq", "1", "--alpha", str(ALPHA)]
TERMS = ("inv", "var", "cov", "local_inv", "local_var", "local_cov")


def test_logged_loss_is_the_criterion_and_the_probe_loss_is_logged_apart(tmp_path, capsys):
    train.main(RUN + ["--exp-dir", str(tmp_path)])
    records = [json.loads(line) for line in open(tmp_path / "stats.jsonl")]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [r["step"] for r in records] == [1, 2] and len(lines) == 2
    for record, line in zip(records, lines):
        inv, var, cov, local_inv, local_var, local_cov = (record[name] for name in TERMS)
        criterion = ALPHA * (inv + var + cov) + (1 - ALPHA) * (local_inv + local_var + local_cov)
        assert record["loss"] == pytest.approx(criterion, rel=1e-6)
        # the probe's cross-entropy over 8 classes, about ln 8 at the start, is not in `loss`
        assert 1.0 < record["cls_loss"] < 4.0
        printed = dict(re.findall(r"(\w+) (-?[\d.]+(?:e-?\d+)?)", line))
        assert float(printed["loss"]) == pytest.approx(record["loss"], abs=1e-4)
        assert float(printed["cls_loss"]) == pytest.approx(record["cls_loss"], abs=1e-3)


def test_the_step_backwards_the_criterion_plus_the_probe_loss():
    torch.manual_seed(0)
    model = VICRegL("resnet_toy", mlp="16", maps_mlp="16", num_classes=8)
    criterion = VICRegLLoss(alpha=ALPHA, num_matches=(4, 2))
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [8.0, 4.0, 40.0, 48.0], [20.0, 30.0, 20.0, 16.0]]).expand(4, 3, 4)
    flips = torch.tensor([False, True, False]).expand(4, 3)
    labels = torch.tensor([0, 3, 5, 7])
    total, stats, (embeddings, maps, logits) = train.compute_loss(model, criterion, views, boxes, flips, labels)

    # recomputed here from the model's outputs: the criterion, and the cross-entropy of the probe
    grids = [location_grid(boxes[:, v], flips[:, v], m.shape[1:3]) for v, m in enumerate(maps)]
    expected_criterion, _ = criterion(embeddings, maps, grids)
    expected_cls = torch.nn.functional.cross_entropy(logits, labels)
    torch.testing.assert_close(stats["loss"], expected_criterion.detach())
    torch.testing.assert_close(stats["cls_loss"], expected_cls.detach())
    torch.testing.assert_close(total, expected_criterion + expected_cls)
    # the probe learns from `total`
    total.backward()
    assert model.classifier.weight.grad.abs().sum() > 0
