"""The bundled models: build the tiny presets, export them, share identical files, write goldens."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

from . import goldens, presets
from .run import export_model

TINY = ["tiny-schnell", "tiny-dev"]


def share_identical_files(primary: Path, secondary: Path) -> list[str]:
    """Replaces each file in `secondary` that is byte-identical to the same path in `primary` with a relative
    symlink, so the two tiny models together stay small (they share text encoders, VAE and tokenizers)."""
    shared = []
    for path in sorted(secondary.rglob("*")):
        if not path.is_file() or path.is_symlink() or path.name == "manifest.json":
            continue
        rel = path.relative_to(secondary)
        twin = primary / rel
        if twin.is_file() and filecmp.cmp(path, twin, shallow=False):
            path.unlink()
            path.symlink_to(os.path.relpath(twin, path.parent))
            shared.append(str(rel))
    return shared


def build_tiny(models_dir: Path, goldens_dir: Path | None, work_dir: Path, force: bool, log=print) -> None:
    models_dir, work_dir = Path(models_dir), Path(work_dir)
    exported = []
    for preset in TINY:
        p = presets.PRESETS[preset]
        ck = presets.build_checkpoint(preset, work_dir / preset)
        out = models_dir / p.name
        manifest = export_model(ck, out, validate=True, force=force, log=log)
        exported.append(out)
        if goldens_dir is not None:
            # txt2img, img2img/ and true_cfg/ goldens; files whose values did not change are not rewritten
            goldens.write_all(ck, Path(goldens_dir) / p.name, p.variant, manifest["defaults"]["t5_max_length"],
                              log=log)
    shared = share_identical_files(exported[0], exported[1])
    log(f"{exported[1].name} shares {len(shared)} files with {exported[0].name}: {', '.join(shared)}")


def build_preset_model(preset: str, out_dir: Path, work_dir: Path, force: bool, validate: bool, log=print,
                       lora_slots: bool | None = None) -> dict:
    ck = presets.build_checkpoint(preset, Path(work_dir) / preset)
    manifest = export_model(ck, out_dir, validate=validate, force=force, log=log, lora_slots=lora_slots)
    report_checkpoint(ck, log)
    return manifest


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def report_checkpoint(checkpoint: Path, log=print) -> None:
    """Says where a preset's diffusers checkpoint stays and how much disk it takes (it is kept: the next export of the
    same preset reuses it)."""
    log(f"the random-weight checkpoint stays in {checkpoint} ({folder_bytes(checkpoint) / 1e9:.2f} GB; reused by "
        f"the next export of this preset, delete the folder when done, or choose it with --work)")
