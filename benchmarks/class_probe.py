"""Do a frozen base's features tell the classes of a semantic folder apart? A linear probe per pixel.

For each image, the features of the base (prompt-free) at the mask decoder's resolution (a quarter of the input):
`encoder`, the image encoder's three feature maps, resized and stacked; `decoder`, the per-pixel embedding that the
mask decoder's tokens read their masks from (after its upscaling, what a learned token can only weigh linearly).
A linear classifier (class-balanced cross-entropy) fits the labelled pixels of the first images and is scored on the
rest: balanced accuracy over the classes (chance: 1 / classes) and the confusion matrix (rows: true class).

    python benchmarks/class_probe.py scenes/ --features encoder --model compact-synthetic
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sam2_peft.models.loading import load_base_model


def pixel_features(model, processor, image: Image.Image, kind: str) -> torch.Tensor:
    """`(h * w, channels)` features of one image at the decoder's mask resolution."""
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        if kind == "encoder":
            maps = list(model.vision_encoder(pixels, return_dict=True).fpn_hidden_states)
        else:  # the decoder's activation runs last on the upscaled embedding
            seen = []
            hook = model.mask_decoder.activation.register_forward_hook(lambda module, args, out: seen.append(out))
            model(pixel_values=pixels, multimask_output=False)
            hook.remove()
            maps = [seen[-1]]
    size = maps[0].shape[-2:] if kind == "decoder" else max((m.shape[-2:] for m in maps), key=lambda s: s[0])
    stacked = torch.cat([F.interpolate(m.float(), size=size, mode="bilinear") for m in maps], dim=1)[0]
    return stacked.flatten(1).T


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> torch.nn.Linear:
    """Linear classifier by full-batch Adam on class-balanced cross-entropy."""
    torch.manual_seed(0)
    weight = 1 / torch.bincount(y, minlength=classes).clamp(min=1).float()
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe(x), y, weight=weight / weight.mean()).backward()
        optimizer.step()
    return probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a semantic folder: images/, masks/ (class ids, 0 background)")
    parser.add_argument("--model", default="compact-synthetic", help="base model (default: %(default)s)")
    parser.add_argument("--features", choices=("encoder", "decoder"), default="encoder")
    parser.add_argument("--fit-fraction", type=float, default=0.8, help="images the probe fits (the first ones)")
    args = parser.parse_args()
    model, processor = load_base_model(args.model)
    model.eval()
    features, labels, image_of = [], [], []
    paths = sorted((args.data / "images").glob("*.png"))
    for index, path in enumerate(paths):
        x = pixel_features(model, processor, Image.open(path).convert("RGB"), args.features)
        side = int(len(x) ** 0.5)
        label = np.array(Image.open(args.data / "masks" / path.name).resize((side, side), Image.NEAREST)).ravel()
        kept = label > 0
        features.append(x[torch.from_numpy(kept)])
        labels.append(torch.from_numpy(label[kept].astype(np.int64) - 1))
        image_of.append(torch.full((int(kept.sum()),), index))
    x, y, image_of = torch.cat(features), torch.cat(labels), torch.cat(image_of)
    fit = image_of < int(args.fit_fraction * len(paths))
    mean, std = x[fit].mean(0), x[fit].std(0) + 1e-6
    x = (x - mean) / std
    classes = int(y.max()) + 1
    probe = fit_probe(x[fit], y[fit], classes)
    with torch.no_grad():
        predicted = probe(x[~fit]).argmax(1)
    confusion = torch.zeros(classes, classes)
    confusion.index_put_((y[~fit], predicted), torch.ones(len(predicted)), accumulate=True)
    confusion = confusion / confusion.sum(1, keepdim=True).clamp(min=1)
    print(f"{args.features} features: {x.shape[1]} channels; {int(fit.sum())} pixels fit, {int((~fit).sum())} scored")
    print(f"balanced accuracy {confusion.diag().mean():.3f} (chance {1 / classes:.3f}); confusion (rows: true class):")
    print(np.round(confusion.numpy(), 2))


if __name__ == "__main__":
    main()
