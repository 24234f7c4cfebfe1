"""The shared nuclei set as a two-class semantic folder: every nucleus of a U2OS image is class 1, of an NIH3T3 image
class 2 (the cell line each image's `manifest.csv` row names), for `sam2-peft train ptsam --mask-type semantic`.

The images are linked, not copied (research licence: read in place); the class maps are written to OUT_DIR, which
must be outside the repository. Each image shows one cell line, so the classes differ by nuclear appearance and by
whatever else differs between the two acquisitions; the validation split (the recipe's `--val-fraction`) is by image.

    python benchmarks/nuclei_two_classes.py ../shared/data/nuclei-coelho2009 nuclei-2class/
    sam2-peft train ptsam --model compact-synthetic --data nuclei-2class/ --mask-type semantic --val-fraction 0.2
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = {"u2os": 1, "nih3t3": 2}
"""Cell line -> class id."""


def write_two_class_folder(source: Path, out_dir: Path) -> int:
    """Write `out_dir/images` (links), `out_dir/masks` (class maps) and `classes.json`; return the image count."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(exist_ok=True)
    with open(source / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        name = f"{row['id']}.png"
        link = out_dir / "images" / name
        if not link.exists():
            link.symlink_to((source / "images" / name).resolve())
        instances = np.array(Image.open(source / "masks" / name))
        classes = np.where(instances > 0, CLASSES[row["cell_line"]], 0).astype(np.uint8)
        Image.fromarray(classes).save(out_dir / "masks" / name)
    names = {str(value): line for line, value in CLASSES.items()}
    (out_dir / "classes.json").write_text(json.dumps(names, indent=1))
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the nuclei-coelho2009 folder")
    parser.add_argument("out_dir", type=Path, help="where to write the two-class folder (outside the repository)")
    args = parser.parse_args()
    print(f"wrote {write_two_class_folder(args.source, args.out_dir)} images to {args.out_dir}")


if __name__ == "__main__":
    main()
