"""Bad input through `python -m export`: exit code 2, ONE `error:` line naming the problem, no traceback, and
user folders left alone unless --force."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .conftest import run_cli_many

KEEP = "precious user data\n"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def cli(checkpoints, tmp_path_factory):
    """Prepares the broken inputs and starts every CLI run in the background; name -> (Future, paths)."""
    good = checkpoints["schnell"]
    root = tmp_path_factory.mktemp("cli")
    ck = root / "checkpoints"
    out = root / "out"
    ck.mkdir()
    out.mkdir()

    no_transformer = _copy(good, ck / "no-transformer")
    shutil.rmtree(no_transformer / "transformer")
    no_t5_config = _copy(good, ck / "no-t5-config")
    (no_t5_config / "text_encoder_2" / "config.json").unlink()
    not_flux = _copy(good, ck / "stable-diffusion")
    index = json.loads((not_flux / "model_index.json").read_text())
    (not_flux / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    truncated = _copy(good, ck / "truncated-transformer")
    weights = truncated / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:8])
    bad_vae_cfg = _copy(good, ck / "garbage-vae-config")
    (bad_vae_cfg / "vae" / "config.json").write_text("{ this is not json ]]")
    truncated_t5 = _copy(good, ck / "truncated-t5")
    t5_weights = truncated_t5 / "text_encoder_2" / "model.safetensors"
    t5_weights.write_bytes(t5_weights.read_bytes()[:100])
    bad_tokenizer = _copy(good, ck / "garbage-tokenizer")
    (bad_tokenizer / "tokenizer" / "tokenizer.json").write_text("garbage, not a tokenizer")

    occupied = out / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text(KEEP)
    replaced = out / "replaced"
    replaced.mkdir()
    (replaced / "old.txt").write_text(KEEP)
    layout_occupied = out / "layout-occupied"
    layout_occupied.mkdir()
    (layout_occupied / "keep.txt").write_text(KEEP)

    paths = {"occupied": occupied, "replaced": replaced, "layout_occupied": layout_occupied, "out": out}
    cases = {
        "missing_transformer": (no_transformer, out / "a"),
        "missing_t5_config": (no_t5_config, out / "b"),
        "not_flux": (not_flux, out / "c"),
        "nonexistent": (ck / "does-not-exist", out / "d"),
        "truncated_transformer": (truncated, out / "e"),
        "garbage_vae_config": (bad_vae_cfg, out / "f"),
        "truncated_t5": (truncated_t5, out / "g", "--components", "t5"),
        "garbage_tokenizer": (bad_tokenizer, out / "h", "--components", "clip"),
        "occupied": (good, occupied, "--components", "clip"),
        "replaced": (good, replaced, "--components", "clip", "--force"),
        "unknown_preset": ("preset", "tiny-nonsense", out / "i"),
        "unknown_component": (good, out / "j", "--components", "clip", "unet"),
        "layout_no_model": ("layout", "bfl", ck / "does-not-exist", out / "k"),
        "layout_not_a_model": ("layout", "optimum", good, out / "l"),
        "layout_occupied": ("layout", "bfl", "models/tiny-flux-schnell", layout_occupied),
    }
    return run_cli_many(cases), paths


def error_line(proc, *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one line with `error:`, which names every fragment."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    line = lines[0]
    for f in fragments:
        assert f in line, f"{f!r} not in {line!r}"
    return line


def result(cli, name):
    futures, _ = cli
    return futures[name].result()


def no_output(cli, name: str):
    _, paths = cli
    leftovers = [p for p in (paths["out"] / name, paths["out"] / f".{name}.partial") if p.exists()]
    assert leftovers == [], leftovers


@pytest.mark.parametrize("case, fragments, out_name", [
    ("missing_transformer", ["missing", "transformer/"], "a"),
    ("missing_t5_config", ["missing", "text_encoder_2/config.json"], "b"),
    ("not_flux", ["StableDiffusionPipeline", "not a Flux"], "c"),
    ("nonexistent", ["does-not-exist", "does not exist"], "d"),
])
def test_bad_checkpoint_folder(cli, case, fragments, out_name):
    line = error_line(result(cli, case), *fragments)
    assert line.startswith("error: ")
    no_output(cli, out_name)


@pytest.mark.parametrize("case, fragments, out_name", [
    ("truncated_transformer", ["transformer", "truncated-transformer", "corrupt"], "e"),
    ("garbage_vae_config", ["VAE", "vae", "config.json"], "f"),
    ("truncated_t5", ["T5", "text_encoder_2", "corrupt"], "g"),
    ("garbage_tokenizer", ["tokenizer", "clip"], "h"),
])
def test_corrupt_file_in_checkpoint(cli, case, fragments, out_name):
    line = error_line(result(cli, case), *fragments)
    assert line.startswith("error: ")
    no_output(cli, out_name)


def test_existing_output_folder_is_kept_without_force(cli):
    line = error_line(result(cli, "occupied"), "occupied", "--force")
    assert line.startswith("error: ")
    occupied = cli[1]["occupied"]
    assert sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]
    assert (occupied / "keep.txt").read_text() == KEEP
    assert not (occupied.parent / ".occupied.partial").exists()


def test_existing_output_folder_is_replaced_with_force(cli):
    proc = result(cli, "replaced")
    assert proc.returncode == 0, proc.stderr
    replaced = cli[1]["replaced"]
    assert sorted(p.name for p in replaced.iterdir()) == ["clip.onnx", "manifest.json", "tokenizer"]
    manifest = json.loads((replaced / "manifest.json").read_text())
    assert list(manifest["graphs"]) == ["clip"] and list(manifest["tokenizers"]) == ["clip"]
    assert manifest["name"] == "replaced"
    assert not (replaced.parent / ".replaced.partial").exists()


def test_unknown_preset_is_refused(cli):
    line = error_line(result(cli, "unknown_preset"), "tiny-nonsense", "tiny-schnell")
    assert line.startswith("error: ")
    no_output(cli, "i")


def test_unknown_component_is_refused(cli):
    error_line(result(cli, "unknown_component"), "--components", "unet")
    no_output(cli, "j")


def test_layout_of_a_missing_model_folder(cli):
    line = error_line(result(cli, "layout_no_model"), "does-not-exist", "manifest.json")
    assert line.startswith("error: ")
    no_output(cli, "k")


def test_layout_of_a_checkpoint_instead_of_a_model(cli):
    line = error_line(result(cli, "layout_not_a_model"), "manifest.json")
    assert line.startswith("error: ")
    no_output(cli, "l")


def test_layout_does_not_touch_an_existing_folder(cli):
    line = error_line(result(cli, "layout_occupied"), "layout-occupied", "not empty")
    assert line.startswith("error: ")
    occupied = cli[1]["layout_occupied"]
    assert sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]
    assert (occupied / "keep.txt").read_text() == KEEP


@pytest.mark.parametrize("module", ["onnx", "torch"])
def test_a_python_without_the_stack_gets_one_line_naming_the_install_command(module, tmp_path):
    """As from a system Python: the export step's packages cannot be imported (here: blocked)."""
    import subprocess
    import sys

    from .conftest import REPO

    code = (f"import sys, runpy; sys.modules[{module!r}] = None; sys.argv = ['export', 'tiny', '--models', "
            f"{str(tmp_path / 'models')!r}]; runpy.run_module('export', run_name='__main__', alter_sys=True)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"has no `{module}`" in lines[0] and "bash scripts/export-env.sh" in lines[0], lines[0]
    assert not (tmp_path / "models").exists()


def test_every_option_of_every_command_has_help():
    import argparse

    from export import __main__ as cli

    missing = []

    def walk(parser, name):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub_name, sub in a.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif not a.help:
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")

    walk(cli.export_parser(), "python -m export")
    walk(cli.sub_parser(), "python -m export")
    assert not missing, missing
