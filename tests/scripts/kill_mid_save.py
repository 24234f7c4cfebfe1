"""Save a LoRA adapter over an existing one, killed (os._exit) at each filesystem step in turn; report what is left.

Usage: python kill_mid_save.py BASE_DIR OUT_DIR PRISTINE_DIR REPORT_JSON

For kill point k = 1, 2, ... a forked child restores OUT_DIR from PRISTINE_DIR, patches the writers `save` uses
(os.replace, os.rename, os.symlink, os.unlink, os.rmdir) to count calls and `os._exit` at call k, and saves. The parent
then records the adapter files OUT_DIR shows (name -> content hash) and whether `load_adapter` takes them, until a
child finishes its save without reaching call k.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from sam2_peft.adapters import LoraMethod, load_adapter  # noqa: E402
from sam2_peft.models.loading import load_base_model  # noqa: E402

WATCHED = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "partial_config.json",
    "partial_model.safetensors",
    "sam2_peft.json",
    "README.md",
)
WRITERS = ("replace", "rename", "symlink", "unlink", "rmdir")
FINISHED = 3


def visible(folder: Path) -> dict[str, str]:
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in WATCHED if (folder / n).exists()}


def main(base_dir: str, out_dir: str, pristine_dir: str, report: str) -> None:
    out, pristine = Path(out_dir), Path(pristine_dir)
    model, _ = load_base_model(base_dir)
    method = LoraMethod("decoder", lora_r=8)
    model = method.prepare(model, base_dir)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    results = []
    for kill_at in range(1, 200):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(pristine, out, symlinks=True)
        child = os.fork()
        if child == 0:
            calls = [0]
            for name in WRITERS:
                original = getattr(os, name)

                def writer(*args, _original=original, **kwargs):
                    calls[0] += 1
                    if calls[0] == kill_at:
                        os._exit(0)
                    return _original(*args, **kwargs)

                setattr(os, name, writer)
            method.save(model, out, base_dir)
            os._exit(FINISHED)
        _, status = os.waitpid(child, 0)
        try:
            load_adapter(load_base_model(base_dir)[0], out)
            loads = True
        except Exception as err:  # noqa: BLE001 - any failure to load is what the test looks for
            loads = repr(err)[:300]
        finished = os.waitstatus_to_exitcode(status) == FINISHED
        results.append({"kill_at": kill_at, "finished": finished, "files": visible(out), "loads": loads})
        if finished:
            break
    Path(report).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
