"""Stage `eval`: the task's evaluation on dev/test, written to `eval/<task>-<split>.json`.

Two modes (`eval.mode`):
- generative: sample a completion (greedy at eval.temperature 0), `task.extract` the answer, `task.is_correct`;
- categorical (multiple-choice tasks): after the prompt and the words of the answer line ("Final Answer:"),
  compare the logits of the answer letters' tokens; the largest is the prediction. It asks the model for the
  answer without its reasoning, and answers every question, so it is the "what does it believe" reading.

With `eval.samples` = k > 0 a third mode, `sampled`, runs beside the generative one: k completions per question
at `eval.sample_temperature`. Its accuracy is pass@1, the mean over all completions; it is the policy that RL
trains (rollouts are sampled), and averaging k completions measures it with far less noise than one greedy
answer per question. pass@k and maj@k (majority vote) come with it.

Per completion a record {"id", "sample", "gold", "pred", "format_ok", "correct", ...}; per mode the summary of
`nanorl.multichoice.summarize` (accuracy with its Wilson interval, chance and majority baselines, format rate,
letter distribution, confusion) when the task has choices, else accuracy with its Wilson interval and the
majority baseline (always giving the commonest gold answer: free-form answers have no chance level); for
`sampled`, n counts questions and the interval allows for their completions being correlated
(`nanorl.multichoice.sampled_stats`).

The stage evaluates the run's final model (`eval/<task>-<split>.json`) and, when RL ran, the SFT model as well
(`eval/<task>-<split>-sft.json`); the final file then holds the paired comparison of the two per mode
(`nanorl.multichoice.compare`: McNemar's test, or the sign test over questions for `sampled`).

Under torchrun the ranks share the questions in batches of eval.batch_size and every rank gets all the records
(`sharded_records`), so N GPUs evaluate in ~1/N of the time (with at least N batches) and the records equal a
single process's; rank 0 writes the files.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nanorl import checkpoint as ckpt
from nanorl.api import EvalResult, Example, NanorlError
from nanorl.config import MODEL_STAGES
from nanorl.device import all_gather_objects, autocast, raise_together, together
from nanorl.stages.common import Context, warn_past_context

ANSWER_CUE = "Final Answer:"  # the words before the letter in the answer line (nanorl.multichoice)


Progress = Callable[[int, int, int], None]  # (questions done, questions in all, completion tokens so far)


def generative_records(
    ctx: Context, model, examples: list[Example], seed: int = 0, samples: int = 1, temperature: float | None = None,
    progress: Progress | None = None, top_k: int = 0,
) -> list[dict[str, Any]]:  # fmt: skip
    """One record per completion: `samples` completions of each question (the engine prefills its prompt once),
    at `temperature` (default eval.temperature) and `top_k` (0: every token); a question's records are
    consecutive, numbered by "sample"."""
    task, tok, ecfg = ctx.task, ctx.tokenizer(), ctx.cfg.eval
    temperature = ecfg.temperature if temperature is None else temperature
    engine = ctx.engine(model)
    prompts = [tok.render_for_completion(task.prompt(ex)) for ex in examples]
    warn_past_context(ctx, "eval", prompts, ecfg.max_new_tokens, "eval.max_new_tokens")
    groups: list[list[Any]] = []
    tokens = 0
    for i in range(0, len(prompts), ecfg.batch_size):
        batch = engine.sample(
            prompts[i : i + ecfg.batch_size], samples, ecfg.max_new_tokens, temperature, top_k, seed=seed + i
        )
        groups += batch
        if progress is not None:
            tokens += sum(len(s.tokens) for g in batch for s in g)
            progress(len(groups), len(prompts), tokens)
    from nanorl.multichoice import ends_with_final_answer

    records = []
    for ex, group in zip(examples, groups, strict=True):
        has_choices = task.choices(ex) is not None
        for j, s in enumerate(group):
            pred = task.extract(s.text)
            records.append(
                {
                    "id": ex.id,
                    "sample": j,
                    "gold": ex.answer,
                    "pred": pred,
                    "correct": bool(task.is_correct(ex, pred)),
                    "format_ok": ends_with_final_answer(s.text) if has_choices else pred is not None,
                    "finished": s.finished,
                    "completion_tokens": len(s.tokens),
                    "completion": s.text,
                }
            )
    return records


@torch.no_grad()
def categorical_records(ctx: Context, model, examples: list[Example]) -> list[dict[str, Any]]:
    """After the prompt and "Final Answer:", the answer letter whose token the model rates highest; the letters'
    tokens and the context's end as `nanorl.multichoice.letter_tokens` says (" A" after ":", or "A" after ": ")."""
    from nanorl.multichoice import letter_tokens

    task, tok = ctx.task, ctx.tokenizer()
    model.eval()
    cues: dict[tuple[str, ...], tuple[list[int], list[int]]] = {}  # letters -> (the context's end, their tokens)
    rows = []
    for ex in examples:
        letters = tuple(task.choices(ex) or ())
        if not letters:
            continue
        if letters not in cues:
            try:
                cand, pad = letter_tokens(tok.encode, letters)
            except ValueError as e:
                raise NanorlError(str(e), hint="use --mode generative", exit_code=2) from None
            cues[letters] = (tok.encode(ANSWER_CUE + pad), cand)
        cue, cand = cues[letters]
        rows.append((ex, letters, tok.render_for_completion(task.prompt(ex)) + cue, cand))
    # batch contexts of equal length (no padding: a padded row would attend to the padding)
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_len.setdefault(len(r[2]), []).append(i)
    preds: dict[int, str] = {}
    bs = ctx.cfg.eval.batch_size
    for idx in by_len.values():
        for s in range(0, len(idx), bs):
            chunk = idx[s : s + bs]
            x = torch.tensor([rows[i][2] for i in chunk], device=ctx.device)
            with autocast(ctx.device, ctx.dtype):
                logits = model(x, logits="last")[:, -1].float()
            for k, i in enumerate(chunk):
                cand = torch.tensor(rows[i][3], device=ctx.device)
                preds[i] = rows[i][1][int(logits[k, cand].argmax())]
    records = []
    for i, (ex, _, _, _) in enumerate(rows):
        pred = preds[i]
        records.append(
            {
                "id": ex.id,
                "gold": ex.answer,
                "pred": pred,
                "correct": bool(task.is_correct(ex, pred)),
                "format_ok": True,
            }
        )
    return records


