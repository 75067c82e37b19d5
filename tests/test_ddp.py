"""torchrun --nproc_per_node=2 (gloo on CPU): a few base steps with gradient accumulation, then mid, SFT and GRPO with
dynamic sampling (where the ranks find different numbers of groups with signal), and the two ranks' weights stay
identical; then eval, the questions shared between the ranks. And an error met on one rank only (its shard of
the corpus gives no row) stops both ranks together, each naming it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

SYNC_OVERRIDES = [
    "name=ddp", "model.depth=1", "model.n_embd=32", "model.n_head=1", "model.seq_len=64",
    "tokenizer.train_chars=50000", "base.steps=4", "base.device_batch_size=2", "base.checkpoint_every=2",
    "base.total_batch_tokens=512",
    "base.eval_every=0", "mid.steps=2", "mid.device_batch_size=2", "sft.steps=2", "sft.device_batch_size=2",
    "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=8", "rl.checkpoint_every=1",
    "rl.kl_every=2", "rl.dynamic_sampling=true", "rl.max_sample_batches=3", "rl.mask_truncated=false",
    "rl.ppo_epochs=2", "eval.max_examples=5", "eval.batch_size=2", "eval.max_new_tokens=8", "eval.mode=both",
    "telemetry.console=false", "device=cpu",
]  # fmt: skip

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from nanorl.config import resolve
    from nanorl.stages import common
    from nanorl.stages.runner import run_pipeline

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    cfg = resolve(preset="tiny", overrides=__OVERRIDES__)
    from nanorl.stages import rl

    def reward(example, completion, answer):
        # signal on some prompts only, and not the same number on both ranks: rows differ by completion length
        return float(len(completion) % 2) if int(example.id.split("-")[-1]) % 3 else 1.0

    rl.resolve_rewards = lambda cfg, task: [(reward, 1.0)]
    seen = {}
    orig = common.Context.save

    def save(self, stage, model, optimizers, state):
        # every rank records a digest of its weights at each checkpoint (rank 0 also writes the files)
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode()); h.update(v.detach().cpu().numpy().tobytes())
        seen[f"{stage}:{state['step']}"] = h.hexdigest()
        return orig(self, stage, model, optimizers, state)

    common.Context.save = save
    from nanorl.telemetry import Telemetry

    logged = []  # every rank's logged RL loss, clipped share and KL (rank 0 alone writes them)
    orig_log = Telemetry.log

    def log(self, stage, step, metrics):
        if stage == "rl":
            logged.append({k: metrics.get(k) for k in ("loss", "clip_frac", "kl")})
        return orig_log(self, stage, step, metrics)

    Telemetry.log = log
    from nanorl.stages import eval as ev

    asked = []  # the questions this rank answered
    for name in ("generative_records", "categorical_records"):
        def wrapped(ctx, model, examples, *a, _orig=getattr(ev, name), **k):
            asked.extend(e.id for e in examples)
            return _orig(ctx, model, examples, *a, **k)
        setattr(ev, name, wrapped)
    run_pipeline(cfg, only="tokenizer")
    res = run_pipeline(cfg, only="base")
    for stage in ("mid", "sft", "rl", "eval"):
        res.update(run_pipeline(cfg, only=stage))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"digests": seen, "loss": res["base"]["loss"], "rl": logged, "asked": asked}, fh)
    """
).replace("__OVERRIDES__", repr(SYNC_OVERRIDES))


