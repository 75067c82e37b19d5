"""Checkpoints: exact round trip, corrupt or mismatched files are clear errors, stores (local, S3 via moto)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from testkit import trained_one_step

from nanorl import checkpoint as ckpt
from nanorl.api import NanorlError
from nanorl.config import config_hash, resolve


def test_round_trip_is_exact_and_resumes_identically(tmp_path):
    cfg, model, opt, x = trained_one_step()
    h = config_hash(cfg)
    ckpt.save(tmp_path / "ck", model, opt, {"step": 1, "loader": {"pos": 7}}, config_hash=h)
    cfg2, model2, opt2, _ = trained_one_step()
    with torch.no_grad():
        for p in model2.parameters():
            p.zero_()
    state = ckpt.load(tmp_path / "ck", model2, opt2, config_hash=h)
    assert state["step"] == 1 and state["loader"] == {"pos": 7}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=False):
        assert torch.equal(a, b)
    # one more step on both: identical (optimizer state restored exactly)
    for m, o in ((model, opt), (model2, opt2)):
        m(x, x).backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=False):
        assert torch.equal(a, b)
    assert not list((tmp_path / "ck").glob("*.tmp"))


def test_rng_state_round_trips(tmp_path):
    _, model, _, _ = trained_one_step()
    ckpt.save(tmp_path, model, None, {"step": 0})
    a = torch.rand(3)
    torch.rand(5)
    ckpt.load(tmp_path, model, restore_rng=True)
    # restoring puts the generator back to where it was at save time
    assert torch.equal(torch.rand(3), a)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage_state", "missing"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    _, model, opt, _ = trained_one_step()
    d = ckpt.save(tmp_path / "ck", model, opt, {"step": 3})
    f = d / ckpt.MODEL_FILE
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "flip":
        raw = bytearray(f.read_bytes())
        raw[-10] ^= 0xFF
        f.write_bytes(bytes(raw))
    elif damage == "garbage_state":
        (d / ckpt.STATE_FILE).write_text("{not json")
    else:
        f.unlink()
    with pytest.raises(NanorlError, match="corrupt|missing|unreadable"):
        ckpt.load(d, model, opt)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    cfg, model, opt, _ = trained_one_step()
    ckpt.save(tmp_path, model, opt, {"step": 1}, config_hash=config_hash(cfg))
    with pytest.raises(NanorlError, match="another model configuration"):
        ckpt.load(tmp_path, model, config_hash="0" * 16)
    _, wider, _, _ = trained_one_step(width=64)
    with pytest.raises(NanorlError, match="does not fit this model"):
        ckpt.load(tmp_path, wider)
    with pytest.raises(NanorlError, match="no checkpoint"):
        ckpt.load(tmp_path / "nothing", model)


def test_loading_never_unpickles(tmp_path):
    # the files are safetensors and JSON: a pickle planted under the checkpoint's names is refused, not run
    _, model, opt, _ = trained_one_step()
    d = ckpt.save(tmp_path, model, opt, {"step": 1})
    import pickle

    (d / ckpt.MODEL_FILE).write_bytes(pickle.dumps({"x": 1}))
    state = json.loads((d / ckpt.STATE_FILE).read_text())
    state["files"][ckpt.MODEL_FILE] = None  # even without the hash check
    (d / ckpt.STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(NanorlError, match="unreadable"):
        ckpt.load(d, model)


def test_local_store_mirror(tmp_path):
    from nanorl.store import open_store

    _, model, opt, _ = trained_one_step()
    store = open_store(str(tmp_path / "mirror"))
    ckpt.save(tmp_path / "ck", model, opt, {"step": 2}, store=store, store_prefix="run/base")
    assert store.list("run/base") == [
        f"run/base/{n}" for n in sorted((ckpt.MODEL_FILE, ckpt.OPTIM_FILE, ckpt.STATE_FILE))
    ]
    with pytest.raises(NanorlError, match="escapes"):
        store.put(tmp_path / "ck" / ckpt.STATE_FILE, "../outside")


@pytest.mark.slow
def test_s3_store_round_trip_against_moto(tmp_path, moto_server):
    import boto3

    from nanorl.store import open_store

    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="ckpts")
    _, model, opt, _ = trained_one_step()
    store = open_store("s3://ckpts/team")
    ckpt.save(tmp_path / "ck", model, opt, {"step": 5}, store=store, store_prefix="run1/sft")
    assert store.exists("run1/sft/state.json") and not store.exists("run1/sft/nope")
    for name in (ckpt.MODEL_FILE, ckpt.OPTIM_FILE, ckpt.STATE_FILE):
        store.get(f"run1/sft/{name}", tmp_path / "back" / name)
    _, model2, opt2, _ = trained_one_step()
    assert ckpt.load(tmp_path / "back", model2, opt2)["step"] == 5
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # the final save has no optimizer state: the mirror's stale one goes too, so a pull cannot pair them
    ckpt.save(tmp_path / "ck", model, None, {"step": 6}, store=store, store_prefix="run1/sft")
    assert store.list("run1/sft/") == ["run1/sft/model.safetensors", "run1/sft/state.json"]
    with pytest.raises(NanorlError, match="S3"):
        open_store("s3://no-such-bucket/x").put(tmp_path / "ck" / "state.json", "k")
    assert os.environ["NANORL_S3_ENDPOINT"] == moto_server


def test_a_checkpoint_trained_with_another_tokenizer_is_refused(tmp_path):
    """state.json records the tokenizer's fingerprint; loading with another tokenizer's is a clear error, with the
    same one (or a checkpoint from before fingerprints, which records none) it loads."""
    from nanorl.tokenizer import train_tokenizer

    tok_a = train_tokenizer(["the cat sat on the mat"] * 20, vocab_size=280)
    tok_b = train_tokenizer(["12 + 34 = 46"] * 20, vocab_size=280)
    assert tok_a.fingerprint != tok_b.fingerprint
    cfg, model, opt, _ = trained_one_step()
    ckpt.save(tmp_path / "a", model, opt, {"step": 1}, tokenizer_fingerprint=tok_a.fingerprint)
    assert ckpt.read_state(tmp_path / "a")["tokenizer"] == tok_a.fingerprint
    _, model2, opt2, _ = trained_one_step()
    with pytest.raises(NanorlError, match="another tokenizer") as err:
        ckpt.load(tmp_path / "a", model2, opt2, tokenizer_fingerprint=tok_b.fingerprint)
    assert "--from base" in err.value.hint
    assert ckpt.load(tmp_path / "a", model2, opt2, tokenizer_fingerprint=tok_a.fingerprint)["step"] == 1
    # a checkpoint without a fingerprint (written before they were recorded) loads as before
    ckpt.save(tmp_path / "old", model, opt, {"step": 2})
    assert "tokenizer" not in ckpt.read_state(tmp_path / "old")
    assert ckpt.load(tmp_path / "old", model2, opt2, tokenizer_fingerprint=tok_b.fingerprint)["step"] == 2


def test_the_fingerprint_follows_the_vocabulary_not_the_metadata(tmp_path):
    from nanorl.tokenizer import Tokenizer, train_tokenizer

    texts = ["the cat sat on the mat"] * 20
    tok = train_tokenizer(texts, vocab_size=280)
    again = train_tokenizer(texts * 2, vocab_size=280)  # other meta (chars read), the same merges
    assert again.meta != tok.meta and again.fingerprint == tok.fingerprint
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).fingerprint == tok.fingerprint
    assert train_tokenizer(texts, vocab_size=280, max_digits=1).fingerprint != tok.fingerprint  # another pattern


def test_a_run_refuses_a_model_trained_with_another_tokenizer(tmp_path):
    """The run's context records its tokenizer in what it saves and checks it in everything it loads: a model of
    the same shape from a run with another tokenizer (`nanorl train mid --checkpoint OTHER/base`), or the run's
    own models after its tokenizer was retrained, are refused."""
    from nanorl.config import run_dir
    from nanorl.stages.runner import make_context, run_pipeline

    shape = ["model.depth=1", "model.n_embd=32", "model.n_head=1", "model.seq_len=64", "telemetry.console=false"]
    ctxs = {}
    for name, digits in (("one", 1), ("other", 3)):
        cfg = resolve(preset="tiny", overrides=[*shape, f"name={name}", f"tokenizer.max_digits={digits}"])
        run_pipeline(cfg, only="tokenizer")
        ctxs[name] = make_context(cfg)
    one, other = ctxs["one"], ctxs["other"]
    assert one.tokenizer_fingerprint != other.tokenizer_fingerprint
    for ctx in (one, other):
        ctx.save("base", ctx.new_model(), None, {"step": 0})
        ckpt.mark_done(ctx.stage_dir("base"))
    assert ckpt.read_state(one.stage_dir("base"))["tokenizer"] == one.tokenizer_fingerprint
    assert one.previous_model("mid") is not None  # its own base: fine
    one.init_from = {"mid": run_dir("other") / "base"}
    with pytest.raises(NanorlError, match="another tokenizer") as err:
        one.previous_model("mid")
    assert "--name one --from base" in err.value.hint
    one.init_from = {}
    # the run's tokenizer retrained on other settings: its own base model no longer fits it
    assert one.stale_model_stages() == []
    other.tokenizer().save(one.stage_dir("tokenizer"))
    one._tokenizer = None
    with pytest.raises(NanorlError, match="another tokenizer"):
        one.load_model("base")
    assert one.stale_model_stages() == ["base"]  # what the runner needs to retrain
    for ctx in (one, other):
        ctx.bus.close()


class _Stop(BaseException):
    """What a Ctrl-C or a kill does to a save: it stops at some point, whatever the code was doing."""


def _save_stopped_at(monkeypatch, d, model, opt, step, point: int) -> bool:
    """Save a checkpoint of `step` into `d`, stopped before the `point`-th file operation of the save (tensor-file
    writes, flushes and renames, counted together); returns whether it stopped."""
    ops = {"n": 0}

    def counted(fn):
        def wrapper(*args, **kwargs):
            ops["n"] += 1
            if ops["n"] == point:
                raise _Stop
            return fn(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as m:
        import safetensors.torch

        m.setattr(safetensors.torch, "save_file", counted(safetensors.torch.save_file))
        m.setattr(ckpt, "_flush", counted(ckpt._flush))
        m.setattr(ckpt.os, "replace", counted(os.replace))
        try:
            ckpt.save(d, model, opt, {"step": step})
        except _Stop:
            return True
    return False


def test_a_save_stopped_anywhere_leaves_the_old_checkpoint_or_the_new_one_whole(tmp_path, monkeypatch):
    """Ctrl-C, a kill or a full disk in the middle of a checkpoint write: after `recover` (the runner calls it) the
    folder loads, as the previous checkpoint or the new one, never as a mix refused as corrupt."""
    cfg, model, opt, x = trained_one_step()
    old = {k: v.clone() for k, v in model.state_dict().items()}
    model(x, x).backward()
    opt.step()
    new = {k: v.clone() for k, v in model.state_dict().items()}
    seen = set()
    for point in range(1, 20):
        d = tmp_path / f"ck{point}"
        with torch.no_grad():
            model.load_state_dict(old)
        ckpt.save(d, model, opt, {"step": 1})
        with torch.no_grad():
            model.load_state_dict(new)
        if not _save_stopped_at(monkeypatch, d, model, opt, 2, point):
            break  # every point of the save was tried
        ckpt.recover(d)
        _, fresh, opt2, _ = trained_one_step()
        step = ckpt.load(d, fresh, opt2)["step"]
        want = old if step == 1 else new
        assert all(torch.equal(fresh.state_dict()[k], want[k]) for k in want), point
        assert not list(d.glob("*.tmp")), point  # nothing left behind to fill the disk
        seen.add(step)
    assert point > 6 and seen == {1, 2}  # stops before the commit point kept step 1, stops after it gave step 2


def test_a_full_disk_during_a_save_is_an_os_error_naming_the_file_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    _, model, opt, _ = trained_one_step()
    d = ckpt.save(tmp_path / "ck", model, opt, {"step": 1})
    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        if "optim" in filename:
            Path(filename).write_bytes(b"\0" * 10)  # a part written before the disk filled
            # the error safetensors raises (its own type, not an OSError)
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as err:
        ckpt.save(d, model, opt, {"step": 2})
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(d / "optim.safetensors.tmp")
    assert not list(d.glob("*.tmp"))  # the space a retry needs is given back
    assert not ckpt.recover(d) and ckpt.load(d, model, opt)["step"] == 1