def summary(records: list[dict[str, Any]], multiple_choice: bool, sampled: bool = False) -> dict[str, Any]:
    """A mode's summary. Multiple choice: `nanorl.multichoice.summarize` (baselines, format rate, letters) over
    every completion; the accuracy is the task's verdict. `sampled` (several completions per question): the
    accuracy, its interval and n come from `sampled_stats` (pass@1 over questions, with pass@k and maj@k)."""
    from nanorl.multichoice import majority_baseline, sampled_stats, summarize, wilson_interval

    n, k = len(records), sum(r["correct"] for r in records)
    if multiple_choice:
        out = summarize(records)
        # the task decides correctness (summarize compares letters; they agree for letter tasks)
        out.update(correct=k, accuracy=k / n if n else 0.0, accuracy_ci95=list(wilson_interval(k, n)))
    else:
        # free-form answers (GSM8K's numbers): no chance level, but always giving the commonest gold answer is
        # a floor every accuracy is read against
        answer, floor = majority_baseline([r["gold"] for r in records])
        out = {
            "n": n,
            "correct": k,
            "accuracy": k / n if n else 0.0,
            "accuracy_ci95": list(wilson_interval(k, n)),
            "majority_answer": answer,
            "majority_baseline": floor,
            "beats_majority": n > 0 and wilson_interval(k, n)[0] > floor,
            "answered_rate": sum(r["pred"] is not None for r in records) / n if n else 0.0,
        }
    if sampled:
        out.update(sampled_stats(records))  # n: questions now; the completions are counted apart
        out["correct_completions"] = out.pop("correct")
        out["beats_majority"] = out["n"] > 0 and out["accuracy_ci95"][0] > out["majority_baseline"]
    return out


