"""Grad-CAM: a heatmap per image for convolutional backbones and ViT, mapped back onto the
original image's pixels, written by predict explain=DIR; and on shapes whose boxes were written
when they were generated, the heatmap's peak lands on the shape."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from forkrun import run_python

from helpers import best_checkpoint, build, run_cli
from transfer_learning.data.demo import BOXES, generate_shapes
from transfer_learning.preprocessing import Preprocessing
from transfer_learning.results.explain import TARGET_LAYERS, gradcam, target_layer, to_original


@pytest.mark.parametrize(
    ("overrides", "size"),
    [
        ((), 64),  # EfficientNet-Lite0 (timm EfficientNet), the default
        (("model=resnet18", "model.weights=null"), 64),
        (("model=torchvision", "model.name=squeezenet1_1", "model.weights=null"), 64),  # not in the table
        (
            ("model=timm", "model.name=mobilenetv3_small_050", "model.weights=null"),
            64,
        ),  # timm's MobileNetV3: a class name torchvision shares
        (("model=vit_b_16", "model.weights=null"), 224),  # tokens laid out as the 14 x 14 patch grid
        (("model=torchvision", "model.name=swin_t", "model.weights=null"), 224),  # [B, H, W, C] maps
    ],
)
def test_a_heatmap_per_image_in_the_input_frame(shapes_dir, overrides, size):
    module, _ = build(shapes_dir, *overrides, image_size=size)
    x = torch.randn(3, 3, size, size)
    heatmaps = gradcam(module.net, x, [0, 1, 2])
    assert heatmaps.shape == (3, size, size) and torch.isfinite(heatmaps).all()
    assert heatmaps.min() >= 0 and heatmaps.flatten(1).max(1).values.le(1 + 1e-6).all()
    assert (heatmaps.flatten(1).max(1).values > 0).any()  # not all blank
    assert not any(p.grad is not None for p in module.net.parameters())  # no gradients left behind
    backbone = module.net.backbone
    target = target_layer(backbone, size)
    name = type(backbone).__name__
    if name == "VisionTransformer":
        assert target.prefix_tokens == 1 and target.layer is backbone.encoder.layers[-1].ln_1
    elif name == "SwinTransformer":
        assert target.channels_last and target.layer is backbone.norm
    elif name == "SqueezeNet":  # not in the table: its last 4-D output
        assert name not in TARGET_LAYERS and target.layer in list(backbone.modules())
    else:
        assert any(target.layer is getattr(backbone, a, None) for a in TARGET_LAYERS[name])


def test_a_frozen_backbone_still_gets_a_heatmap(shapes_dir):
    module, _ = build(shapes_dir, "strategy=feature_extract", image_size=64)
    assert not any(p.requires_grad for p in module.net.backbone.parameters())
    x = torch.randn(5, 3, 64, 64)
    frozen = gradcam(module.net, x, [0, 1, 2, 3, 4])
    assert frozen.flatten(1).max(1).values.gt(0).any()
    module.net.unfreeze_backbone()  # the same weights, trainable: the same explanation
    assert torch.allclose(gradcam(module.net, x, [0, 1, 2, 3, 4]), frozen, atol=1e-5)


def test_the_heatmap_lands_on_the_crop_of_the_original_image():
    # A 200 x 100 photo: the shorter side to 64 (x 0.64), a 56 px centre crop = 87.5 px of the
    # original, centred: columns 56..144 and rows 6..94 of the original get the heatmap.
    preprocessing = Preprocessing(crop_size=56, resize_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    heat = torch.zeros(56, 56)
    heat[:, 28:] = 1.0  # the right half of the crop
    out = to_original(heat, (200, 100), preprocessing)
    assert out.shape == (100, 200) and out.dtype == np.float32
    assert out[:, :56].max() == 0 and out[:, 145:].max() == 0 and out[:5].max() == 0 and out[95:].max() == 0
    assert out[50, 140] == pytest.approx(1.0) and out[50, 60] == pytest.approx(0.0)


@pytest.mark.slow
def test_the_peak_falls_on_the_shape_and_predict_writes_each_heatmap(tmp_path):
    data = generate_shapes(tmp_path / "shapes", images_per_class=60, image_size=96, boxes=True)
    boxes = {row["path"]: row for row in csv.DictReader((data / BOXES).open())}
    result = run_cli(tmp_path, "data=imagefolder", f"data.root={data}", "strategy=finetune",
                     "input.image_size=96", "trainer.max_epochs=4", "logger=csv")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test/acc"] >= 0.6, summary["test/acc"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "confident_mistakes.png" in report  # the grid, drawn with its Grad-CAM overlays

    output, explained = tmp_path / "preds.csv", tmp_path / "gradcam"
    checkpoint = best_checkpoint(tmp_path / "run")
    predicted = run_python(["-m", "transfer_learning.results.predict", f"ckpt_path={checkpoint}",
                            f"images={data}", f"output={output}", f"explain={explained}", "num_workers=0"],
                           cwd=tmp_path)  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert f"Grad-CAM of 300 image(s) in {explained}" in predicted.stderr
    rows = list(csv.DictReader(output.open()))
    hits = correct = 0
    share = 0.0
    seen: dict[str, int] = {}
    for row in rows:
        relative = Path(row["file"]).relative_to(data).as_posix()
        stem = Path(relative).stem
        seen[stem] = seen.get(stem, 0) + 1  # names repeat across class folders: -2, -3, ...
        name = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
        heat = np.load(explained / f"{name}.gradcam.npy")
        assert heat.shape == (96, 96) and (explained / f"{name}.gradcam.png").is_file()
        if row["predicted"] != relative.split("/")[0]:
            continue  # correctly classified images only
        box = [float(boxes[relative][k]) for k in ("x0", "y0", "x1", "y1")]
        y, x = np.unravel_index(int(heat.argmax()), heat.shape)
        correct += 1
        hits += box[0] <= x <= box[2] and box[1] <= y <= box[3]
        share += (box[2] - box[0]) * (box[3] - box[1]) / 96**2
    rate, chance = hits / correct, share / correct
    print(
        f"Grad-CAM peak inside the shape's box: {hits}/{correct} = {rate:.2f} (box area share {chance:.2f})"
    )
    assert correct >= 100 and rate > 0.5 and rate > chance + 0.15
