"""End-to-end runs of the trainer on the embedded task (tiny sizes, CPU)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from rtpo.checkpoint import list_checkpoints
from rtpo.cli import parse_args
from rtpo.logprobs import row_tokens
from rtpo.metrics import read_metrics
from rtpo.trainer import Trainer

from conftest import tiny_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv):
    return Trainer(parse_args(argv), log=lambda m: None).train()


def strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


STEP_METRICS = ["keep", "injected_tokens", "completion_tokens", "reasoning_tokens", "reward", "reward/accuracy",
                "reward/format", "accuracy", "zero_var_groups", "clip_frac", "entropy", "lr", "loss", "grad_norm",
                "time_rollout", "time_scoring", "time_reference", "time_update"]


def test_end_to_end_writes_metrics_checkpoint_and_config(tmp_path):
    """A few steps finish and write metrics.jsonl (every per-step metric of RTPO.md), checkpoints,
    the resolved config and a summary; the keep ratio anneals from 1 to 0."""
    out = tmp_path / "run"
    summary = run(tiny_args(out, tmp_path / "cache", "--loss.beta", "0.05"))
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    for key in STEP_METRICS + ["kl"]:
        assert all(key in r for r in steps), key
    assert steps[0]["keep"] == 1.0 and steps[-1]["keep"] == 0.0
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert json.loads((out / "config.json").read_text())["run"]["max_steps"] == 4
    assert summary["steps"] == 4 and "eval/accuracy" in summary["eval_after"]


def test_the_default_is_the_recommended_rtpo_setting(tmp_path):
    """`python train.py` with no flags runs what benchmarks/rtpo_vs_grpo.py recommends: the cosine curriculum with
    the hint loss (weight 1), so the first steps train on the hint tokens (hint_nll is logged and the hint
    tokens enter the update); tiny sizes aside, nothing about the method is overridden here."""
    cfg = parse_args([])
    assert (cfg.curriculum.schedule, cfg.loss.hint_loss) == ("cosine", 1.0)
    out = tmp_path / "run"
    argv = [a for a in tiny_args(out, tmp_path / "cache", "--max_steps", "2", "--eval.num_examples", "0")]
    i = argv.index("--loss.hint_loss")
    del argv[i:i + 2]  # the project default, not the tests' 0
    run(argv)
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert steps[0]["keep"] == 1.0 and steps[0]["hint_nll"] > 0 and steps[0]["sup_tokens"] > 0


def test_resume_continues_from_saved_step_exactly(tmp_path):
    """4 steps straight == 2 steps + --resume + 2 steps: same metrics rows (timings aside) and
    bit-identical final weights."""
    a, b = tmp_path / "a", tmp_path / "b"
    cache = tmp_path / "cache"
    run(tiny_args(a, cache))
    first = run(tiny_args(b, cache, "--run.stop_after_steps", "2"))
    assert first["stopped"] == "stop_after_steps" and first["steps"] == 2
    run(tiny_args(b, cache, "--resume", "auto"))
    assert strip_times(read_metrics(a / "metrics.jsonl")) == strip_times(read_metrics(b / "metrics.jsonl"))
    from safetensors.torch import load_file

    wa = load_file(a / "checkpoints/step_000004/model.safetensors")
    wb = load_file(b / "checkpoints/step_000004/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_with_kl_keeps_the_starting_policy_as_reference(tmp_path):
    """With beta > 0 the reference is the policy the run STARTED from, also after --resume: 2 + resume
    + 2 steps log the same KL (and every other metric) as 4 steps in one go."""
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    kl = ("--loss.beta", "0.5", "--lr", "1e-2")  # a large lr makes the policy drift from the reference
    run(tiny_args(a, cache, *kl))
    run(tiny_args(b, cache, *kl, "--run.stop_after_steps", "2"))
    run(tiny_args(b, cache, *kl, "--resume", "auto"))
    ra, rb = (strip_times(read_metrics(d / "metrics.jsonl")) for d in (a, b))
    assert ra == rb and ra[-2]["kl"] > 0


def test_existing_run_is_not_overwritten(tmp_path):
    """Training into a folder that holds a run is refused unless resuming or --run.overwrite."""
    out = tmp_path / "run"
    run(tiny_args(out, tmp_path / "cache", "--max_steps", "1", "--eval.num_examples", "0"))
    from rtpo.config import ConfigError

    with pytest.raises(ConfigError, match="already holds a run"):
        run(tiny_args(out, tmp_path / "cache", "--max_steps", "1"))


@pytest.mark.slow
def test_train_py_cli(tmp_path):
    """`python train.py ...` exits 0 and prints a JSON summary; a bad key exits 2 with one error line."""
    cmd = [sys.executable, "train.py", *tiny_args(tmp_path / "run", tmp_path / "cache", "--max_steps", "2")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout[p.stdout.index("{\n"):])["steps"] == 2
    bad = subprocess.run([sys.executable, "train.py", "--optim.lrr", "1"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: unknown config key 'optim.lrr'; optim has: " + bad.stderr.split("optim has: ")[1].strip()]


def test_saved_embedded_tokenizer_reloads_identically(tmp_path):
    """The embedded tokenizer saved next to a Qwen2 config reloads with the same token ids
    (newlines included) and the same chat template."""
    from rtpo.embedded import build_model, build_tokenizer
    from rtpo.models import load_tokenizer

    tok = build_tokenizer()
    build_model(tok, 32, 1, 2, 1, 64).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(str(tmp_path))
    text = "<think>\n23+29=52\n52-4=48\n</think>\n48<|im_end|>"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.chat_template == tok.chat_template and again.padding_side == "left"


def test_hint_dropout_rows_get_the_evaluation_prompt(tmp_path):
    """With hint_dropout the first round(d * G) rows of each group are prompted with the evaluation
    prompt (no hint) and the rest with the hinted one; the groups' metrics split all-wrong/all-right."""
    cfg = parse_args(tiny_args(tmp_path / "run", tmp_path / "cache", "--G", "4", "--curriculum.hint_dropout", "0.5"))
    t = Trainer(cfg, log=lambda m: None)
    ro = t.sampler.rollout(0)
    for g, i in enumerate(ro.idx):
        eval_prompt, _ = t.run.builder.build(t.run.train_enc[i], 0.0)
        hinted, k = t.run.builder.build(t.run.train_enc[i], ro.keeps[g])
        assert k > 0 and ro.prompts[4 * g:4 * g + 4] == [eval_prompt] * 2 + [hinted] * 2
        assert ro.injected[4 * g:4 * g + 4] == [0, 0, k, k]
    row = t.train_step(0)
    assert 0 <= row["all_wrong_groups"] + row["all_right_groups"] <= 1


