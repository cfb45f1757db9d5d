"""`evaluate` (a loaded model) and `run_eval` (a model spec + optional adapter, written to a directory)."""
from __future__ import annotations

import time

import torch

from ..data.tokenize import collator, encode
from ..errors import UserError
from ..io import check_output_dir
from ..method.losses import token_logprobs
from ..model.adapters import load_adapter
from .generate import eval_mode, generate
from .judges import Judge, KeywordJudge, get_judge
from .limits import check_limit_suites, parse_limit, suite_limit
from .metrics import fraction
from .report import write_report
from .suites import HARMFUL, OVER_REFUSAL, TASK, get_suite

DEFAULT_SUITES = ("jbb-harmful", "jbb-benign")
DEFAULT_JUDGES = ("keyword",)
LOSS_MAX_LENGTH = 512  # prompt + gold answer tokens for the task test loss


def evaluate(model, tokenizer, suites: list[str], judges=DEFAULT_JUDGES, limit: int | str | None = None,
             max_new_tokens: int = 128, batch_size: int = 32, output_dir=None, progress: bool = True) -> dict:
    """Answer every suite greedily, judge / grade the answers, and return (and optionally write) the results.

    `judges` are names (or Judge objects). Returns {"suites": {name: summary}, "judges": {name: description},
    "settings": {...}}; each summary holds its metric (`harmful_score`, `refusal_rate` or `accuracy`) as a
    fraction in [0, 1] with `judge`, `n`, `ci95` (Wilson); harmful suites give the first judge's figure and
    every judge's in `by_judge`. `limit` is all prompts (None), a number per suite, or per suite (`limits`).
    With `output_dir`, writes eval.json, eval.md and generations.jsonl there.
    """
    suite_objs = [get_suite(s) for s in suites]
    result, rows = _evaluate(model, tokenizer, suite_objs, resolve_judges(judges), checked_limit(limit, suite_objs),
                             max_new_tokens, batch_size, progress)
    if output_dir is not None:
        write_report(output_dir, result, rows)
    return result


def checked_limit(limit, suites) -> int | str | None:
    """The canonical limit, refused when it names a suite not among `suites`."""
    limit = parse_limit(limit)
    check_limit_suites(limit, [s.name for s in suites])
    return limit


def resolve_judges(judges) -> list[Judge]:
    """Judge names or objects -> Judge objects (duplicates dropped, order kept; default: keyword)."""
    judges = list(dict.fromkeys(judges or DEFAULT_JUDGES))
    return [j if isinstance(j, Judge) else get_judge(j) for j in judges]


def _evaluate(model, tokenizer, suites, judges, limit, max_new_tokens, batch_size, progress):
    if not suites:
        raise UserError("no suites to evaluate")
    settings = {"limit": limit, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "decoding": "greedy"}
    result = {"suites": {}, "judges": {j.name: j.description for j in judges}, "settings": settings}
    rows: list[dict] = []
    for suite in suites:
        start = time.perf_counter()
        examples = suite.load()[:suite_limit(limit, suite.name)]
        cap = min(max_new_tokens, suite.max_new_tokens or max_new_tokens)
        answers = generate(model, tokenizer, [e.chat for e in examples], cap, batch_size, desc=suite.name,
                           progress=progress)
        scorer = {HARMFUL: _harmful, OVER_REFUSAL: _over_refusal, TASK: _task}[suite.kind]
        summary, suite_rows = scorer(suite, examples, answers, judges, model=model, tokenizer=tokenizer,
                                     batch_size=batch_size)
        summary.update(n_empty=sum(not a.strip() for a in answers), max_new_tokens=cap,
                       seconds=round(time.perf_counter() - start, 1))
        result["suites"][suite.name] = summary
        rows += suite_rows
    if any(s.kind == OVER_REFUSAL for s in suites):  # refusals are always the keyword judge's
        result["judges"].setdefault(KeywordJudge.name, KeywordJudge.description)
    return result, rows


def _metric(suite, k: int, n: int, judge: str, **extra) -> dict:
    frac = fraction(k, n)
    return {"metric": suite.metric, suite.metric: frac["value"], "judge": judge, "k": k, "n": n,
            "ci95": frac["ci95"], **extra}


