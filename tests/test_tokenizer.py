"""The tokenizer: training, lossless round trips, special tokens, persistence, and chat rendering with masks."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from testkit import cli_here

from nanorl.api import NanorlError
from nanorl.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer


def _corpus(n=600, seed=0):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "apples", "Ana", "buys", "how", "many", "élan", "日本語", "naïve"]
    for _ in range(n):
        k = rng.randint(5, 30)
        yield " ".join(rng.choice(words) if rng.random() < 0.8 else str(rng.randint(0, 999)) for _ in range(k)) + "."


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_corpus(), vocab_size=400)


def test_training_counts_specials_and_learns_merges(tok):
    assert tok.vocab_size <= 400
    assert len(tok.mergeable_ranks) == tok.vocab_size - len(SPECIAL_TOKENS) > 256
    # special ids come right after the merges, in the documented order
    assert [tok.special_id(s) for s in SPECIAL_TOKENS] == list(range(len(tok.mergeable_ranks), tok.vocab_size))
    assert tok.special_id("bos") == tok.bos_id == tok.special_id("<|bos|>")
    # a word that is everywhere in the corpus became one token
    assert len(tok.encode(" apples")) == 1
    assert tok.meta["trained_docs"] == 600


def test_training_rejects_bad_input():
    with pytest.raises(NanorlError, match="too small"):
        train_tokenizer(["abc"], vocab_size=260)
    with pytest.raises(NanorlError, match="empty"):
        train_tokenizer([], vocab_size=400)
    with pytest.raises(NanorlError):
        Tokenizer({b"a": 0}, "x").special_id("nope")


def test_max_chars_limits_what_is_read():
    tok = train_tokenizer(_corpus(), vocab_size=400, max_chars=5000)
    assert tok.meta["trained_chars"] == 5000


def test_max_digits_splits_numbers():
    text = ["12345 678 90 " * 50]
    three = train_tokenizer(text, 400, max_digits=3)
    one = train_tokenizer(text, 400, max_digits=1)
    assert [three.decode([i]) for i in three.encode("12345")] == ["123", "45"]
    assert [one.decode([i]) for i in one.encode("12345")] == ["1", "2", "3", "4", "5"]


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert not any(tok.is_special(i) for i in ids)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS), st.text(max_size=20)), max_size=8))
def test_special_tokens_never_come_from_plain_text(tok, parts):
    text = "".join(parts)
    for ids in (tok.encode(text), tok.encode_batch([text, "x"])[0]):
        assert all(i < len(tok.mergeable_ranks) for i in ids)
        assert tok.decode(ids) == text


def test_encode_batch_matches_encode(tok):
    texts = list(_corpus(50, seed=3))
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, bos=True)[0] == [tok.bos_id, *tok.encode(texts[0])]


def test_save_load_plain_json(tok, tmp_path):
    path = tok.save(tmp_path / "tk")
    blob = json.loads(path.read_text())  # plain JSON, not a pickle
    assert blob["vocab_size"] == tok.vocab_size
    back = Tokenizer.load(tmp_path / "tk")
    text = "the naïve cat sat on 123 mats 日本語 <|bos|>"
    assert back.encode(text) == tok.encode(text)
    assert back.specials == tok.specials and back.vocab_size == tok.vocab_size
    assert not (tmp_path / "tk" / "tokenizer.json.tmp").exists()


def test_load_errors(tmp_path):
    with pytest.raises(NanorlError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"format": "something else"}')
    with pytest.raises(NanorlError, match="not a valid nanorl tokenizer"):
        Tokenizer.load(tmp_path / "bad")


def _trained(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_chat_masks_train_only_assistant(tok):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "how many apples"},
        {"role": "assistant", "content": "the cat sat"},
        {"role": "user", "content": "and the mat"},
        {"role": "assistant", "content": "on 12"},
    ]
    ids, mask = tok.render_conversation(conv)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == (
        "<|bos|><|user_start|>Be brief.\n\nhow many apples<|user_end|>"
        "<|assistant_start|>the cat sat<|assistant_end|>"
        "<|user_start|>and the mat<|user_end|><|assistant_start|>on 12<|assistant_end|>"
    )
    assert _trained(tok, ids, mask) == "the cat sat<|assistant_end|>on 12<|assistant_end|>"
    # the token that opens an assistant turn is context, not a prediction target
    starts = [m for i, m in zip(ids, mask, strict=True) if i == tok.special_id("assistant_start")]
    assert starts == [0, 0]


def test_chat_masks_exclude_tool_output(tok):
    conv = [
        {"role": "user", "content": "sum"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "let me see "},
                {"type": "python", "text": "12+7"},
                {"type": "python_output", "text": "19"},
                {"type": "text", "text": " so 19"},
            ],
        },
    ]
    ids, mask = tok.render_conversation(conv)
    assert _trained(tok, ids, mask) == "let me see <|python_start|>12+7<|python_end|> so 19<|assistant_end|>"
    untrained = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert "<|output_start|>19<|output_end|>" in untrained
    assert "<|output_start|>19<|output_end|>" in tok.decode(ids)


def test_render_for_completion_and_truncation(tok):
    conv = [{"role": "user", "content": "how many"}, {"role": "assistant", "content": "12"}]
    prompt = tok.render_for_completion(conv)
    assert prompt[-1] == tok.special_id("assistant_start")
    assert tok.decode(prompt) == "<|bos|><|user_start|>how many<|user_end|><|assistant_start|>"
    assert prompt == tok.render_for_completion(conv[:1])
    full, _ = tok.render_conversation(conv)
    assert full[: len(prompt)] == prompt  # sampling continues exactly where training text goes on
    ids, mask = tok.render_conversation(conv, max_len=5)
    assert ids == full[:5] and len(mask) == 5


def test_chat_rejects_bad_messages(tok):
    with pytest.raises(NanorlError, match="role"):
        tok.render_conversation([{"role": "tool", "content": "x"}])
    with pytest.raises(NanorlError, match="part type"):
        tok.render_conversation([{"role": "assistant", "content": [{"type": "image", "text": "x"}]}])


@pytest.mark.slow  # four CLI subprocesses (~2.5 s on an idle machine)
def test_cli_train_info_encode(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "corpus.txt").write_text("\n\n".join(_corpus(300)))
    env = {**os.environ, "COLUMNS": "200"}

    def cli(*args):
        r = subprocess.run(
            [sys.executable, "-m", "nanorl", *args], capture_output=True, text=True, env=env, timeout=120
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = json.loads(
        cli("tokenizer", "train", "--vocab-size", "300", "--corpus", str(tmp_path), "--run", "r", "--json")
    )
    assert out["vocab_size"] == 300 and out["trained_docs"] == 300
    info = json.loads(cli("tokenizer", "info", "--run", "r", "--corpus", str(tmp_path), "--json"))
    assert info["vocab_size"] == 300 and info["bytes_per_token"] > 1.5
    enc = json.loads(cli("tokenizer", "encode", "the cat <|bos|>", "--run", "r", "--json"))
    assert "".join(enc["tokens"]) == "the cat <|bos|>"
    # a character split over byte tokens: its pieces are not text, their bytes are exact
    enc = json.loads(cli("tokenizer", "encode", "café — ok", "--run", "r", "--json"))
    assert "\ufffd" in "".join(enc["tokens"])
    assert b"".join(bytes.fromhex(h) for h in enc["bytes"]) == "café — ok".encode()
    assert "tokens" in cli("tokenizer", "encode", "the cat", "--run", "r")


# ---------------------------------------------------------------------------------------------------------
# `nanorl tokenizer ...` in-process: where a tokenizer goes, and what `info` measures it on


@pytest.fixture
def texts(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("\n\n".join(_corpus(300)))
    return d


def test_train_with_run_marks_the_stage_done_and_the_pipeline_keeps_it(capsys, texts, monkeypatch):
    from nanorl import checkpoint as ckpt
    from nanorl.config import resolve, run_dir
    from nanorl.stages import runner

    code, out, err = cli_here(
        capsys, "tokenizer", "train", "--run", "r", "--corpus", str(texts), "--vocab-size", "300", "--json"
    )
    assert code == 0, err
    folder = run_dir("r") / "tokenizer"
    assert json.loads(out)["path"] == str(folder) and ckpt.is_done(folder)
    fingerprint = Tokenizer.load(folder).fingerprint
    # the pipeline skips the tokenizer stage (every other stage stubbed out: only the runner's choice matters here)
    monkeypatch.setattr(runner, "_stage_fn", lambda stage: lambda ctx: {})
    cfg = resolve(preset="tiny", overrides=["name=r", "telemetry.console=false"])
    assert runner.run_pipeline(cfg)["tokenizer"] == "skipped"
    assert Tokenizer.load(folder).fingerprint == fingerprint


def test_train_without_run_or_out_writes_a_scratch_tokenizer_not_a_runs(capsys, texts):
    from nanorl.config import nanorl_home, run_dir

    code, out, err = cli_here(capsys, "tokenizer", "train", "--vocab-size", "300", "--corpus", str(texts), "--json")
    assert code == 0, err
    assert json.loads(out)["path"] == str(nanorl_home() / "tokenizer")
    assert not run_dir("arith-d8").exists()  # the default run's name is not used
    # info and encode read the same default
    code, out, err = cli_here(capsys, "tokenizer", "info", "--json")
    assert code == 0, err
    assert json.loads(out)["vocab_size"] == 300
    assert str(texts) in json.loads(out)["measured_on"]  # what it was trained on, as recorded
    code, out, _ = cli_here(capsys, "tokenizer", "encode", "the cat", "--json")
    assert code == 0 and "".join(json.loads(out)["tokens"]) == "the cat"
    code, _, err = cli_here(capsys, "tokenizer", "train", "--run", "x", "--out", str(texts), "--vocab-size", "300")
    assert code == 2 and "not both" in err


def test_info_measures_on_the_runs_corpus(capsys, texts):
    """A run whose pipeline trained its tokenizer on data.corpus=FILES: info reads the run's run.toml and
    measures on those files, not on the default config's task."""
    from nanorl.config import resolve
    from nanorl.stages.runner import run_pipeline

    over = [f"data.corpus={texts}", "name=t2", "telemetry.console=false", "tokenizer.train_chars=20000"]
    run_pipeline(resolve(preset="tiny", overrides=over), only="tokenizer")
    code, out, err = cli_here(capsys, "tokenizer", "info", "--run", "t2", "--json")
    assert code == 0, err
    assert json.loads(out)["measured_on"].startswith(str(texts))
    # --corpus still chooses
    code, out, _ = cli_here(capsys, "tokenizer", "info", "--run", "t2", "--corpus", "task", "--json")
    assert json.loads(out)["measured_on"] == "task:arith dev split"