def test_resume_is_exact_with_per_example_hints_dropout_and_hint_loss(tmp_path):
    """The adaptive-hint knobs keep resume exact: per-example keeps are checkpointed, and the hint loss
    enters the update (its metric is logged) — 4 steps == 2 + resume + 2."""
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    knobs = ("--curriculum.per_example", "true", "--curriculum.hint_dropout", "0.34", "--loss.hint_loss", "0.5",
             "--curriculum.per_example_step", "0.5", "--optim.mini_batches", "2")
    run(tiny_args(a, cache, *knobs))
    run(tiny_args(b, cache, *knobs, "--run.stop_after_steps", "2"))
    run(tiny_args(b, cache, *knobs, "--resume", "auto"))
    ra, rb = (strip_times(read_metrics(d / "metrics.jsonl")) for d in (a, b))
    assert ra == rb
    assert any(r.get("hint_nll") for r in ra) and "mean_example_keep" in ra[0]


def test_hint_loss_changes_the_update_only_through_hint_tokens(tmp_path):
    """hint_loss 0 and > 0 give the same policy-gradient metrics at step 0 (same rollouts), but
    different weights after it: the supervised term adds gradient."""
    outs = []
    for w in ("0", "1.0"):
        cfg = parse_args(tiny_args(tmp_path / f"r{w}", tmp_path / "cache", "--loss.hint_loss", w, "--max_steps", "1",
                                   "--eval.num_examples", "0"))
        t = Trainer(cfg, log=lambda m: None)
        row = t.train_step(0)
        outs.append((row, [p.detach().clone() for p in t.run.model.parameters()]))
    (r0, w0), (r1, w1) = outs
    assert r0["reward"] == r1["reward"] and r0["clip_frac"] == r1["clip_frac"]
    assert r0["hint_nll"] is None and r1["hint_nll"] > 0
    assert any(not torch.equal(x, y) for x, y in zip(w0, w1))