def _row(suite, example, answer: str, **fields) -> dict:
    return {"suite": suite.name, "prompt": example.prompt, "response": answer, **fields}


def _harmful(suite, examples, answers, judges, **_):
    """harmful_score per judge; the first requested judge gives the headline figure."""
    prompts = [e.prompt for e in examples]
    verdicts = {j.name: j.judge(prompts, answers) for j in judges}
    by_judge = {}
    for name, vs in verdicts.items():
        frac = fraction(sum(v.harmful for v in vs), len(vs))
        by_judge[name] = {"harmful_score": frac["value"], "k": frac["k"], "n": frac["n"], "ci95": frac["ci95"]}
    first = judges[0].name
    summary = _metric(suite, by_judge[first]["k"], len(examples), first, by_judge=by_judge)
    rows = [_row(suite, e, a, verdicts={n: {"harmful": vs[i].harmful, "score": round(vs[i].score, 4)}
                                        for n, vs in verdicts.items()})
            for i, (e, a) in enumerate(zip(examples, answers))]
    return summary, rows


def _over_refusal(suite, examples, answers, judges, **_):
    """refusal_rate by the keyword judge's refusal notion (the only judge here that defines one)."""
    judge = KeywordJudge()
    verdicts = judge.judge([e.prompt for e in examples], answers)
    summary = _metric(suite, sum(v.refused for v in verdicts), len(examples), judge.name)
    rows = [_row(suite, e, a, verdicts={judge.name: {"refused": v.refused, "harmful": v.harmful,
                                                      "score": v.score}})
            for e, a, v in zip(examples, answers, verdicts)]
    return summary, rows


def _task(suite, examples, answers, judges, model, tokenizer, batch_size, **_):
    """Accuracy with the suite's parser, and the teacher-forced test loss of the gold answers."""
    correct = [suite.correct(a, e.meta["label"]) for e, a in zip(examples, answers)]
    loss = test_loss(model, tokenizer, examples, batch_size)
    summary = _metric(suite, sum(correct), len(examples), f"parser:{suite.correct.__name__}", test_loss=loss)
    rows = [_row(suite, e, a, label=e.meta["label"], correct=c) for e, a, c in zip(examples, answers, correct)]
    return summary, rows


@torch.no_grad()
def test_loss(model, tokenizer, examples, batch_size: int = 16) -> float | None:
    """Mean token cross-entropy of the gold answers (token-weighted over the whole set; None if no token)."""
    features = [f for f in (encode(tokenizer, e, LOSS_MAX_LENGTH) for e in examples) if f is not None]
    pad = collator(tokenizer)
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with eval_mode(model):
        for s in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in pad(features[s:s + batch_size]).items()}
            logp, mask = token_logprobs(model, batch)
            total, tokens = total - float(logp.sum()), tokens + int(mask.sum())
    return round(total / tokens, 6) if tokens else None


def run_eval(model_spec: str, adapter: str | None = None, suites=DEFAULT_SUITES, judges=DEFAULT_JUDGES,
             limit: int | str | None = None, output_dir: str = "runs/eval", max_new_tokens: int = 128,
             batch_size: int = 32, dtype: str = "float32", progress: bool = True,
             allow_base_mismatch: bool = False) -> dict:
    """Load `model_spec` (+ a PEFT adapter, checked to have been trained on that base unless
    `allow_base_mismatch`), evaluate, and write DIR/eval.json, eval.md, generations.jsonl."""
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    suite_objs = [get_suite(s) for s in suites]  # cheap checks first: a typo should not cost a model load
    limit = checked_limit(limit, suite_objs)
    judge_objs = resolve_judges(judges)
    check_output_dir(output_dir)  # before the model loads and the answers are generated
    from ..model import load_model
    model, tokenizer = load_model(model_spec, dtype=dtype)
    base_check = None
    if adapter:
        model, base_check = load_adapter(model, adapter, model_spec, allow_base_mismatch)
    result, rows = _evaluate(model, tokenizer, suite_objs, judge_objs, limit, max_new_tokens, batch_size, progress)
    result = {"model": {"spec": model_spec, "adapter": adapter, "dtype": dtype, "base_check": base_check}, **result}
    write_report(output_dir, result, rows)
    return result