def test_info_of_a_missing_run_or_folder_says_how_to_make_it(capsys, tmp_path):
    code, _, err = cli_here(capsys, "tokenizer", "info", "--run", "nosuch")
    assert code == 2 and "no run named 'nosuch'" in err and "tokenizer train --run nosuch" in err
    code, _, err = cli_here(capsys, "tokenizer", "encode", "x", "--dir", str(tmp_path / "none"))
    assert code == 2 and f"--out {tmp_path / 'none'}" in err
    code, _, err = cli_here(capsys, "tokenizer", "info")
    assert code == 2 and "--run NAME" in err


def test_lone_surrogates_train_as_the_replacement_character():
    """JSON can escape half of a surrogate pair ("\\ud83d": a cut emoji in scraped text), which json.loads turns
    into a str that is not valid Unicode. Encoding already reads it as U+FFFD (tiktoken); training must too,
    not stop with a UnicodeEncodeError."""
    texts = [json.loads('"cut emoji \\ud83d here"')] * 20 + ["plain text here"] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    assert tok.meta["trained_docs"] == 40
    assert tok.decode(tok.encode(texts[0])) == "cut emoji \ufffd here"


@pytest.mark.parametrize(
    "conv,message",
    [
        (["hello"], "message 1 is not a {'role', 'content'} object"),
        ([{"content": "hi"}], "message 1 has no 'role'"),
        ([{"role": "user"}], "message 1 (user) has no 'content'"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}], "message 2 (assistant)"),
        ([{"role": "assistant", "content": [{"type": "text"}]}], "message 1 (assistant): part 1 has no string 'text'"),
        ([{"role": "assistant", "content": [{"type": "python", "text": 3}]}], "part 1 has no string 'text'"),
        ([{"role": "assistant", "content": ["just text"]}], "part 1 is not a {'type', 'text'} object"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            "message 2: a system message may only come first",
        ),
        ([{"role": "system", "content": 5}, {"role": "user", "content": "a"}], "message 1 (system)"),
    ],
)
def test_malformed_messages_are_clear_errors(tok, conv, message):
    """Conversations come from users' files too (data.chat): a malformed one must say which message is wrong,
    not raise a KeyError or TypeError from inside the renderer."""
    with pytest.raises(NanorlError) as err:
        tok.render_conversation(conv)
    assert message in err.value.message