def test_gspo_and_tis_train_and_the_samplers_logprobs_line_up_with_the_trainers(tmp_path):
    """A run with loss.importance sequence and truncated importance sampling (2 passes per rollout,
    so the old-policy pass and the ratios are real) trains and logs the TIS metrics; the rollout's
    own log-probs match the trainer's old-policy log-probs token for token (fp32 on CPU: gap under
    1e-4, so every weight is ~1 and none is truncated), which proves they are aligned."""
    out = tmp_path / "run"
    run(tiny_args(out, tmp_path / "cache", "--loss.importance", "sequence", "--loss.tis_cap", "2",
                  "--loss.num_iterations", "2", "--loss.epsilon_low", "3e-4", "--loss.epsilon_high", "4e-4",
                  "--eval.num_examples", "0"))
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert len(rows) == 4
    for r in rows:
        assert r["rollout_logp_gap"] < 1e-4 and r["tis_weight"] == pytest.approx(1.0, abs=1e-4)
        assert r["tis_truncated"] == 0 and math.isfinite(r["loss"]) and r["skipped_updates"] == 0


def update_grads(t, ro, sc):
    """The gradient of each optimizer update of `t.updater.update(ro, sc)` and its metrics; the model and optimizer
    come back to where they started."""
    import copy

    model0, opt0 = copy.deepcopy(t.run.model.state_dict()), copy.deepcopy(t.backend.optimizer.state_dict())
    grads, step = [], t.backend.step

    def capture(loss_finite):
        grads.append({n: p.grad.clone() for n, p in t.run.model.named_parameters() if p.grad is not None})
        return step(loss_finite)
    t.backend.step = capture
    try:
        metrics = t.updater.update(ro, sc)
    finally:
        t.backend.step = step
        t.run.model.load_state_dict(model0)
        t.backend.optimizer.load_state_dict(opt0)
    return grads, metrics


def test_packed_update_equals_the_padded_update(tmp_path):
    """The update's gradients (policy pass, old-policy pass of num_iterations 2, reference pass of beta > 0,
    hint-loss rows, hint dropout so that a group holds two prompts, micro batches of 4 rows cutting groups
    of 3) are those of the padded layout within 1e-5, with the prompt shared or not."""
    cfg = parse_args(tiny_args(tmp_path / "run", tmp_path / "cache", "--loss.beta", "0.05", "--loss.num_iterations", "2",
                               "--loss.hint_loss", "0.5", "--curriculum.hint_dropout", "0.4", "--curriculum.schedule",
                               "constant", "--curriculum.value", "0.6", "--rollout.prompts_per_step", "3",
                               "--rollout.max_new_tokens", "10"))
    t = Trainer(cfg, log=lambda m: None)
    ro = t.sampler.rollout(0)
    sc = t.scorer.score(ro)
    # the tiny warm-start never stops early: cut completions to different lengths (padding to drop)
    ro.completions = [c[:1 + (3 * i) % len(c)] for i, c in enumerate(ro.completions)]
    assert ro.hinted_rows == 2 and len({len(c) for c in ro.completions}) > 3
    runs = {}
    for packing, share in ((False, False), (True, True), (True, False)):
        t.cfg.optim.packing, t.cfg.optim.share_prefix = packing, share
        runs[packing, share] = update_grads(t, ro, sc)
    ref_grads, ref_m = runs[False, False]
    assert len(ref_grads) == 2
    for key in ((True, True), (True, False)):
        grads, m = runs[key]
        for g, r in zip(grads, ref_grads):
            assert g.keys() == r.keys()
            assert max((g[k] - r[k]).abs().max().item() for k in g) <= 1e-5, key
        for name in ("loss", "hint_nll", "kl", "entropy", "clip_frac"):
            assert abs(m[name] - ref_m[name]) <= 1e-5, (key, name)


