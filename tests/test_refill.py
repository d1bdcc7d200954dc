"""rtpo/refill.py: the hint re-roll of all-wrong groups and DAPO dynamic sampling, on real rollouts of the
tiny embedded model (4 warm-start steps: it rarely answers, so all-wrong and zero-variance groups are real)."""

import pytest
import torch

from rtpo.cli import parse_args
from rtpo.metrics import read_metrics
from rtpo.advantages import all_wrong, varied_groups
from rtpo.refill import pick_groups
from rtpo.sampling import run_generate
from rtpo.trainer import Trainer

from conftest import tiny_args

pytestmark = pytest.mark.usefixtures("one_thread")


def trainer(tmp_path, *extra):
    return Trainer(parse_args(tiny_args(tmp_path / "run", tmp_path / "cache", "--eval.num_examples", "0", *extra)),
                   log=lambda m: None)


def id_sum_reward(completions, answers, *, completion_ids, questions, **kw):
    """For the tests: 0 for an odd question (a zero-variance group: `odd`), else the completion's token-id sum
    mod 7 (its G rows differ unless their sums agree mod 7)."""
    return [0.0 if odd(q) else float(sum(ids) % 7) for ids, q in zip(completion_ids, questions)]


def odd(question: str) -> bool:
    return sum(map(ord, question)) % 2 == 1


def test_pick_groups_takes_varied_groups_first_come_then_tops_up_in_sampling_order():
    """The batch is the first B varied candidates; with too few, the earliest signal-free ones fill it, and the
    chosen groups keep their sampling order."""
    assert pick_groups([False, True, False, True, True], 2) == [1, 3]
    assert pick_groups([False, True, False, False], 3) == [0, 1, 2]
    assert pick_groups([True, True], 2) == [0, 1]
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert varied_groups(r, 2).tolist() == [False, True, False] and varied_groups(r, 3).tolist() == [True, True]
    assert all_wrong(torch.tensor([[0, 0], [1, 0]])).tolist() == [True, False]


def test_hint_reroll_samples_the_all_wrong_groups_again_from_the_hinted_prompt(tmp_path):
    """An all-wrong group (keep 0 < reroll_keep) gets the prompt with reroll_keep of its trace, and its rows
    become exactly what the sampler draws from that prompt next; other groups are untouched; rollouts count
    both rounds; the scores are the new rows'."""
    t = trainer(tmp_path, "--curriculum.schedule", "none", "--curriculum.reroll_keep", "0.5",
                "--rollout.prompts_per_step", "4")
    G = t.cfg.rollout.num_generations
    ro = t.sampler.rollout(0)
    sc = t.scorer.score(ro)
    wrong = all_wrong(torch.tensor(sc.accuracy).view(-1, G)).tolist()
    assert any(wrong), "precondition: the tiny model leaves some group all wrong"
    before = [list(c) for c in ro.completions]
    gen = torch.Generator().manual_seed(0)
    gen.set_state(t.sampler.gen.get_state())
    ro2, sc2, info = t.refiller.refill(ro, sc)
    groups = [g for g, w in enumerate(wrong) if w]
    hinted = [t.run.builder.prompt(t.run.train_enc[ro.idx[g]], 0.5) for g in groups]
    expect = run_generate(t.run, [p.ids for p in hinted], t.sampler.sampling, G, generator=gen)
    for j, g in enumerate(groups):
        assert ro2.keeps[g] == 0.5 and ro2.hinted[g].injected > 0
        assert ro2.prompts[g * G:(g + 1) * G] == [hinted[j].ids] * G
        assert ro2.completions[g * G:(g + 1) * G] == expect.completions[j * G:(j + 1) * G]
    for g in set(range(len(ro.idx))) - set(groups):
        assert ro2.keeps[g] == 0.0 and ro2.completions[g * G:(g + 1) * G] == before[g * G:(g + 1) * G]
    assert info.rerolled_groups == len(groups) and info.rollouts == (len(ro.idx) + len(groups)) * G
    assert sc2.texts == [t.run.decode(c) for c in ro2.completions] and sc2.group_keeps == ro2.keeps


def test_dynamic_sampling_keeps_the_first_varied_groups_and_moves_the_data_cursor(tmp_path):
    """With a reward whose signal-free groups are known (odd questions), the batch is the first B groups
    with varying rewards across the rounds' prompts in data order; each extra round takes B new prompts, and
    the next step starts after them."""
    t = trainer(tmp_path, "--rollout.dynamic_sampling", "3", "--rollout.prompts_per_step", "4", "--G", "4",
                "--rewards.custom", '{"test_refill:id_sum_reward": 1}', "--rewards.accuracy", "0",
                "--rewards.format", "0")
    B, G = 4, 4
    ro = t.sampler.rollout(0)
    sc = t.scorer.score(ro)
    ro2, sc2, info = t.refiller.refill(ro, sc)
    assert info.rounds >= 1, "precondition: the first round has a signal-free group"
    assert t.sampler.extra_prompts == info.rounds * B and info.rollouts == (1 + info.rounds) * B * G
    t.sampler.extra_prompts = 0
    candidates = [i for r in range(info.rounds + 1) for i in t.sampler.batch_indices(0, r)]
    even = [i for i in candidates if not odd(t.run.train_rows[i].question)]
    assert ro2.idx == even[:B] and len(ro2.completions) == B * G
    assert bool(varied_groups(sc2.rewards, G).all())
    questions = [e.question for e in ro2.examples for _ in range(G)]
    assert sc2.rewards.tolist() == id_sum_reward(None, None, completion_ids=ro2.completions, questions=questions)
    assert sc2.advantages.shape == (B * G,) and torch.allclose(sc2.advantages.view(B, G).sum(1), torch.zeros(B),
                                                               atol=1e-5)
    after = t.sampler.batch_indices(0, info.rounds + 1)  # the data positions after the rounds' prompts
    t.sampler.extra_prompts = info.rounds * B
    assert t.sampler.batch_indices(1) == after


def test_resume_is_exact_with_hint_reroll_and_dynamic_sampling(tmp_path):
    """Both refills keep resume exact (4 steps == 2 + resume + 2: the data cursor is checkpointed) and act in
    the run (re-rolled groups, extra rounds, their rollouts in metrics.jsonl)."""
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    knobs = ("--curriculum.schedule", "none", "--curriculum.reroll_keep", "0.5", "--rollout.dynamic_sampling", "1",
             "--loss.hint_loss", "0.5")
    Trainer(parse_args(tiny_args(a, cache, *knobs)), log=lambda m: None).train()
    Trainer(parse_args(tiny_args(b, cache, *knobs, "--run.stop_after_steps", "2")), log=lambda m: None).train()
    Trainer(parse_args(tiny_args(b, cache, *knobs, "--resume", "auto")), log=lambda m: None).train()
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]  # noqa: E731
    ra, rb = (strip(read_metrics(d / "metrics.jsonl")) for d in (a, b))
    assert ra == rb
    steps = [r for r in ra if "reward" in r]
    assert any(r["rerolled_groups"] > 0 for r in steps) and any(r["refill_rounds"] > 0 for r in steps)
    assert all(r["rollouts"] >= 2 * 3 for r in steps) and any(r["rollouts"] > 2 * 3 for r in steps)
