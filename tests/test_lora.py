"""LoRA adapters (rtpo/lora.py) on the embedded model: only the adapters train, a zero-initialised
adapter changes nothing, the reference is the base with adapters disabled, checkpoints are PEFT
adapter folders that resume exactly and export to an ordinary model."""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_args

from rtpo import lora
from rtpo.cli import parse_args
from rtpo.config import ConfigError
from rtpo.generation import SamplingConfig, _forward_kwargs, generate
from rtpo.logprobs import collate, completion_logprobs
from rtpo.metrics import read_metrics
from rtpo.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason=f"needs peft: {lora.INSTALL}")
LORA = ("--lora.r", "4", "--lora.alpha", "8")
# a reward that varies within almost every group: advantages (and gradients) are never all zero
VARIED = ("--rewards.custom", '{"tests.distributed_helpers:digit_reward": 1.0}')


def trainer(tmp_path, *extra, name="run"):
    return Trainer(parse_args(tiny_args(tmp_path / name, tmp_path / "cache", *VARIED, *extra)), log=lambda m: None)


def run(argv):
    return Trainer(parse_args([str(a) for a in argv]), log=lambda m: None).train()


def strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def split_params(model):
    """({name: tensor} of the base weights, {name: tensor} of the adapter weights), cloned."""
    base, adapter = {}, {}
    for n, p in model.named_parameters():
        (adapter if "lora_" in n else base)[n] = p.detach().clone()
    return base, adapter


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A LoRA trainer (r = 4, beta > 0, a large lr so one step visibly moves the adapter) and a full
    fine-tuning trainer with the same settings: its model is the base the LoRA run starts from (the
    same cached warm-start), loaded by the ordinary path."""
    d = tmp_path_factory.mktemp("lora")
    common = ("--loss.beta", "0.1", "--lr", "5e-2", "--eval.num_examples", "0", "--max_steps", "2")
    return trainer(d, *LORA, *common, name="lora"), trainer(d, *common, name="full"), d


def eval_prompts(t, n=4):
    return [t.run.builder.build(e, 0.0)[0] for e in t.run.eval_enc[:n]]


def test_zero_initialised_adapter_changes_nothing_and_rollouts_see_the_same_model(pair):
    """Before any update (LoRA B = 0) the adapted model's logits are bit-identical to the base model's,
    so greedy decoding gives the same tokens; the rollout engine finds the same forward arguments
    (cache name, logits_to_keep) on the adapted model, which keeps its transformers class."""
    t, full, _ = pair
    assert type(t.run.model) is type(full.run.model) and t.run.peft.base_model.model is t.run.model
    assert _forward_kwargs(t.run.model) == _forward_kwargs(full.run.model)
    assert "logits_to_keep" in _forward_kwargs(t.run.model)
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in t.run.model.named_parameters() if "lora_B" in n)
    prompts = eval_prompts(t)
    batch = collate(prompts, [[5, 6, 7]] * len(prompts), t.run.tok.pad_token_id)
    fwd = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        assert torch.equal(t.run.model(**fwd).logits, full.run.model(**fwd).logits)
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0, eos_token_ids=t.run.eos_ids, pad_token_id=t.run.tok.pad_token_id)
    ours = generate(t.run.model, prompts, sampling, tokenizer=t.run.tok).completions
    assert ours == generate(full.run.model, prompts, sampling, tokenizer=full.run.tok).completions
    assert any(len(c) > 1 for c in ours)


def test_only_adapter_parameters_train_and_sit_in_the_optimizer(pair):
    """The optimizer holds exactly the LoRA parameters; one RL step moves them and leaves every base
    weight bit-identical; the reference log-probs (adapters disabled) equal the base model's bit for
    bit while the policy's now differ; the trainable/total count is logged."""
    t, full, _ = pair
    lora_params = {id(p) for n, p in t.run.model.named_parameters() if "lora_" in n}
    in_opt = {id(p) for g in t.backend.optimizer.param_groups for p in g["params"]}
    assert in_opt == lora_params == {id(p) for p in t.run.model.parameters() if p.requires_grad} and lora_params
    trainable, total = lora.param_counts(t.run.model)
    assert trainable == sum(p.numel() for n, p in t.run.model.named_parameters() if "lora_" in n) < total / 5
    base0, ad0 = split_params(t.run.model)
    row = t.train_step(0)
    assert row["skipped_updates"] == 0 and row["grad_norm"] > 0
    base1, ad1 = split_params(t.run.model)
    assert base0.keys() == base1.keys() and all(torch.equal(base0[k], base1[k]) for k in base0)
    # every B moved; A has no gradient while B = 0 (d loss / d A goes through B), so it moves from step 2 on
    assert {k for k in ad0 if not torch.equal(ad0[k], ad1[k])} == {k for k in ad0 if "lora_B" in k}
    ro = t.sampler.rollout(1)
    batch = collate(ro.prompts[:4], ro.completions[:4], t.run.tok.pad_token_id)
    with torch.no_grad():
        ref, _ = t.backend.logprobs(batch, ref=True, with_entropy=False)
        base, _ = completion_logprobs(full.run.model, batch, with_entropy=False)
        pol, _ = t.backend.logprobs(batch, with_entropy=False)
    assert torch.equal(ref, base) and not torch.equal(pol, base)
    assert all(p.requires_grad for n, p in t.run.model.named_parameters() if "lora_" in n)  # re-enabled after the ref pass
    assert t.run.ref.peft_model is t.run.peft  # no second copy of the weights
    row = t.train_step(1)
    assert row["kl"] > 0
    assert all(not torch.equal(ad1[k], v) for k, v in split_params(t.run.model)[1].items())