def test_token_budget_micro_batches_leave_the_update_unchanged(tmp_path):
    """optim.micro_batch_tokens cuts the rows where the tokens run out instead of every micro_batch_size rows:
    the normalisers are the whole batch's, so the gradients and metrics stay those of the row-count split
    (1e-5); under a backend with a fixed accumulation count it makes exactly that many micro batches."""
    cfg = parse_args(tiny_args(tmp_path / "run", tmp_path / "cache", "--loss.hint_loss", "0.5", "--curriculum.schedule",
                               "constant", "--curriculum.value", "0.6", "--rollout.prompts_per_step", "3",
                               "--rollout.max_new_tokens", "10", "--loss.loss_type", "grpo"))
    t = Trainer(cfg, log=lambda m: None)
    ro = t.sampler.rollout(0)
    sc = t.scorer.score(ro)
    ro.completions = [c[:1 + (3 * i) % len(c)] for i, c in enumerate(ro.completions)]
    ref_grads, ref_m = update_grads(t, ro, sc)
    rows, counts = list(range(len(ro))), set()
    assert len(t.updater.micro_batches(ro, rows)) == 3  # 9 rows, 4 per micro batch
    for budget in (30, 80):
        t.cfg.optim.micro_batch_tokens = budget
        micro = t.updater.micro_batches(ro, rows)
        costs = dict(zip(rows, row_tokens(ro.prompts, ro.completions, rows)))
        assert sum(micro, []) == rows and all(len(mb) == 1 or sum(costs[i] for i in mb) <= budget for mb in micro)
        counts.add(len(micro))
        (grads,), m = update_grads(t, ro, sc)
        assert max((grads[k] - ref_grads[0][k]).abs().max().item() for k in grads) <= 1e-5, budget
        assert all(abs(m[k] - ref_m[k]) <= 1e-5 for k in ("loss", "hint_nll", "entropy", "clip_frac"))
    assert counts - {3}  # other cuts than the row count's
    t.backend.gas = 2  # as DDP / DeepSpeed: the count is fixed
    assert len(t.updater.micro_batches(ro, rows)) == 2


def _reference_grads(model, rows, advantages, n_tokens):
    """float64 gradient of -sum_r A_r * sum_t log p(comp_r,t) / n_tokens over rows (prompt, comp), each its
    own unpadded sequence: the on-policy policy-gradient of the dapo loss (ratio 1)."""
    import copy

    ref = copy.deepcopy(model).double().train()
    loss = torch.zeros((), dtype=torch.float64)
    for (prompt, comp), a in zip(rows, advantages.tolist()):
        logp = torch.log_softmax(ref(input_ids=torch.tensor([prompt + comp])).logits[0].double(), -1)
        tok = logp[len(prompt) - 1:len(prompt) + len(comp) - 1].gather(1, torch.tensor(comp)[:, None])
        loss = loss - a * tok.sum()
    (loss / n_tokens).backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def _close(grads, ref, rtol=1e-4):
    scale = max(r.abs().max().item() for r in ref.values())
    return max((grads[k].double() - ref[k]).abs().max().item() for k in ref) <= rtol * scale


