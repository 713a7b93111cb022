"""The SentencePiece tokenizer: exact round trips on real source code, LLaMA settings, determinism, errors."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from megallama.data.tokenizer import Tokenizer, sample_chunks, train_tokenizer
from megallama.errors import DataError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = sorted(STDLIB.glob("[a-h]*.py"))[:40]
HELD_OUT = [STDLIB / n for n in ("textwrap.py", "tokenize.py", "string.py", "pprint.py")]


def _texts(files):
    return [p.read_text(encoding="utf-8") for p in files]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return train_tokenizer(_texts(TRAIN_FILES), 700, str(tmp_path_factory.mktemp("tok") / "sp"), sample_mb=1.0, seed=7)


def test_round_trip_real_source_files_exactly(model):
    tok = Tokenizer(str(model))
    for path in HELD_OUT + TRAIN_FILES[:5]:
        text = path.read_text(encoding="utf-8")
        assert tok.decode(tok.encode(text)) == text, path


@pytest.mark.parametrize("text", [
    "def f(x):\n\tif x:\n\t\treturn  x  \n\n\n    # trailing   \n",
    "  leading spaces and trailing  ",
    "\r\nwindows\r\nlines\r\n",
    "unicode: é ß 漢字 🙂 \u200b end",
    "",
])
def test_round_trip_whitespace_and_unknown_utf8(model, text):
    tok = Tokenizer(str(model))
    assert tok.decode(tok.encode(text)) == text


def test_llama_settings(model):
    tok = Tokenizer(str(model))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, -1, 700)
    pieces = [tok.id_to_piece(i) for i in tok.encode("x = 12345")]
    assert [p for p in pieces if p.strip("▁").isdigit()] == list("12345")  # digits split
    assert [tok.id_to_piece(i) for i in tok.encode("漢")] == ["<0xE6>", "<0xBC>", "<0xA2>"]  # byte fallback
    assert tok.encode("ab", bos=True, eos=True)[0] == 1 and tok.encode("ab", bos=True, eos=True)[-1] == 2
    assert any(set(tok.id_to_piece(i)) == {"▁"} and len(tok.id_to_piece(i)) >= 4 for i in range(tok.vocab_size))


def test_same_inputs_and_seed_give_the_same_model(model, tmp_path):
    again = train_tokenizer(_texts(TRAIN_FILES), 700, str(tmp_path / "again"), sample_mb=1.0, seed=7)
    assert again.read_bytes() == model.read_bytes()
    assert Tokenizer(str(again)).fingerprint == Tokenizer(str(model)).fingerprint


def test_sampling_is_bounded_and_seeded():
    texts = [f"line {i}\n" * 600 for i in range(200)]  # ~1.4 MB
    a, b = sample_chunks(texts, 100_000, seed=1), sample_chunks(texts, 100_000, seed=1)
    assert a == b and sum(map(len, a)) <= 100_000 and a != sample_chunks(texts, 100_000, seed=2)


def test_bad_models_and_vocab_sizes(tmp_path, model):
    with pytest.raises(DataError, match="not found"):
        Tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a valid SentencePiece model"):
        Tokenizer(str(bad))
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(["abc"], 100, str(tmp_path / "small"))
    with pytest.raises(DataError, match="already exists"):
        train_tokenizer(["abc"], 700, str(model)[:-len(".model")])


def test_cli_trains_and_refuses_overwrite(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for p in TRAIN_FILES[:10]:
        (src / (p.stem + ".txt")).write_text(p.read_text(encoding="utf-8"))
    cmd = [sys.executable, "-m", "megallama", "tokenizer", "--input", str(src), "--vocab-size", "600",
           "--output", str(tmp_path / "m")]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert Tokenizer(str(tmp_path / "m.model")).vocab_size == 600
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"megallama tokenizer: error: '{tmp_path / 'm.model'}' already exists; "
        "pass --force to overwrite it or choose another --output"]


def test_vocab_too_large_for_the_text_says_lower_it(tmp_path):
    with pytest.raises(DataError, match=r"lower --vocab-size to at most \d+") as err:
        train_tokenizer(["tiny text, few pieces\n"], 5000, str(tmp_path / "big"))
    assert "raise --vocab-size" not in str(err.value)
    assert not (tmp_path / "big.model").exists()
    with pytest.raises(DataError, match="raise --vocab-size"):  # fewer ids than the alphabet needs
        train_tokenizer(["".join(map(chr, range(0x4e00, 0x4e00 + 400)))], 300, str(tmp_path / "small"))


@pytest.mark.parametrize("mb", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_sample_size_is_refused(tmp_path, mb):
    with pytest.raises(DataError, match="--sample-mb must be a positive number of megabytes"):
        train_tokenizer(_texts(TRAIN_FILES[:2]), 400, str(tmp_path / "t"), sample_mb=mb)
    assert not list(tmp_path.iterdir())
