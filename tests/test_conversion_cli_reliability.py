"""Issue 16 ("Nothing silent"), item 4 and the converter's part of item 2: the conversion CLIs lose no data. Every
input path is checked first, a non-empty --output is replaced only with --overwrite (and as a whole), output ==
input is refused, a failed check (including the reload check) leaves nothing behind, and non-finite tensors are
refused before anything is written. Runs on a copy of the authors'-layout fixture (tests/fixtures/reference_tiny)."""

import shutil
from pathlib import Path

import pytest
import torch

import conversion.converted_folder as cf
from conversion.calm_conversion import convert_autoencoder
from conversion.convert_autoencoder_original_to_hf import main as convert_ae_main
from conversion.convert_calm_original_to_hf import main as convert_calm_main


FIXTURE = Path(__file__).parent / "fixtures" / "reference_tiny"


@pytest.fixture
def source(tmp_path) -> tuple[Path, Path]:
    calm, ae = tmp_path / "calm", tmp_path / "ae"
    shutil.copytree(FIXTURE / "calm", calm)
    shutil.copytree(FIXTURE / "ae", ae)
    return calm, ae


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".converting-" in p.name)


def run_cli(capsys, argv, main=convert_calm_main) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_an_existing_folder_is_kept_unless_overwrite_then_replaced_whole(source, tmp_path, capsys):
    calm, ae = source
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "model-00002-of-00002.safetensors").write_text("an old shard")
    before = snapshot(out)
    err = run_cli(capsys, ["--calm", str(calm), "--autoencoder", str(ae), "--output", str(out)])
    assert "is a non-empty folder: pass --overwrite to replace it" in err
    assert snapshot(out) == before

    convert_calm_main(["--calm", str(calm), "--autoencoder", str(ae), "--output", str(out), "--overwrite"])
    names = set(snapshot(out))
    assert "model.safetensors" in names and "model-00002-of-00002.safetensors" not in names  # no stale shard
    assert (out / "README.md").read_text() != "my notes"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("which", ["calm", "autoencoder", "parent"])
def test_output_equal_to_an_input_is_refused_even_with_overwrite(source, tmp_path, capsys, which):
    calm, ae = source
    target = {"calm": calm / ".." / "calm", "autoencoder": ae, "parent": tmp_path}[which]
    before = snapshot(tmp_path)
    err = run_cli(capsys, ["--calm", str(calm), "--autoencoder", str(ae), "--output", str(target), "--overwrite"])
    assert "would destroy the source" in err
    assert snapshot(tmp_path) == before


def test_every_input_path_is_checked_before_any_work(source, tmp_path, capsys):
    calm, ae = source
    out = tmp_path / "out"
    err = run_cli(capsys, ["--calm", str(calm), "--autoencoder", str(ae), "--output", str(out),
                           "--tokenizer", str(tmp_path / "no-tokenizer")])
    assert "--tokenizer" in err and "no-tokenizer' is not an existing folder" in err
    assert not out.exists() and leftovers(tmp_path) == []
    err = run_cli(capsys, ["--autoencoder", str(tmp_path / "nothing"), "--output", str(out)], main=convert_ae_main)
    assert "--autoencoder" in err and "is not an existing folder" in err
    assert not out.exists()


def test_a_failed_reload_check_leaves_nothing_behind(source, tmp_path, monkeypatch):
    calm, ae = source
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def failing_check(model, folder, seed=0):
        assert Path(folder).parent.parent == tmp_path and ".converting-" in Path(folder).parent.name  # staged
        raise ValueError("The reloaded folder does not reproduce the converted model")

    monkeypatch.setattr(cf, "verify_saved", failing_check)
    with pytest.raises(ValueError, match="does not reproduce"):
        convert_ae_main(["--autoencoder", str(ae), "--output", str(out), "--overwrite"])
    assert snapshot(out) == {"keep.txt": b"old"} and leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="does not reproduce"):
        convert_ae_main(["--autoencoder", str(ae), "--output", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_nonfinite_tensors_are_refused_before_writing(source, tmp_path):
    calm, ae = source
    state = torch.load(ae / "pytorch_model.bin", weights_only=True)
    key = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[key][0] = float("nan")
    torch.save(state, ae / "pytorch_model.bin")
    with pytest.raises(ValueError, match=rf"pytorch_model.bin holds non-finite values .*\['{key}'\]"):
        convert_autoencoder(ae)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="non-finite"):
        convert_calm_main(["--calm", str(calm), "--autoencoder", str(ae), "--output", str(out)])
    assert not out.exists() and leftovers(tmp_path) == []