def _torchrun(tmp_path, code: str, timeout: int) -> subprocess.CompletedProcess:
    """Run `code` as a script on two gloo ranks under torchrun, with its own NANORL_HOME in tmp_path."""
    script = tmp_path / "ddp_script.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANORL_HOME": str(tmp_path / "home")}
    with socket.socket() as sock:  # a free port for the rendezvous (port 0 is not supported by torchrun)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
        str(script), str(tmp_path),
    ]  # fmt: skip
    # its own process group: a run that hangs is stopped whole (torchrun and both ranks), not left running
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_two_ranks_stay_in_sync(tmp_path, monkeypatch):
    proc = _torchrun(tmp_path, SCRIPT, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["digests"] == r1["digests"]
    assert set(r0["digests"]) == {"base:2", "base:4", "mid:2", "sft:2", "rl:1", "rl:2"}
    assert r0["loss"] == r1["loss"]  # the logged loss is the mean over ranks
    # RL's too (its end-of-stage "loss not finite" check reads it: every rank decides alike), and the clipped
    # share and the KL (step 2) are over both ranks' tokens, not rank 0's
    assert r0["rl"] == r1["rl"] and len(r0["rl"]) == 2 and any(m["loss"] for m in r0["rl"]), (r0["rl"], r1["rl"])
    assert r0["rl"][0]["kl"] is None and r0["rl"][1]["kl"] > 0, r0["rl"]
    # rank 0 wrote the checkpoint; its metrics say it trained on two ranks' tokens per step
    recs = [json.loads(line) for line in (tmp_path / "home/runs/ddp/metrics.jsonl").read_text().splitlines()]
    end = next(r for r in recs if r["stage"] == "base" and r.get("kind") == "end")
    # 512 tokens a step: 2 ranks x 2 passes x 2 rows x 64 tokens (gradient accumulation within each rank)
    assert end["metrics"]["tokens_per_step"] == 512

    # eval: the ranks took every other batch of 2 questions (greedy, sampled and categorical, for RL's model and
    # SFT's), and rank 0 wrote every question's records, in order
    ids = [f"arith-dev-{i}" for i in range(5)]
    assert sorted(r0["asked"] + r1["asked"]) == sorted(ids * 6)
    assert set(r0["asked"]) == {ids[0], ids[1], ids[4]} and set(r1["asked"]) == {ids[2], ids[3]}
    evals = tmp_path / "home/runs/ddp/eval"
    res = json.loads((evals / "arith-dev.json").read_text())
    assert [r["id"] for r in res["modes"]["generative"]["records"]] == ids
    assert [r["id"] for r in res["modes"]["categorical"]["records"]] == ids
    assert [(r["id"], r["sample"]) for r in res["modes"]["sampled"]["records"]] == [
        (i, j) for i in ids for j in range(4)
    ]
    # and the same evaluation in one process writes the same files: the same batches at the same seeds
    two_ranks = {f.name: _without_seconds(json.loads(f.read_text())) for f in sorted(evals.glob("*.json"))}
    monkeypatch.setenv("NANORL_HOME", str(tmp_path / "home"))
    from nanorl.config import resolve
    from nanorl.stages.runner import run_pipeline

    run_pipeline(resolve(preset="tiny", overrides=SYNC_OVERRIDES), only="eval")
    one = {f.name: _without_seconds(json.loads(f.read_text())) for f in sorted(evals.glob("*.json"))}
    assert set(one) == {"arith-dev.json", "arith-dev-sft.json"}
    assert one == two_ranks


def _without_seconds(result: dict) -> dict:
    """An eval file without its timings."""
    return {**result, "modes": {m: {k: v for k, v in s.items() if k != "seconds"} for m, s in result["modes"].items()}}


FAILING = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from nanorl.config import resolve
    from nanorl.stages.runner import run_pipeline

    overrides = [
        "name=shard", "model.depth=1", "model.n_embd=32", "model.n_head=1", "model.seq_len=64",
        "tokenizer.train_chars=50000", "base.steps=2", "base.device_batch_size=2", "telemetry.console=false",
        "device=cpu",
    ]
    run_pipeline(resolve(preset="tiny", overrides=overrides), only="tokenizer")
    # one long document: the first block (2,048 documents a rank) holds it alone, rank 0 takes it, rank 1 nothing
    doc = Path(sys.argv[1]) / "one.txt"
    if os.environ["RANK"] == "0":
        doc.write_text(" ".join(f"{i} + {i} = {2 * i}." for i in range(300)))
    from nanorl.device import barrier
    barrier()
    run_pipeline(resolve(preset="tiny", overrides=[*overrides, f"data.corpus={doc}"]), only="base")
    """
)


@pytest.mark.slow
def test_an_error_on_one_rank_stops_both(tmp_path):
    proc = _torchrun(tmp_path, FAILING, timeout=120)
    assert proc.returncode != 0
    # rank 1 raised its own error; rank 0, whose shard was fine, raised with it before any training step
    assert "[rank1]: nanorl.api.NanorlError: the corpus is too small" in proc.stderr, proc.stderr[-3000:]
    assert "[rank0]: nanorl.api.NanorlError: rank 1: the corpus is too small" in proc.stderr, proc.stderr[-3000:]


LATER_EPOCH = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from nanorl.config import resolve
    from nanorl.data import loader
    from nanorl.device import barrier
    from nanorl.stages.runner import run_pipeline

    out = Path(sys.argv[1])
    # two long documents (several rows each) and two short ones (together less than a row). With seed 14 the
    # shuffle deals rank 1 one long document in pass 1, only the short ones in passes 2 to 4, a long one in pass 5
    doc = out / "four.txt"
    if os.environ["RANK"] == "0":
        long_doc = " ".join(f"{i} + {i} = {2 * i}." for i in range(40))
        doc.write_text("\\n\\n".join([long_doc, long_doc.replace("+", "-"), "1 + 1 = 2.", "2 + 2 = 4."]))
    overrides = [
        "seed=14", "model.depth=1", "model.n_embd=32", "model.n_head=1", "model.seq_len=64",
        "tokenizer.train_chars=50000", "base.steps=8", "base.device_batch_size=2", "base.eval_every=0",
        "telemetry.console=false", "device=cpu",
    ]
    run_pipeline(resolve(preset="tiny", overrides=["name=a", *overrides]), only="tokenizer")
    barrier()
    res = run_pipeline(resolve(preset="tiny", overrides=["name=a", *overrides, f"data.corpus={doc}"]), only="base")
    (out / f"trained{os.environ['RANK']}.json").write_text(json.dumps(res["base"]["loss"]))
    # a share that stays empty for MAX_EMPTY_EPOCHS passes is an error: on both ranks, at the same step
    loader.MAX_EMPTY_EPOCHS = 2
    run_pipeline(resolve(preset="tiny", overrides=["name=a", *overrides, f"data.corpus={doc}"]), from_stage="base")
    """
)


