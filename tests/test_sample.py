"""`quantize sample`: determinism, real text windows, local sources, and the error contract."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from quantize import manifest as mf
from quantize.calibration import (
    CALIBRATION_FILE,
    draw_windows,
    load_calibration,
    resolve_dataset,
    tokenizer_hash,
)
from quantize.calibration import registry as reg
from quantize.cli import main
from quantize.errors import InputError, IntegrityError

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "quantize" / "testing" / "assets" / "tokenizer"
WIKITEXT = REPO / "calibration" / "wikitext2" / "valid.txt"
EOS = 1


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def sample(capsys, out: Path, dataset: str | Path = "wikitext2", samples=8, seq_len=64, seed=0, *extra):
    return run(
        capsys, "sample", "--model", TOKENIZER, "--dataset", dataset, "--samples", samples,
        "--seq-len", seq_len, "--seed", seed, "--out", out, *extra,
    )


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("!! error:")]
    assert len(lines) == 1, err
    return lines[0]


def _clean(text: str) -> str:
    # a window can start or end inside a multi-byte character
    return text.strip("\ufffd")


# ----------------------------------------------------------------------------------------------
# the bundled corpus: determinism and real windows


@pytest.fixture(scope="module")
def wikitext_runs(tmp_path_factory):
    """Three runs over bundled wikitext2: seed 0 twice, seed 1 once (16 x 256 tokens)."""
    root = tmp_path_factory.mktemp("wikitext")
    outs = {}
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = root / key
        code = main(["sample", "--model", str(TOKENIZER), "--dataset", "wikitext2", "--samples", "16",
                     "--seq-len", "256", "--seed", str(seed), "--out", str(out)])
        assert code == 0
        outs[key] = out
    return outs


def test_same_seed_same_bytes_other_seed_differs(wikitext_runs):
    a, b, c = (wikitext_runs[k] for k in "abc")
    assert _sha(a / CALIBRATION_FILE) == _sha(b / CALIBRATION_FILE)
    ma, mb, mc = (mf.load_manifest(d, required=True) for d in (a, b, c))
    assert ma.outputs == mb.outputs and ma.params == mb.params
    assert _sha(a / CALIBRATION_FILE) != _sha(c / CALIBRATION_FILE)
    assert ma.outputs != mc.outputs


def test_output_tensor_and_manifest(wikitext_runs):
    out = wikitext_runs["a"]
    tensors = load_file(str(out / CALIBRATION_FILE))
    assert list(tensors) == ["input_ids"]
    ids = tensors["input_ids"]
    assert ids.dtype == np.int32 and ids.shape == (16, 256)
    assert 0 <= ids.min() and ids.max() < 1024
    m = mf.load_manifest(out, required=True)
    assert m.stage == "sample" and m.status == "complete"
    p = m.params
    assert (p["n_samples"], p["seq_len"], p["seed"]) == (16, 256, 0)
    assert p["dataset"]["kind"] == "bundled" and p["dataset"]["name"] == "wikitext2"
    assert p["dataset"]["fingerprint"] == _sha(WIKITEXT)
    assert p["tokenizer_sha256"] == tokenizer_hash(TOKENIZER)
    assert p["vocab_size"] == 1024 and p["tokens_available"] > 16 * 256
    roles = {i.role: i for i in m.inputs}
    assert {f.path for f in roles["model"].files} == {"tokenizer.json", "tokenizer_config.json"}
    assert roles["dataset"].files[0].sha256 == _sha(WIKITEXT)
    assert not list(out.parent.glob("*.partial"))


def _assert_disjoint_spans(ids: np.ndarray, text: str, tokenizer) -> None:
    """Every row decodes to a unique span of ``text``, and no two spans overlap."""
    spans = []
    for row in ids:
        piece = _clean(tokenizer.decode(row.tolist()))
        at = text.find(piece)
        assert at >= 0, piece[:80]
        assert text.find(piece, at + 1) == -1  # long wikitext windows are unique
        spans.append((at, at + len(piece)))
    spans.sort()
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), "windows overlap"


def test_windows_are_disjoint_spans_of_the_corpus(wikitext_runs, tokenizer):
    text = WIKITEXT.read_text(encoding="utf-8")
    ids = load_file(str(wikitext_runs["a"] / CALIBRATION_FILE))["input_ids"]
    _assert_disjoint_spans(ids, text, tokenizer)
    # rows are shuffled, not in corpus order
    starts = [text.find(_clean(tokenizer.decode(r.tolist()))) for r in ids]
    assert starts != sorted(starts)


def test_verify_then_flip_a_byte(wikitext_runs, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(wikitext_runs["a"], out)
    assert run(capsys, "verify", out)[0] == 0
    path = out / CALIBRATION_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    code, _, err = run(capsys, "verify", out)
    assert code == 1 and CALIBRATION_FILE in err
    with pytest.raises(IntegrityError):
        load_calibration(out)


def test_load_calibration(wikitext_runs, tmp_path):
    import torch

    ids, m = load_calibration(wikitext_runs["a"], model_dir=TOKENIZER)
    assert ids.dtype == torch.int32 and tuple(ids.shape) == (16, 256)
    assert np.array_equal(ids.numpy(), load_file(str(wikitext_runs["a"] / CALIBRATION_FILE))["input_ids"])
    assert m.stage == "sample"
    # a model whose tokenizer differs is refused
    other = tmp_path / "other-model"
    shutil.copytree(TOKENIZER, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 1234
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokenizer_hash(other) != tokenizer_hash(TOKENIZER)
    with pytest.raises(InputError, match="different tokenizer"):
        load_calibration(wikitext_runs["a"], model_dir=other)
    # not a sample output
    fake = tmp_path / "fake"
    shutil.copytree(wikitext_runs["a"], fake)
    data = json.loads((fake / "manifest.json").read_text())
    data["stage"] = "gptq"
    (fake / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="not a calibration set"):
        load_calibration(fake)


# ----------------------------------------------------------------------------------------------
# the window rule


@pytest.mark.parametrize("n_tokens,n,length", [(1000, 7, 100), (700, 7, 100), (10_000, 64, 1), (5, 1, 5)])
def test_draw_windows_in_bounds_and_disjoint(n_tokens, n, length):
    starts = draw_windows(n_tokens, n, length, np.random.default_rng([3, 1]))
    assert starts.shape == (n,)
    s = np.sort(starts)
    assert s[0] >= 0 and s[-1] + length <= n_tokens
    assert np.all(s[1:] - s[:-1] >= length)
    again = draw_windows(n_tokens, n, length, np.random.default_rng([3, 1]))
    assert np.array_equal(starts, again)
    if n_tokens == n * length:  # exact fit tiles the stream
        assert np.array_equal(s, np.arange(n) * length)


def test_token_stream_budget_and_separators(tokenizer):
    from quantize.calibration.sample import _DOCS_PER_BATCH, token_stream

    docs = [f"document number {i} says hello ." for i in range(3 * _DOCS_PER_BATCH)]
    full, used = token_stream(tokenizer, docs, [EOS], budget=10**9, rng=np.random.default_rng([0, 0]))
    assert used == len(docs) and int((full == EOS).sum()) == len(docs) - 1
    assert full[0] != EOS and full[-1] != EOS
    # a small budget stops after the first batch of documents, drawn in seeded random order
    part, used = token_stream(tokenizer, docs, [EOS], budget=10, rng=np.random.default_rng([0, 0]))
    assert used == _DOCS_PER_BATCH and 10 <= part.size < full.size
    again, _ = token_stream(tokenizer, docs, [EOS], budget=10, rng=np.random.default_rng([0, 0]))
    other, _ = token_stream(tokenizer, docs, [EOS], budget=10, rng=np.random.default_rng([1, 0]))
    assert np.array_equal(part, again) and not np.array_equal(part, other)
    first = tokenizer.decode(part[: int(np.flatnonzero(part == EOS)[0])].tolist())
    assert first in docs  # decodes back to one whole document


def test_tokenize_corpus_is_the_whole_text_in_order(tokenizer):
    from quantize.calibration import tokenize_corpus

    corpus = resolve_dataset("wikitext2-test")
    ids = tokenize_corpus(corpus, tokenizer)
    assert ids.dim() == 1 and ids.dtype.is_floating_point is False
    assert tokenizer.decode(ids.tolist()) == corpus.documents[0]


def test_calibration_file_bytes_are_stable(tmp_path):
    """Repeated writes in one process give the same bytes (safetensors metadata order is not stable
    with more than one key)."""
    from quantize.calibration.sample import write_calibration

    ids = np.arange(64, dtype=np.int32).reshape(4, 16)
    digests = set()
    for i in range(16):
        write_calibration(tmp_path / f"{i}.safetensors", ids)
        digests.add(_sha(tmp_path / f"{i}.safetensors"))
    assert len(digests) == 1


def test_draw_windows_refuses_too_few_tokens():
    with pytest.raises(ValueError):
        draw_windows(99, 10, 10, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------
# local sources


def _docs() -> list[str]:
    paras = [ln for ln in WIKITEXT.read_text(encoding="utf-8").splitlines() if len(ln) > 400]
    return paras[:40]


def _check_pieces(out: Path, tokenizer, docs: list[str]) -> None:
    """Every EOS-free piece of every row decodes to text inside one document."""
    ids = load_file(str(out / CALIBRATION_FILE))["input_ids"]
    pieces = 0
    for row in ids:
        cuts = [-1, *np.flatnonzero(row == EOS).tolist(), len(row)]
        for lo, hi in zip(cuts, cuts[1:]):
            seg = row[lo + 1 : hi].tolist()
            if len(seg) < 4:
                continue
            piece = _clean(tokenizer.decode(seg))
            assert any(piece in d for d in docs), piece[:80]
            pieces += 1
    assert pieces >= len(ids)


def test_local_txt(tmp_path, capsys, tokenizer):
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(_docs()), encoding="utf-8")
    code, stdout, _ = sample(capsys, tmp_path / "out", src, 8, 64)
    assert code == 0 and "sampled 8 x 64" in stdout
    m = mf.load_manifest(tmp_path / "out", required=True)
    assert m.params["dataset"]["kind"] == "local" and m.params["dataset"]["fingerprint"] == _sha(src)
    text = src.read_text(encoding="utf-8")
    for row in load_file(str(tmp_path / "out" / CALIBRATION_FILE))["input_ids"]:
        assert _clean(tokenizer.decode(row.tolist())) in text


def test_tight_fit_still_disjoint(tmp_path, capsys, tokenizer):
    """With the windows covering ~90% of the stream, overlapping draws would show."""
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(_docs()[:12]), encoding="utf-8")
    text = src.read_text(encoding="utf-8")
    total = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = (total * 9 // 10) // 64
    code, _, err = sample(capsys, tmp_path / "out", src, n, 64, 5)
    assert code == 0, err
    assert mf.load_manifest(tmp_path / "out", required=True).params["tokens_available"] == total
    _assert_disjoint_spans(load_file(str(tmp_path / "out" / CALIBRATION_FILE))["input_ids"], text, tokenizer)


def test_local_jsonl_and_parquet(tmp_path, capsys, tokenizer):
    import pandas as pd

    docs = _docs()
    rows = [{"id": i, "text": d} for i, d in enumerate(docs)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    parquet = tmp_path / "docs.parquet"
    pd.DataFrame(rows).to_parquet(parquet)

    for src in (jsonl, parquet):
        out = tmp_path / f"out-{src.suffix[1:]}"
        code, _, err = sample(capsys, out, src, 8, 64)
        assert code == 0, err
        p = mf.load_manifest(out, required=True).params
        assert p["dataset"]["kind"] == "local" and p["dataset"]["text_field"] == "text"
        assert p["dataset"]["fingerprint"] == _sha(src)
        assert p["documents_total"] == len(docs)
        _check_pieces(out, tokenizer, docs)
    # same rows, same seed: both file types give the same windows
    a = load_file(str(tmp_path / "out-jsonl" / CALIBRATION_FILE))["input_ids"]
    b = load_file(str(tmp_path / "out-parquet" / CALIBRATION_FILE))["input_ids"]
    assert np.array_equal(a, b)


def test_directory_of_text_files(tmp_path, capsys, tokenizer):
    docs = _docs()[:10]
    src = tmp_path / "corpus"
    src.mkdir()
    for i, d in enumerate(docs):
        (src / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    code, _, err = sample(capsys, tmp_path / "out", src, 4, 64)
    assert code == 0, err
    m = mf.load_manifest(tmp_path / "out", required=True)
    assert m.params["documents_total"] == 10
    assert len(next(i for i in m.inputs if i.role == "dataset").files) == 10
    _check_pieces(tmp_path / "out", tokenizer, docs)


def test_custom_text_field(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in _docs()), encoding="utf-8")
    code, _, err = sample(capsys, tmp_path / "out", src, 4, 64, 0, "--text-field", "body")
    assert code == 0, err


def test_calibration_dir_override(tmp_path, capsys, monkeypatch):
    (tmp_path / "mine.txt").write_text(" ".join(_docs()), encoding="utf-8")
    (tmp_path / "registry.yaml").write_text(
        "version: 1\ndatasets:\n  mine:\n    source: bundled\n    path: mine.txt\n    split: train\n"
        "    licence: CC0\n    description: test corpus\n"
    )
    monkeypatch.setenv(reg.ENV_DIR, str(tmp_path))
    code, _, err = sample(capsys, tmp_path / "out", "mine", 4, 64)
    assert code == 0, err
    ident = mf.load_manifest(tmp_path / "out", required=True).params["dataset"]
    assert ident["kind"] == "bundled" and ident["name"] == "mine" and ident["path"] == "mine.txt"


def test_registry_schema(tmp_path):
    registry = reg.load_registry()
    assert {"wikitext2", "wikitext2-test", "c4", "wikitext2-hub", "pileval"} <= set(registry.datasets)
    assert registry.names("bundled") == ["wikitext2", "wikitext2-test"]
    for name in registry.names("bundled"):
        assert reg.bundled_file(registry.datasets[name]).is_file()
    assert registry.datasets["c4"].repo == "allenai/c4"
    bad = tmp_path / "registry.yaml"
    bad.write_text(
        "version: 1\ndatasets:\n  x:\n    source: bundled\n    path: x.txt\n    split: a\n    licence: l\n"
        "    description: d\n    colour: blue\n"
    )
    with pytest.raises(InputError, match="colour"):
        reg.load_registry(tmp_path)


# ----------------------------------------------------------------------------------------------
# errors: exit 2, one line, the fix


def test_missing_text_field_lists_columns(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(_docs())), encoding="utf-8")
    code, _, err = sample(capsys, tmp_path / "out", src)
    line = _error_line(err)
    assert code == 2 and "'text'" in line and "body" in line and "id" in line and "--text-field" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_too_little_text_states_token_count(tmp_path, capsys, tokenizer):
    text = "A short corpus . It has far fewer tokens than the windows need ."
    src = tmp_path / "small.txt"
    src.write_text(text, encoding="utf-8")
    k = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    code, _, err = sample(capsys, tmp_path / "out", src, 4, 64)
    line = _error_line(err)
    assert code == 2 and f"has only {k} tokens" in line and "4 x 64 = 256 needed" in line


def test_empty_dataset(tmp_path, capsys):
    src = tmp_path / "blank.jsonl"
    src.write_text('{"text": ""}\n{"text": "   "}\n', encoding="utf-8")
    code, _, err = sample(capsys, tmp_path / "out", src)
    assert code == 2 and "empty" in _error_line(err)


def test_existing_output_needs_overwrite(tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(_docs()), encoding="utf-8")
    out = tmp_path / "out"
    assert sample(capsys, out, src, 4, 64)[0] == 0
    before = _sha(out / CALIBRATION_FILE)
    code, _, err = sample(capsys, out, src, 4, 64, 1)
    assert code == 2 and "--overwrite" in _error_line(err)
    assert _sha(out / CALIBRATION_FILE) == before
    code, _, err = sample(capsys, out, src, 4, 64, 1, "--overwrite")
    assert code == 0, err
    assert _sha(out / CALIBRATION_FILE) != before
    assert not (tmp_path / "out.partial").exists()


def test_offline_hub_id_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for name in ("someorg/nonexistent-corpus", "c4"):
        code, _, err = sample(capsys, tmp_path / "out", name)
        line = _error_line(err)
        assert code == 2 and err.strip() == line
        assert f"'{name}'" in line and "offline" in line and "wikitext2" in line
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_without_offline_env(tmp_path, capsys, monkeypatch):
    from quantize.calibration import sources

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
    code, _, err = sample(capsys, tmp_path / "out", "someorg/nonexistent-corpus")
    assert code == 2 and "unreachable (offline)" in _error_line(err)


def test_missing_local_file(tmp_path, capsys):
    code, _, err = sample(capsys, tmp_path / "out", tmp_path / "nope.jsonl")
    assert code == 2 and "no such file" in _error_line(err)


def test_split_on_local_file_is_refused(tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(_docs()), encoding="utf-8")
    code, _, err = sample(capsys, tmp_path / "out", src, 4, 64, 0, "--split", "validation")
    assert code == 2 and "--split" in _error_line(err)


def test_seq_len_beyond_context(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(TOKENIZER, model)
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 128, "vocab_size": 1024}))
    code, _, err = sample(capsys, tmp_path / "out", "wikitext2", 4, 256, 0)
    assert code == 0  # the tokenizer-only directory has no context limit
    code, _, err = run(capsys, "sample", "--model", model, "--samples", 4, "--seq-len", 256, "--out", tmp_path / "o2")
    line = _error_line(err)
    assert code == 2 and "128" in line and "--seq-len" in line


def test_tokenizer_larger_than_model_vocab(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(TOKENIZER, model)
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 512, "vocab_size": 100}))
    code, _, err = run(capsys, "sample", "--model", model, "--samples", 4, "--seq-len", 64, "--out", tmp_path / "o")
    assert code == 2 and "vocab_size 100" in _error_line(err)


@pytest.mark.parametrize("flag,value", [("--samples", 0), ("--seq-len", 0), ("--seed", -1)])
def test_counts_must_be_positive(tmp_path, capsys, flag, value):
    args = {"--samples": 4, "--seq-len": 64, "--seed": 0, flag: value}
    flags = [x for kv in args.items() for x in kv]
    code, _, err = run(capsys, "sample", "--model", TOKENIZER, *flags, "--out", tmp_path / "o")
    assert code == 2 and flag in _error_line(err)


def test_model_without_tokenizer(tmp_path, capsys):
    model = tmp_path / "weights-only"
    model.mkdir()
    (model / "config.json").write_text("{}")
    code, _, err = run(capsys, "sample", "--model", model, "--out", tmp_path / "o")
    line = _error_line(err)
    assert code == 2 and str(model) in line and "tokenizer" in line


def test_resolve_dataset_identity_for_registry_name():
    corpus = resolve_dataset("wikitext2-test")
    assert corpus.identity.kind == "bundled" and corpus.identity.split == "test"
    assert corpus.documents[0] == (REPO / "calibration" / "wikitext2" / "test.txt").read_text(encoding="utf-8")


def test_hub_path_with_a_stand_in_loader(monkeypatch):
    """The hub branch (no network here): arguments passed to datasets, identity, and the join rule."""
    import datasets

    from quantize.calibration import sources

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: True)
    lines = ["", " = Title = \n", "", " First paragraph . \n", " \n", " Second . \n"]
    calls = []

    def fake_load(repo, config=None, **kw):
        calls.append((repo, config, kw))
        if repo == "someorg/missing":
            raise datasets.exceptions.DatasetNotFoundError("not found")
        return datasets.Dataset.from_dict({"text": lines, "n": list(range(len(lines)))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    corpus = resolve_dataset("wikitext2-hub")
    assert calls[-1][:2] == ("Salesforce/wikitext", "wikitext-2-raw-v1") and calls[-1][2]["split"] == "validation"
    assert corpus.documents == ["".join(lines)]  # rows are lines of one text, blank lines kept
    ident = corpus.identity
    assert ident.kind == "hub" and ident.repo == "Salesforce/wikitext" and ident.fingerprint not in ("", "unknown")
    assert corpus.input_record().path == "hub:Salesforce/wikitext:wikitext-2-raw-v1"

    corpus = resolve_dataset("someorg/corpus:en", split="test")
    assert calls[-1][:2] == ("someorg/corpus", "en") and calls[-1][2]["split"] == "test"
    assert corpus.documents == [ln for ln in lines if ln.strip()]  # rows are documents
    with pytest.raises(InputError, match="available columns: text, n"):
        resolve_dataset("someorg/corpus", text_field="body")
    with pytest.raises(InputError, match="not found on the hub"):
        resolve_dataset("someorg/missing")
    with pytest.raises(InputError, match="--split"):
        resolve_dataset("c4", split="train")
