"""The command line: clear errors with exit code 2, and the LMDeploy-style commands."""

from __future__ import annotations

import pytest

from lmkiln.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_w_bits_other_than_4(capsys, tmp_path, tiny_llama_dir):
    code, err = run(capsys, "lite", "auto_awq", str(tiny_llama_dir), "--w-bits", "8",
                    "--work-dir", str(tmp_path / "o"))
    assert code == 2 and "--w-bits 8 is not supported" in err
    assert not (tmp_path / "o").exists()


def test_missing_model_dir(capsys, tmp_path):
    code, err = run(capsys, "lite", "rtn", str(tmp_path / "nope"), "--work-dir", str(tmp_path / "o"))
    assert code == 2 and "does not exist" in err


def test_unknown_calib_dataset(capsys, tmp_path, tiny_llama_dir):
    code, err = run(capsys, "lite", "calibrate", str(tiny_llama_dir), "--calib-dataset", "nosuchdata",
                    "--out", str(tmp_path / "s.safetensors"))
    assert code == 2 and "nosuchdata" in err
    assert not (tmp_path / "s.safetensors").exists()


def test_calib_seqlen_longer_than_context(capsys, tmp_path, tiny_llama_dir):
    text = tmp_path / "t.txt"
    text.write_text("w1 w2 " * 3000)
    code, err = run(capsys, "lite", "calibrate", str(tiny_llama_dir), "--calib-dataset", str(text),
                    "--calib-seqlen", "4096", "--calib-samples", "1",
                    "--out", str(tmp_path / "s.safetensors"))
    assert code == 2 and "4096" in err and "512" in err


def test_too_short_calibration_text(capsys, tmp_path, tiny_llama_dir):
    text = tmp_path / "t.txt"
    text.write_text("just a few words")
    code, err = run(capsys, "lite", "calibrate", str(tiny_llama_dir), "--calib-dataset", str(text),
                    "--calib-samples", "4", "--calib-seqlen", "64", "--out", str(tmp_path / "s.safetensors"))
    assert code == 2 and "--calib-samples" in err


def test_auto_awq_on_a_local_text(capsys, tmp_path, tiny_llama_dir):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 7919) % 300}" for i in range(3000)))
    out = tmp_path / "awq"
    code = main(["lite", "auto_awq", str(tiny_llama_dir), "--calib-dataset", str(text),
                 "--calib-samples", "4", "--calib-seqlen", "64", "--w-group-size", "64", "--search-scale",
                 "--work-dir", str(out), "--device", "cpu"])
    assert code == 0
    assert (out / "manifest.json").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("argv", [["lite"], ["eval"], ["bogus"]])
def test_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
