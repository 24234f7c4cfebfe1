"""The benchmark scripts that build data: the nuclei set as two classes (read in place, class maps written apart)."""

import json

import numpy as np
from PIL import Image

from benchmarks.nuclei_two_classes import write_two_class_folder
from sam2_peft.data.classes import check_classes, named_classes
from sam2_peft.data.sources import open_records


def _fake_nuclei(root):
    """Two images in the nuclei set's layout: one per cell line, instance labels, the manifest naming the lines."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["id,cell_line,height,width,n_instances"]
    for index, line in enumerate(("u2os", "nih3t3")):
        name = f"{line}_dna-{index}"
        Image.fromarray(np.full((20, 30), 40 * index, np.uint8)).save(root / "images" / f"{name}.png")
        labels = np.zeros((20, 30), np.uint8)
        labels[2:8, 2:8], labels[10:18, 12:20] = 1, 2  # two nuclei
        Image.fromarray(labels).save(root / "masks" / f"{name}.png")
        rows.append(f"{name},{line},20,30,2")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def test_nuclei_become_one_class_per_cell_line_with_the_images_linked(tmp_path):
    source, out = _fake_nuclei(tmp_path / "nuclei"), tmp_path / "two"
    assert write_two_class_folder(source, out) == 2
    assert json.loads((out / "classes.json").read_text()) == {"1": "u2os", "2": "nih3t3"}
    for name, value in (("u2os_dna-0", 1), ("nih3t3_dna-1", 2)):
        assert (out / "images" / f"{name}.png").is_symlink()
        classes = np.array(Image.open(out / "masks" / f"{name}.png"))
        instances = np.array(Image.open(source / "masks" / f"{name}.png"))
        assert set(np.unique(classes)) == {0, value} and np.array_equal(classes > 0, instances > 0)
    records = open_records(str(out), mask_type="semantic")
    assert check_classes(records, named_classes(str(out), None), 255, str(out)).names == ("u2os", "nih3t3")