def test_hint_advantage_credits_the_injected_hint_with_the_rows_advantage(tmp_path):
    """loss.hint_advantage (Prefix-RFT): the update's gradient equals a float64 reference in which each hinted
    row is the sequence context + hint + completion, every hint and completion token weighted by the row's
    advantage, and hint-free rows are as in plain GRPO. The same reference without the hint's credit does
    not match (the test can fail)."""
    cfg = parse_args(tiny_args(tmp_path / "run", tmp_path / "cache", "--curriculum.schedule", "constant",
                               "--curriculum.value", "0.6", "--curriculum.hint_dropout", "0.5", "--G", "4",
                               "--loss.hint_advantage", "true", "--rollout.max_new_tokens", "8",
                               "--eval.num_examples", "0"))
    t = Trainer(cfg, log=lambda m: None)
    ro = t.sampler.rollout(0)
    sc = t.scorer.score(ro)
    sc.advantages = torch.linspace(-1.0, 1.0, len(ro))
    (grads,), _ = update_grads(t, ro, sc)
    credited, plain = [], []
    for i in range(len(ro)):
        context, hint = ro.hint_targets[i // 4]
        if ro.row_keep[i] > 0:
            assert hint and ro.prompts[i] == context + hint
            credited.append((context, hint + ro.completions[i]))
        else:
            assert ro.prompts[i] == t.run.builder.build(t.run.train_enc[ro.idx[i // 4]], 0.0)[0]
            credited.append((ro.prompts[i], ro.completions[i]))
        plain.append((ro.prompts[i], ro.completions[i]))
    assert sum(r > 0 for r in ro.row_keep) == len(ro) // 2
    n_credited = sum(len(c) for _, c in credited)
    assert _close(grads, _reference_grads(t.run.model, credited, sc.advantages, n_credited))
    assert not _close(grads, _reference_grads(t.run.model, plain, sc.advantages, sum(len(c) for _, c in plain)), 1e-2)


def test_sft_loss_trains_the_whole_response_after_the_hint_free_prompt(tmp_path):
    """loss.sft_loss (GRPO + SFT loss on the same traces): each group's target is its example's whole response
    (think opener, trace, answer, EOS) after the evaluation prompt, even while the policy's prompts carry a
    hint; the logged sft_nll is the float64 mean NLL of all those target tokens; the linear decay's weight
    leaves the update untouched once the anneal ends (same gradient as sft_loss 0)."""
    from rtpo.prompts import response_ids

    cfg = parse_args(tiny_args(tmp_path / "run", tmp_path / "cache", "--loss.sft_loss", "0.5", "--loss.sft_decay",
                               "linear", "--eval.num_examples", "0"))
    t = Trainer(cfg, log=lambda m: None)
    ro = t.sampler.rollout(0)
    sc = t.scorer.score(ro)
    assert ro.keep == 1.0
    for g, i in enumerate(ro.idx):
        enc, ex = t.run.train_enc[i], t.run.train_rows[i]
        context, target = ro.sft_targets[g]
        assert context == t.run.builder.build(enc, 0.0)[0] and target == response_ids(t.run.builder, ex, enc, t.run.tok.eos_token_id)
        assert t.run.tok.decode(target).rstrip().endswith(ex.answer + t.run.tok.decode([t.run.tok.eos_token_id]))
    _, m = update_grads(t, ro, sc)
    ref = __import__("copy").deepcopy(t.run.model).double()
    total, n = 0.0, 0
    with torch.no_grad():
        for context, target in ro.sft_targets:
            logp = torch.log_softmax(ref(input_ids=torch.tensor([context + target])).logits[0], -1)
            total -= logp[len(context) - 1:-1].gather(1, torch.tensor(target)[:, None]).sum().item()
            n += len(target)
    assert m["sft_nll"] == pytest.approx(total / n, rel=1e-5) and m["sup_tokens"] == n
    ro.step = cfg.run.max_steps - 1  # past the anneal: weight 0 (an update trains at its rollout's step)
    late, m_late = update_grads(t, ro, sc)
    t.cfg.loss.sft_loss = 0.0
    none, _ = update_grads(t, ro, sc)
    assert m_late["sft_nll"] is None and all(torch.equal(late[0][k], none[0][k]) for k in none[0])


def test_resume_is_exact_with_sft_first_sft_loss_hint_advantage_and_hints_on_demand(tmp_path):
    """The round-3 knobs keep resume exact (4 steps == 2 + resume + 2): the SFT phase runs once, before step 0
    of a fresh run (its tokens in summary.json; a resumed run does not repeat it), and it changes the
    starting weights; hints on demand start hint-free."""
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    knobs = ("--sft.steps", "3", "--sft.batch_size", "4", "--loss.sft_loss", "0.5", "--loss.sft_decay", "linear",
             "--loss.hint_advantage", "true", "--loss.hint_top_entropy", "0.5", "--curriculum.hint_dropout", "0.5",
             "--curriculum.per_example", "true", "--curriculum.per_example_start", "0", "--curriculum.schedule",
             "constant", "--curriculum.value", "1", "--G", "4", "--data.num_train", "2")  # the 2 examples recur
    sa = run(tiny_args(a, cache, *knobs))
    run(tiny_args(b, cache, *knobs, "--run.stop_after_steps", "2"))
    sb = run(tiny_args(b, cache, *knobs, "--resume", "auto"))
    ra, rb = (strip_times(read_metrics(d / "metrics.jsonl")) for d in (a, b))
    assert ra == rb
    assert sa["sft_tokens"] > 0 and sb["sft_tokens"] == 0
    steps = [r for r in ra if "reward" in r]
    assert steps[0]["mean_example_keep"] == 0.0 and any(r["mean_example_keep"] > 0 for r in steps)
    assert all(r["fwd_tokens"] > 0 for r in steps)
    no_sft = Trainer(parse_args(tiny_args(tmp_path / "c", cache, "--eval.num_examples", "0")), log=lambda m: None)
    with_sft = Trainer(parse_args(tiny_args(tmp_path / "d", cache, "--eval.num_examples", "0", "--sft.steps", "3")),
                       log=lambda m: None)
    assert any(not torch.equal(x, y) for x, y in zip(no_sft.run.model.parameters(), with_sft.run.model.parameters()))