@pytest.mark.slow
def test_a_rank_whose_share_empties_in_a_later_pass(tmp_path):
    proc = _torchrun(tmp_path, LATER_EPOCH, timeout=120)
    # rank 1 had no row in passes 2 to 4: it went on to pass 5, and both ranks trained the 8 steps
    trained = [tmp_path / f"trained{r}.json" for r in (0, 1)]
    assert all(p.exists() for p in trained), proc.stderr[-3000:]
    assert trained[0].read_text() == trained[1].read_text()
    # with at most 2 empty passes in a row, rank 1 fails mid-training, and rank 0 stops with it (not waiting for
    # it in the gradients' all-reduce)
    assert proc.returncode != 0
    err = "the corpus is too small: not one row of 65 tokens for rank 1 of 2 in 2 passes in a row"
    assert f"[rank1]: nanorl.api.NanorlError: {err}" in proc.stderr, proc.stderr[-3000:]
    assert f"[rank0]: nanorl.api.NanorlError: rank 1: {err}" in proc.stderr, proc.stderr[-3000:]


NODE_DISKS = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from nanorl import checkpoint as ckpt
    from nanorl.api import NanorlError
    from nanorl.config import resolve
    from nanorl.stages.runner import run_pipeline

    out, rank = Path(sys.argv[1]), os.environ["RANK"]
    cfg = resolve(preset="tiny", overrides=[
        "name=disks", "model.depth=1", "model.n_embd=32", "model.n_head=1", "model.seq_len=64",
        "tokenizer.train_chars=50000", "base.steps=1", "base.device_batch_size=2", "mid.steps=1",
        "telemetry.console=false", "device=cpu",
    ])
    errors = {}
    # two "machines" whose run folders are not shared: each rank has its own NANORL_HOME
    os.environ["NANORL_HOME"] = str(out / f"home{rank}")
    try:
        run_pipeline(cfg)
    except NanorlError as e:
        errors["unshared"] = e.message
    # a shared folder, and a checkpoint that rank 1 alone cannot read (its node's copy is bad)
    os.environ["NANORL_HOME"] = str(out / "home")
    run_pipeline(cfg, only="tokenizer")
    run_pipeline(cfg, only="base")
    if rank == "1":
        def unreadable(directory, *a, **k):
            raise NanorlError(f"{directory}: model.safetensors is truncated")
        ckpt.load = unreadable
    try:
        run_pipeline(cfg, only="mid")
    except NanorlError as e:
        errors["load"] = e.message
    (out / f"errors{rank}.json").write_text(json.dumps(errors))
    import torch.distributed as dist
    dist.destroy_process_group()  # the runs ended in errors, which leave the group to the process's end
    """
)


@pytest.mark.slow
def test_a_node_without_the_run_folder_stops_every_rank(tmp_path):
    proc = _torchrun(tmp_path, NODE_DISKS, timeout=120)
    # each rank wrote what it met (gloo's teardown after a run that ended in an error sometimes aborts a process
    # at exit, under load: the exit status is not what this test reads)
    files = [tmp_path / f"errors{r}.json" for r in (0, 1)]
    assert all(f.exists() for f in files), proc.stderr[-3000:]
    errors = [json.loads(f.read_text()) for f in files]
    # before anything is trained, both ranks stop with one error naming the rank that does not see the folder
    host = socket.gethostname()
    runs = tmp_path / "home0/runs"
    expected = f"rank 1 (on {host}) does not see the runs folder that rank 0 (on {host}) writes, {runs}"
    assert all(e["unshared"].startswith(expected) for e in errors), errors
    assert not (tmp_path / "home0/runs/disks").exists()  # nothing was written
    # rank 1 fails to load the base checkpoint mid starts from; rank 0 stops with it, before any collective
    bad = f"{tmp_path / 'home/runs/disks/base'}: model.safetensors is truncated"
    assert errors[1]["load"] == bad and errors[0]["load"] == f"rank 1: {bad}", errors


RESUME_AND_ERRORS = textwrap.dedent(
    """
    import hashlib, json, os, sys
    from pathlib import Path
    from nanorl.api import NanorlError
    from nanorl.config import resolve, run_dir
    from nanorl.stages import common
    from nanorl.stages.common import Interrupted
    from nanorl.stages.runner import run_pipeline
    from nanorl.telemetry import read_metrics

    out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
    overrides = __OVERRIDES__

    def cfg(name):
        return resolve(preset="tiny", overrides=[f"name={name}", *overrides])

    # 1. a run stopped (as a kill would) after base step 3 and RL step 2, and resumed each time, against one run
    # straight through: the same losses and weights (rank 0 wrote them; both ranks' agree, test_two_ranks_...)
    run_pipeline(cfg("full"))
    for stop in ({"base": 3}, {"rl": 2}):
        try:
            run_pipeline(cfg("crashy"), stop_after=stop)
        except Interrupted:
            pass
    run_pipeline(cfg("crashy"))
    if rank == 0:
        def losses(name, stage):
            recs = read_metrics(run_dir(name))
            return {r["step"]: r["metrics"]["loss"] for r in recs if r["stage"] == stage and r.get("kind") is None}

        def digest(name, stage):  # of the tensors (the file's header may differ between runs)
            from safetensors.torch import load_file

            h = hashlib.sha256()
            for k, v in sorted(load_file(str(run_dir(name) / stage / "model.safetensors")).items()):
                h.update(k.encode()); h.update(v.numpy().tobytes())
            return h.hexdigest()

        seen = {f"{n}:{s}": [losses(n, s), digest(n, s)] for n in ("full", "crashy") for s in ("base", "rl")}
        (out / "resume.json").write_text(json.dumps(seen))

    # 2. errors met on rank 1 only: every rank raises, rank 0 naming rank 1's error (none waits in a collective)
    errors = {}
    from nanorl.stages import rl

    resolve_rewards = rl.resolve_rewards

    def rewards(fails):
        def reward(example, completion, answer):
            if fails and rank == 1:
                raise ValueError(f"cannot score {example.id}")
            return float(len(completion) % 2)  # signal: the update runs
        return lambda cfg_, task: [(reward, 1.0)]

    def fails(key, owner, attr, replacement, name, stage):
        # run `stage` of run `name` with owner.attr replaced; record the error this rank raised, as it reads
        original = getattr(owner, attr)
        setattr(owner, attr, replacement(original))
        try:
            run_pipeline(cfg(name), only=stage)
        except Exception as e:
            errors[key] = f"{type(e).__name__}: {getattr(e, 'message', e)}"
        finally:
            setattr(owner, attr, original)

    def raising(r, exc, when=lambda *a, **k: True):
        # a replacement that raises `exc` on rank r (when `when` says so of the call), else calls the original
        def wrap(original):
            def replaced(*a, **k):
                if rank == r and when(*a, **k):
                    raise exc
                return original(*a, **k)
            return replaced
        return wrap

    from nanorl.model import GPT
    from nanorl.stages import eval as ev

    # a reward failing on rank 1 (in dynamic sampling); an update out of memory on rank 1 (with rewards that
    # differ, so that it runs); the engine failing on rank 1 in eval; a full disk on rank 0, which alone writes
    # checkpoints (at base's step 2: told at step 3's gradient all-reduce); base's validation pass out of memory
    # on rank 1 (its one all-reduce carries the flag)
    fails("reward", rl, "resolve_rewards", lambda original: rewards(fails=True), "full", "rl")
    rl.resolve_rewards = rewards(fails=False)
    fails("update", rl, "policy_gradient", raising(1, RuntimeError("CUDA out of memory (a test)")), "full", "rl")
    rl.resolve_rewards = resolve_rewards
    fails("eval", ev, "generative_records", raising(1, RuntimeError("the engine failed")), "crashy", "eval")
    disk_full = OSError(28, "No space left on device (a test)")
    fails("save", common.Context, "save", raising(0, disk_full, lambda self, stage, *a, **k: stage == "base"),
          "full", "base")
    val_oom = RuntimeError("out of memory in validation (a test)")
    fails("val", GPT, "forward", raising(1, val_oom, lambda *a, **k: k.get("loss_reduction") == "none"),
          "full", "base")
    (out / f"errors{rank}.json").write_text(json.dumps(errors))

    # 3. `torchrun -m nanorl eval`: the ranks share the questions, the shuffled copies too (counted), rank 0
    # alone writes the file and prints
    from nanorl.cli import main
    asked = []
    def counting(original):
        def counted(ctx, model, examples, *a, **k):
            asked.extend(ex.id for ex in examples)
            return original(ctx, model, examples, *a, **k)
        return counted
    ev.generative_records = counting(ev.generative_records)
    try:
        main(["eval", "--checkpoint", "crashy/sft", "--max-examples", "4", "--shuffle-options", "2", "--json"])
    except SystemExit as e:
        (out / f"eval_exit{rank}").write_text(str(e.code))
    (out / f"asked{rank}.json").write_text(json.dumps(asked))
    # 4. `torchrun -m nanorl pipeline`: the summary printed once (rank 0; the report alone, eval's file kept)
    try:
        main(["pipeline", "--preset", "tiny", "--only", "report", "--json", "name=crashy", *overrides])
    except SystemExit as e:
        (out / f"pipeline_exit{rank}").write_text(str(e.code))
    """
).replace(
    "__OVERRIDES__",
    repr([
        "model.depth=1", "model.n_embd=32", "model.n_head=1", "model.seq_len=64", "tokenizer.train_chars=50000",
        "base.steps=4", "base.device_batch_size=2", "base.checkpoint_every=2", "base.eval_every=0", "mid.steps=1",
        "mid.device_batch_size=2", "sft.steps=1", "sft.device_batch_size=2", "rl.steps=3", "rl.prompts_per_step=2",
        "rl.group_size=2", "rl.max_new_tokens=8", "rl.checkpoint_every=1", "rl.dynamic_sampling=true",
        "rl.max_sample_batches=2", "rl.mask_truncated=false", "eval.max_examples=2", "eval.batch_size=1",
        "eval.max_new_tokens=4", "eval.mode=generative", "eval.samples=0", "telemetry.console=false", "device=cpu",
    ]),
)  # fmt: skip


@pytest.mark.slow
def test_two_ranks_resume_exactly_and_fail_together(tmp_path, monkeypatch, capsys):
    proc = _torchrun(tmp_path, RESUME_AND_ERRORS, timeout=180)
    files = [tmp_path / f"eval_exit{r}" for r in (0, 1)]
    assert all(f.exists() for f in files), proc.stderr[-3000:]
    # a run interrupted and resumed on two ranks equals the uninterrupted one: losses and weights, base and RL
    seen = json.loads((tmp_path / "resume.json").read_text())
    for stage in ("base", "rl"):
        assert seen[f"full:{stage}"] == seen[f"crashy:{stage}"], stage
    assert len(seen["full:base"][0]) == 4 and len(seen["full:rl"][0]) == 3
    assert "rl: resuming at step 2/3" in proc.stderr, proc.stderr[-3000:]

    # a reward that raises on rank 1 (in dynamic sampling), an update that runs out of memory on rank 1 and an
    # engine that fails on rank 1 in eval: rank 1 raises its error, rank 0 the same, naming rank 1
    e0, e1 = (json.loads((tmp_path / f"errors{r}.json").read_text()) for r in (0, 1))
    # and a checkpoint that rank 0 alone fails to write in a supervised stage: rank 1 raises it too
    assert e0.pop("save") == "OSError: [Errno 28] No space left on device (a test)", e0
    assert e1.pop("save") == "NanorlError: rank 0: OSError: [Errno 28] No space left on device (a test)", e1
    assert e1 == {
        "reward": "ValueError: cannot score arith-train-" + e1["reward"].rsplit("-", 1)[1],
        "update": "RuntimeError: CUDA out of memory (a test)",
        "eval": "RuntimeError: the engine failed",
        "val": "RuntimeError: out of memory in validation (a test)",
    }, e1
    assert e0 == {k: f"NanorlError: rank 1: {v}" for k, v in e1.items()}, e0

    # `nanorl eval` under torchrun: both ranks finish; rank 0 printed the result once and wrote the file
    assert [f.read_text() for f in files] == ["0", "0"]
    decoder, printed_docs, at = json.JSONDecoder(), [], 0
    while proc.stdout[at:].strip():
        doc, end = decoder.raw_decode(proc.stdout[at:].lstrip())
        at = len(proc.stdout) - len(proc.stdout[at:].lstrip()) + end
        printed_docs.append(doc)
    printed, summary = printed_docs  # one eval result and one pipeline summary: rank 1 printed neither
    assert printed["n"] == 4 and printed["stage"] == "sft"
    written = json.loads((tmp_path / "home/runs/crashy/eval/arith-dev-sft.json").read_text())
    assert _without_seconds(written) == _without_seconds(printed)
    # each rank asked half the questions and half their 8 shuffled copies (batches of 1: every other one) ...
    asked = [json.loads((tmp_path / f"asked{r}.json").read_text()) for r in (0, 1)]
    ids = [f"arith-dev-{i}" for i in range(4)]
    assert asked[0] == ids[0::2] + [ids[0], ids[1], ids[2], ids[3]], asked
    assert asked[1] == ids[1::2] + [ids[0], ids[1], ids[2], ids[3]], asked
    # ... and the position-bias figures are one process's
    monkeypatch.setenv("NANORL_HOME", str(tmp_path / "home"))
    from nanorl.cli import main

    with pytest.raises(SystemExit) as one_process:
        main(["eval", "--checkpoint", "crashy/sft", "--max-examples", "4", "--shuffle-options", "2", "--json"])
    assert one_process.value.code == 0
    shuffle = printed["modes"]["generative"]["shuffle"]
    assert shuffle["shuffle_k"] == 2
    assert shuffle == json.loads(capsys.readouterr().out)["modes"]["generative"]["shuffle"]

    # `nanorl pipeline` under torchrun: both ranks finish, and its summary was shown once
    assert [(tmp_path / f"pipeline_exit{r}").read_text() for r in (0, 1)] == ["0", "0"]
    assert list(summary) == ["report"], summary