def sharded_records(ctx: Context, examples: list[Example], make) -> list[dict[str, Any]]:
    """The records of `make(examples, seed_offset)` over all the examples, every rank getting all of them back in
    the questions' order (a question's records consecutive, as `make` returns them).

    Under torchrun the questions go out in batches of eval.batch_size, batch k to rank k mod world_size, each made
    at the offset of its first question: the batches, their seeds and so their records are those of a single
    process (which makes batch k at that seed), and an evaluation does not depend on the number of ranks."""
    if ctx.world_size == 1:
        return make(examples, 0)
    bs = ctx.cfg.eval.batch_size
    mine = range(ctx.rank * bs, len(examples), ctx.world_size * bs)
    # an error on one rank (the engine, an out-of-memory error) is raised on every rank: its flag travels in the
    # gather of the records, which the others would otherwise wait in until the process group's timeout
    err = None
    try:
        batches = [(start, make(examples[start : start + bs], start)) for start in mine]
    except Exception as e:  # noqa: BLE001 - raised again, on every rank, just below
        err, batches = e, []
    parts = all_gather_objects((err is not None, batches))
    if any(failed for failed, _ in parts):
        raise_together(err)
    # put together by batch, not by question id: `--shuffle-options` asks copies of a question under its id
    by_start = dict(batch for _, part in parts for batch in part)
    return [r for start in sorted(by_start) for r in by_start[start]]


