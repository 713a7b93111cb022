"""Untrusted inputs: no code from a model directory ever runs (more: the run lock, malformed inputs
and checkpoint meta checks, each a one-line error with exit status 2)."""

import json
import subprocess
import sys

import pytest

from megallama.cli import main
from tests.launch import ROOT, env, megallama


def _one_line(capsys, status, fragment, prefix="megallama"):
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith(prefix) and fragment in err[0], err
    return err[0]


# ---- remote code ---------------------------------------------------------------------------------

def _custom_code_dir(d, marker):
    """A model directory whose config.json asks for its own Python code, which would leave ``marker``."""
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["EvilForCausalLM"], "model_type": "evil",
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}}))
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (d / "tokenizer.model").write_bytes(b"")
    return d


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["eval", "--task", "humaneval"],
                                     ["import-hf"]])
def test_a_model_directory_with_custom_code_is_refused(command, tmp_path, capsys):
    d = _custom_code_dir(tmp_path / "hf", tmp_path / "marker")
    args = [command[0], "--checkpoint", str(d), *command[1:]] if command[0] != "import-hf" \
        else ["import-hf", str(d), "--output", str(tmp_path / "out")]
    _one_line(capsys, main(args), "has 'auto_map': this model directory ships its own Python code")
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out").exists()


def test_custom_code_is_refused_through_the_real_cli_even_answering_yes(tmp_path):
    d = _custom_code_dir(tmp_path / "hf", tmp_path / "marker")
    r = subprocess.run(megallama("generate", "--checkpoint", str(d), "--prompt", "x"), cwd=ROOT, env=env(),
                       input="y\ny\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "auto_map" in r.stderr, r.stderr
    assert not (tmp_path / "marker").exists()


def test_load_pretrained_turns_remote_code_off(tmp_path):
    from megallama.errors import CheckpointError
    from megallama.hf_safe import check_no_remote_code, load_pretrained

    calls = []

    class Auto:
        @staticmethod
        def from_pretrained(path, **kw):
            calls.append((path, kw))
            return "model"

    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert load_pretrained(Auto, tmp_path / "ok", dtype="x") == "model"
    assert calls == [(str(tmp_path / "ok"), {"dtype": "x", "trust_remote_code": False, "local_files_only": True})]
    with pytest.raises(ValueError):
        load_pretrained(Auto, tmp_path / "ok", trust_remote_code=True)
    (tmp_path / "ok" / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["t.T", None]}}))
    with pytest.raises(CheckpointError, match="tokenizer_config.json' has 'auto_map'"):
        load_pretrained(Auto, tmp_path / "ok")
    with pytest.raises(CheckpointError, match="is not a local directory"):
        check_no_remote_code("meta-llama/Llama-2-7b-hf")
    assert len(calls) == 1