def test_checkpoint_is_a_peft_adapter_with_a_loadable_base(pair):
    """A LoRA checkpoint holds adapter_config.json + adapter_model.safetensors (no full weights); its
    base_model_name_or_path is <run>/base_model (the warm-started base, written once), and
    PeftModel.from_pretrained(base, folder) computes exactly the trainer's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t, full, d = pair
    t.step = 2
    path = t.save()
    files = set(os.listdir(path))
    assert {lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS, "trainer_state.pt", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    cfg = json.load(open(os.path.join(path, lora.ADAPTER_CONFIG)))
    assert cfg["base_model_name_or_path"] == str(d / "lora" / "base_model") and cfg["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    for n, p in base.named_parameters():  # the base written is the model the run started from
        assert torch.equal(p, dict(full.run.model.named_parameters())[n]), n
    loaded = PeftModel.from_pretrained(base, path).eval()
    ids = torch.tensor([eval_prompts(t, 1)[0]])
    t.run.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, t.run.model(input_ids=ids).logits)


@pytest.mark.slow
def test_resume_is_exact_and_the_reference_stays_the_base(tmp_path):
    """4 steps straight == 2 steps + --resume + 2 steps with LoRA and beta > 0: same metrics (KL
    included: the resumed run's reference is the same base), bit-identical final adapters."""
    from safetensors.torch import load_file

    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    extra = (*LORA, "--loss.beta", "0.5", "--lr", "1e-2")
    run(tiny_args(a, cache, *extra))
    run(tiny_args(b, cache, *extra, "--run.stop_after_steps", "2"))
    run(tiny_args(b, cache, *extra, "--resume", "auto"))
    ra, rb = (strip_times(read_metrics(x / "metrics.jsonl")) for x in (a, b))
    assert ra == rb and ra[-2]["kl"] > 0
    wa, wb = (load_file(x / "checkpoints/step_000004" / lora.ADAPTER_WEIGHTS) for x in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(k.endswith("lora_B.weight") and wa[k].abs().sum() > 0 for k in wa)


def test_resume_refuses_a_checkpoint_of_the_other_kind(tmp_path):
    """A LoRA run cannot resume a full fine-tuning checkpoint, nor the reverse, nor another rank:
    each is one ConfigError naming the key and the fix."""
    cache = tmp_path / "cache"
    few = ("--max_steps", "1", "--eval.num_examples", "0", "--checkpoint.every", "1")
    run(tiny_args(tmp_path / "full", cache, *few))
    run(tiny_args(tmp_path / "lora", cache, *few, *LORA))
    cases = [("full", LORA, r"holds full weights, not a LoRA adapter, but model.lora.r = 4; resume with --model.lora.r 0"),
             ("lora", (), r"holds a LoRA adapter but model.lora.r = 0"),
             ("lora", ("--lora.r", "8", "--lora.alpha", "8"), r"model.lora.r = 8 but the checkpoint has 4")]
    for name, extra, match in cases:
        with pytest.raises(ConfigError, match=match):
            trainer(tmp_path, *few, *extra, "--max_steps", "2", "--resume", "auto", name=name)


def test_settings_errors_are_one_line_naming_the_key(tmp_path, monkeypatch):
    """A target module the model lacks lists the model's linear layers; bias training with a KL term
    is refused (the base would no longer be the starting policy); without peft the error gives the
    install command."""
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: c_attn not found in Qwen2ForCausalLM; its "
                                          r"linear layers are: down_proj, gate_proj, k_proj, lm_head, o_proj"):
        trainer(tmp_path, "--lora.r", "4", "--lora.target_modules", "q_proj,c_attn", "--eval.num_examples", "0")
    with pytest.raises(ConfigError, match=r"model.lora.bias = 'all' trains the base model's biases"):
        trainer(tmp_path, "--lora.r", "4", "--lora.bias", "all", "--loss.beta", "0.1", "--eval.num_examples", "0")
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ConfigError) as e:
        trainer(tmp_path, "--lora.r", "4", "--eval.num_examples", "0")
    assert str(e.value) == f'model.lora.r > 0: LoRA needs the peft package; install it with: {lora.INSTALL}'