def evaluate(
    ctx: Context, model, split: str, mode: str, max_examples: int = 0, seed: int = 0, samples: int | None = None,
    progress: Callable[[str], Progress] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Evaluate `model` on a split: {"task", "split", "n", "modes": {mode: summary + "records"}}.

    With `samples` (default eval.samples) > 0 and the generative mode, the `sampled` mode runs too: that many
    completions per question at eval.sample_temperature. `progress(mode)` gives the sampling modes' progress
    callback (`nanorl eval` draws a bar from it).
    """
    ecfg = ctx.cfg.eval
    samples = ecfg.samples if samples is None else samples
    examples = ctx.examples(split)
    if max_examples:
        examples = examples[:max_examples]
    mc = bool(examples) and ctx.task.choices(examples[0]) is not None
    if mode == "categorical" and examples and not mc:
        raise NanorlError(
            f"{ctx.task.name} answers are free-form: categorical evaluation compares the answer options' logits",
            hint="use --mode generative",
            exit_code=2,
        )
    modes = ["generative", "categorical"] if mode == "both" else [mode]
    if not mc:  # "both" on a free-form task: the generative mode is all there is
        modes = ["generative"]
    if samples and "generative" in modes:
        modes.append("sampled")
    out: dict[str, Any] = {"task": ctx.task.name, "split": split, "n": len(examples), "modes": {}}
    for m in modes:
        t0 = time.time()
        report = progress(m) if progress is not None else None

        def make(exs: list[Example], offset: int, m: str = m, report: Progress | None = report):
            if m == "generative":
                return generative_records(ctx, model, exs, seed + offset, progress=report)
            if m == "sampled":  # its own seed stream, apart from a generative mode that samples too (temperature > 0)
                return generative_records(
                    ctx, model, exs, seed + 1_000_003 + offset, samples, ecfg.sample_temperature, progress=report,
                    top_k=ecfg.sample_top_k,
                )  # fmt: skip
            return categorical_records(ctx, model, exs)

        records = sharded_records(ctx, examples, make)
        out["modes"][m] = {**summary(records, mc, m == "sampled"), "seconds": time.time() - t0, "records": records}
        if m == "sampled":
            out["modes"][m]["temperature"] = ecfg.sample_temperature
            out["modes"][m]["top_k"] = ecfg.sample_top_k
    first = out["modes"][modes[0]]
    out["accuracy"] = first["accuracy"]
    out["mode"] = modes[0]
    return out


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def publish(ctx: Context, stage: str, result: dict[str, Any], step: int | None = None) -> None:
    """Hand every mode's summary to the metrics bus (and through it to the hooks)."""
    for mode, s in result["modes"].items():
        metrics = {k: v for k, v in s.items() if k != "records"}
        metrics["mode"] = mode
        metrics["model_stage"] = result.get("stage", stage)
        ctx.bus.eval(stage, step, EvalResult(result["task"], result["split"], metrics))


def split_label(split: str) -> str:
    """The split's name in eval file names: "validation" is "dev" (the name the built-in and bundled tasks give
    that split in their example ids too), so that both spellings write one file."""
    return "dev" if split == "validation" else split


def final_stage(ctx: Context) -> str | None:
    for stage in reversed(MODEL_STAGES):
        if ckpt.is_done(ctx.stage_dir(stage)):
            return stage
    return None


def run(ctx: Context) -> dict[str, Any]:
    from nanorl.multichoice import compare

    ecfg = ctx.cfg.eval
    final = final_stage(ctx)
    if final is None:
        from nanorl.api import NanorlError

        raise NanorlError("nothing to evaluate: no model stage of this run has finished", hint="run the pipeline")
    stages = [final] + (["sft"] if final == "rl" and ckpt.is_done(ctx.stage_dir("sft")) else [])
    models = " and ".join(stages) + (" models" if len(stages) > 1 else " model")
    modes = ecfg.mode
    if modes == "both":  # a free-form task (GSM8K) has no categorical mode: `evaluate` runs generative only
        first = ctx.examples(ecfg.splits[0])[:1]
        modes = "generative and categorical" if first and ctx.task.choices(first[0]) is not None else "generative"
    info = ctx.info("eval", len(stages) * len(ecfg.splits), f"the {models} on {', '.join(ecfg.splits)} ({modes})")
    ctx.bus.stage_start(info)
    out: dict[str, Any] = {}
    for split in ecfg.splits:
        results = {}
        for stage in stages:
            model = together(ctx.load_model, stage)
            res = evaluate(ctx, model, split, ecfg.mode, ecfg.max_examples, seed=ctx.cfg.seed)
            res["stage"] = stage
            res["checkpoint"] = str(ctx.stage_dir(stage))
            results[stage] = res
            publish(ctx, "eval", res)
            del model
        main = results[final]
        if "sft" in results and final != "sft":
            main["compare"] = {
                m: {
                    "a": final,
                    "b": "sft",
                    **compare(main["modes"][m]["records"], results["sft"]["modes"][m]["records"]),
                }
                for m in main["modes"]
            }
        if ctx.rank == 0:
            split_name = split_label(split)
            for stage, res in results.items():
                suffix = "" if stage == final else f"-{stage}"
                write_json(ctx.run_dir / "eval" / f"{ctx.task.name}-{split_name}{suffix}.json", res)
        out[split] = {f"{stage}_acc": r["accuracy"] for stage, r in results.items()}
        out[split].update(
            {
                f"{stage}_sampled_acc": r["modes"]["sampled"]["accuracy"]
                for stage, r in results.items()
                if "sampled" in r["modes"]
            }
        )
    summary_metrics = {f"{split}_{key}": acc for split, d in out.items() for key, acc in d.items()}
    ctx.bus.stage_end(info, summary_metrics)
    return summary_metrics


def shuffle_check(ctx: Context, model, result: dict[str, Any], k: int, seed: int = 0) -> None:
    """`nanorl eval --shuffle-options K`: re-ask each question of `result` with its options permuted K times, in
    each of its modes, and add `shuffle` to the mode (`nanorl.multichoice.shuffle_eval`: accuracy under the
    permutations, and how often the chosen option *content* / *letter* stays the same: position bias)."""
    from nanorl.api import NanorlError
    from nanorl.multichoice import shuffle_eval

    examples = ctx.examples(result["split"])[: result["n"]]
    if not examples or ctx.task.choices(examples[0]) is None:
        raise NanorlError(
            f"--shuffle-options needs a multiple-choice task ({ctx.task.name} has no options)", exit_code=2
        )
    for mode, s in result["modes"].items():
        if mode == "sampled":  # position bias is read from the greedy and categorical answers
            continue
        base = {r["id"]: r["pred"] for r in s["records"]}

        def answer(exs: list[Example], mode: str = mode) -> list[str | None]:
            def make(batch: list[Example], offset: int) -> list[dict[str, Any]]:
                if mode == "generative":
                    return generative_records(ctx, model, batch, seed=seed + offset)
                return categorical_records(ctx, model, batch)

            return [r["pred"] for r in sharded_records(ctx, exs, make)]  # under torchrun the ranks share them

        s["shuffle"] = shuffle_eval(examples, [base.get(e.id) for e in examples], k, answer, seed=seed)