def test_lora_bias_and_modules_to_save_train_and_the_base_written_is_the_start(tmp_path):
    """With bias = lora_only and modules_to_save = [lm_head] those train too (and are in the optimizer);
    base_model/ still holds the weights as they were BEFORE the first update, so base + adapter
    reproduces the trained model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t = trainer(tmp_path, "--lora.r", "4", "--lora.bias", "all", "--lora.target_modules", "q_proj,v_proj",
                "--lora.modules_to_save", "lm_head", "--lr", "5e-2", "--eval.num_examples", "0")
    names = {n for n, p in t.run.model.named_parameters() if p.requires_grad}
    assert any(n.endswith("q_proj.base_layer.bias") for n in names) and any("modules_to_save" in n for n in names)
    start = {lora.base_name(n): p.detach().clone() for n, p in t.run.model.named_parameters()
             if "lora_" not in n and "modules_to_save" not in n}
    t.train_step(0)
    assert any(not torch.equal(p, start[lora.base_name(n)]) for n, p in t.run.model.named_parameters() if n.endswith(".bias")
               and lora.base_name(n) in start)
    t.step = 1
    path = t.save()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "base_model", dtype=torch.float32)
    for n, p in base.named_parameters():
        assert torch.equal(p, start[n]), n
    loaded = PeftModel.from_pretrained(base, path).eval()
    ids = torch.tensor([eval_prompts(t, 1)[0]])
    t.run.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, t.run.model(input_ids=ids).logits)


def test_gradient_checkpointing_still_trains_the_adapters(tmp_path):
    """With model.gradient_checkpointing the frozen embeddings would cut the gradient to the adapters
    of checkpointed blocks: every adapter still moves in two steps."""
    t = trainer(tmp_path, *LORA, "--model.gradient_checkpointing", "true", "--lr", "5e-2", "--eval.num_examples", "0")
    assert t.run.model.is_gradient_checkpointing
    _, ad0 = split_params(t.run.model)
    t.train_step(0)
    t.train_step(1)
    _, ad1 = split_params(t.run.model)
    assert all(not torch.equal(ad0[k], ad1[k]) for k in ad0)


@pytest.mark.slow
def test_export_merges_and_eval_reads_a_lora_run(tmp_path, capsys):
    """`python -m rtpo.export RUN OUT` writes an ordinary transformers model (base + adapter merged) whose
    logits match the adapted model's within float32 rounding of a float64 reference; rtpo.eval of the
    LoRA run folder reproduces the run's own final held-out evaluation; a non-empty OUT is refused."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rtpo.eval import main as eval_main

    out = tmp_path / "run"
    run(tiny_args(out, tmp_path / "cache", *LORA, "--lr", "5e-2", "--rollout.max_new_tokens", "16",
                  "--eval.max_new_tokens", "16"))
    merged_dir = tmp_path / "merged"
    p = subprocess.run([sys.executable, "-m", "rtpo.export", str(out), str(merged_dir)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "model.safetensors" in os.listdir(merged_dir) and "tokenizer.json" in os.listdir(merged_dir)
    again = subprocess.run([sys.executable, "-m", "rtpo.export", str(out), str(merged_dir)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1].startswith("error: OUT")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ck = out / "checkpoints" / "step_000004"
    adapted = PeftModel.from_pretrained(lora.load_base(str(ck)), ck).eval()
    ref = copy.deepcopy(adapted).double()
    ids = torch.tensor([[3, 5, 8, 13, 21, 34, 55, 89]])
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        for m in (merged, adapted):
            assert (m(input_ids=ids).logits.double() - want).abs().max() < 1e-4
    assert sum(not n.endswith("bias") for n, _ in merged.named_parameters()) == len(
        [n for n, _ in lora.load_base(str(ck)).named_parameters() if not n.endswith("bias")])
    assert eval_main([str(out), "--no-progress", "--out", "-"]) == 0
    rep = json.loads(capsys.readouterr().out)
    final = read_metrics(out / "metrics.jsonl")[-1]
    for k in ("accuracy", "format", "reasoning_tokens", "completion_tokens"):
        assert rep["results"][0][k] == pytest.approx(final[f"eval/{k}"]), k


def test_attach_is_seeded_and_leaves_the_global_random_stream_alone():
    """lora.attach draws lora_A from its own seed inside a forked RNG: the global torch stream is where
    it was (rollouts and dropout see the same numbers with or without LoRA), the same seed gives the
    same adapter, another seed another one; lora_B is zero and only adapters require grad."""
    from rtpo.config import LoraConfig
    from rtpo.embedded import build_model, build_tokenizer

    tok = build_tokenizer()
    models = [build_model(tok, 32, 1, 2, 1, 64, seed=0) for _ in range(3)]
    adapters = []
    for m, seed in zip(models, (1, 1, 2)):
        state = torch.get_rng_state()
        pm = lora.attach(m, LoraConfig(r=4), base="/some/base", seed=seed)
        assert torch.equal(torch.get_rng_state(), state)
        assert pm.peft_config["default"].base_model_name_or_path == "/some/base"
        adapters.append({n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n})
        assert {n for n, p in m.named_parameters() if p.requires_grad} == set(adapters[-1])
    a, b, c = adapters
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)
    assert all(not a[k].any() for k in a if "lora_B" in k)


def test_a_moved_run_folder_still_finds_its_base(tmp_path):
    """adapter_config.json names <run>/base_model by absolute path; after the run folder is moved,
    the base is found next to the checkpoint (<run>/checkpoints/step_N -> <run>/base_model), and a
    base found nowhere is one error naming the file to edit."""
    import shutil

    few = ("--max_steps", "1", "--eval.num_examples", "0", "--checkpoint.every", "1")
    run(tiny_args(tmp_path / "run", tmp_path / "cache", *LORA, *few))
    shutil.move(tmp_path / "run", tmp_path / "moved")
    ck = str(tmp_path / "moved" / "checkpoints" / "step_000001")
    assert json.load(open(os.path.join(ck, lora.ADAPTER_CONFIG)))["base_model_name_or_path"] == str(tmp_path / "run" / "base_model")
    assert lora.resolve_base(ck) == (str(tmp_path / "moved" / "base_model"), None)
    merged = lora.load_merged(ck)
    assert all(p.requires_grad for p in merged.parameters()) and not any("lora" in n for n, _ in merged.named_parameters())
    shutil.rmtree(tmp_path / "moved" / "base_model")
    with pytest.raises(ConfigError, match=r"its base model '.*/run/base_model' cannot be found .* edit base_model_name_or_path in"):
        lora.resolve_base(ck)
