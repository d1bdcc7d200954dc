"""Data-parallel training (rtpo/distributed.py): DeepSpeed config resolution, and multi-process runs on
CPU (DeepSpeed's CPU accelerator with gloo; torchrun + DDP) that must equal one process exactly."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_args

from rtpo.config import ConfigError
from rtpo.cli import parse_args
from rtpo.backends.zero import DeepSpeedBackend
from rtpo.cli import strip_launcher_args
from rtpo.distributed import (ds_amp_dtype, ensure_launch_env, micro_batches_per_update, reference_ds_config,
                              resolve_ds_config)
from rtpo.trainer import make_trainer
from rtpo.metrics import reduce_rows
from rtpo.metrics import read_metrics
from rtpo.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# RTPO_TEST_DEVICE=cuda (benchmarks/gpu_check.sh, >= 2 GPUs): the multi-process runs use one GPU each and NCCL
DEVICE = os.environ.get("RTPO_TEST_DEVICE", "cpu")
CONFIGS = {name: os.path.join(ROOT, "ds_configs", f"{name}.json") for name in ("zero1", "zero2", "zero3", "zero3_offload")}


def load(name):
    with open(CONFIGS[name]) as f:
        return json.load(f)


def cfg_of(*argv):
    return parse_args(list(argv))


# ----------------------------------------------------------------------------- config resolution

@pytest.mark.parametrize("name,stage", [("zero1", 1), ("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_shipped_configs_resolve_every_auto_from_the_rtpo_config(name, stage):
    """Each shipped config resolves with no "auto" left: batch fields, clipping, precision and
    AdamW settings come from the rtpo config (2 processes: 8 prompts x 4 -> 16 rows each, micro 4
    -> 4 micro batches per update)."""
    cfg = cfg_of("--rollout.prompts_per_step", "8", "--G", "4", "--optim.micro_batch_size", "4", "--lr", "3e-5",
                 "--optim.max_grad_norm", "0.5", "--optim.beta2", "0.95", "--optim.weight_decay", "0.01",
                 "--run.dtype", "float32")
    out = resolve_ds_config(load(name), cfg, world=2, hidden_size=64)
    assert "auto" not in json.dumps(out)
    assert out["zero_optimization"]["stage"] == stage
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"]) == (4, 4, 32)
    assert out["gradient_clipping"] == 0.5
    assert out["bf16"]["enabled"] is False and out["fp16"]["enabled"] is False
    p = out["optimizer"]["params"]
    assert (p["lr"], p["betas"], p["eps"], p["weight_decay"]) == (3e-5, [0.9, 0.95], 1e-8, 0.01)
    assert out["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    if name == "zero3_offload":
        assert out["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert out["zero_optimization"]["offload_param"]["device"] == "cpu"
        assert "torch_adam" not in p  # offload needs DeepSpeed's CPU Adam
    else:
        assert p["torch_adam"] is True
    if stage == 3:
        ref = reference_ds_config(out)
        assert "optimizer" not in ref and "offload_optimizer" not in ref["zero_optimization"]
        assert ref["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("key,value,rtpo_key,rtpo_value", [
    (("train_micro_batch_size_per_gpu",), 8, "optim.micro_batch_size", "16"),
    (("gradient_accumulation_steps",), 3, "the rtpo config", ") = 2;"),
    (("train_batch_size",), 128, "optim.micro_batch_size x gradient_accumulation_steps x processes", "= 64;"),
    (("gradient_clipping",), 2.0, "optim.max_grad_norm", "1.0"),
    (("optimizer", "params", "lr"), 1e-3, "optim.lr", "= 2e-05;"),
    (("optimizer", "params", "betas"), [0.9, 0.999], "[optim.beta1, optim.beta2]", "[0.9, 0.99]"),
])
def test_explicit_mismatch_is_an_error_naming_both_values(key, value, rtpo_key, rtpo_value):
    """A value written in the DeepSpeed config that disagrees with the rtpo config stops with an error
    that names the DeepSpeed field, its value, the rtpo key and its value."""
    ds = load("zero2")
    node = ds
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    cfg = cfg_of("--rollout.prompts_per_step", "8", "--G", "8", "--optim.micro_batch_size", "16",  # 32 rows/process
                 "--optim.lr", "2e-5")
    with pytest.raises(ConfigError) as e:
        resolve_ds_config(ds, cfg, world=2, source="x.json")
    msg = str(e.value)
    assert msg.startswith(f"x.json: {'.'.join(key)} = {json.dumps(value)} but {rtpo_key}")
    assert rtpo_value in msg and '"auto"' in msg


def test_explicit_values_that_agree_are_accepted():
    """Explicit DeepSpeed values equal to the rtpo config's pass through unchanged."""
    ds = load("zero2")
    ds.update(train_micro_batch_size_per_gpu=16, gradient_accumulation_steps=2, train_batch_size=64,
              gradient_clipping=1.0)
    ds["optimizer"]["params"].update(lr=2e-5, betas=[0.9, 0.99])
    out = resolve_ds_config(ds, cfg_of("--rollout.prompts_per_step", "8", "--G", "8", "--optim.lr", "2e-5"), world=2)
    assert out["gradient_accumulation_steps"] == 2 and out["optimizer"]["params"]["betas"] == [0.9, 0.99]


def test_precision_follows_run_dtype_and_conflicts_are_errors():
    """bf16/fp16 come from run.dtype; with run.dtype auto an explicit DeepSpeed bf16 wins (and is the
    run's autocast dtype); bf16 on with run.dtype float32 is an error naming both."""
    cfg = cfg_of("--run.dtype", "bfloat16")
    out = resolve_ds_config(load("zero2"), cfg, world=1)
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False
    ds = load("zero2")
    ds["bf16"]["enabled"] = True
    cfg = cfg_of("--run.device", "cpu")
    out = resolve_ds_config(ds, cfg, world=1)
    assert out["bf16"]["enabled"] is True and ds_amp_dtype(out, cfg, "cpu") is torch.bfloat16
    with pytest.raises(ConfigError, match=r"bf16.enabled = true but run.dtype = 'float32'"):
        resolve_ds_config(ds, cfg_of("--run.dtype", "float32"), world=1)


def test_unsupported_deepspeed_settings_are_refused_with_the_fix():
    """ZeRO stage 0, a DeepSpeed LR scheduler, a non-AdamW optimizer, torch_adam with optimizer
    offload, and an "auto" rtpo cannot fill each stop with an error naming the field."""
    cfg = cfg_of()
    cases = [({"zero_optimization": {"stage": 0}}, "zero_optimization.stage = 0"),
             ({"scheduler": {"type": "WarmupLR"}}, 'has a "scheduler" section'),
             ({"optimizer": {"type": "Lamb", "params": {}}}, 'optimizer.type = "Lamb"'),
             ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
               "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}, "torch_adam = true"),
             ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, "zero_optimization.sub_group_size")]
    for patch, needle in cases:
        ds = load("zero2")
        ds.update(patch)
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
            resolve_ds_config(ds, cfg, world=1)


def test_prompt_sharding_and_accumulation_counts():
    """Each process gets whole prompts: prompts_per_step must divide by the process count; every
    mini batch must have the same micro-batch count (DeepSpeed has one gradient_accumulation_steps)."""
    cfg = cfg_of("--rollout.prompts_per_step", "8", "--G", "8", "--optim.micro_batch_size", "16")
    assert [micro_batches_per_update(cfg, w) for w in (1, 2, 4, 8)] == [4, 2, 1, 1]
    with pytest.raises(ConfigError, match=r"rollout.prompts_per_step = 8 does not split over 3 processes"):
        micro_batches_per_update(cfg, 3)
    uneven = cfg_of("--rollout.prompts_per_step", "3", "--G", "3", "--optim.micro_batch_size", "2",
                    "--optim.mini_batches", "2")  # 9 rows -> mini batches of 5 and 4 -> 3 and 2 micro batches
    with pytest.raises(ConfigError, match=r"optim.mini_batches = 2 .* \[2, 3\] micro batches"):
        micro_batches_per_update(uneven, 1)


def test_missing_or_invalid_deepspeed_file(tmp_path):
    """A missing or malformed run.deepspeed file is a ConfigError naming the path."""
    with pytest.raises(ConfigError, match=r"no such file"):
        make_trainer(cfg_of("--deepspeed", str(tmp_path / "nope.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"is not valid JSON"):
        make_trainer(cfg_of("--deepspeed", str(bad)))


def test_deepspeed_not_installed_is_a_clear_error(monkeypatch):
    """With run.deepspeed set and DeepSpeed not importable, the error says to install it or drop the
    flag (DDP under torchrun)."""
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
        monkeypatch.setenv(k, "0" if "RANK" in k else {"WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                                                      "MASTER_PORT": "29999", "DS_ACCELERATOR": "cpu"}[k])
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    with pytest.raises(ConfigError, match=r"DeepSpeed cannot be imported .*pip install deepspeed, or drop --run.deepspeed"):
        make_trainer(cfg_of("--deepspeed", CONFIGS["zero2"]))


def test_launcher_arguments_and_single_process_environment(monkeypatch):
    """The `deepspeed` launcher's --local_rank flag is dropped (its value kept in LOCAL_RANK); with no
    launcher, RANK/WORLD_SIZE/MASTER_* describe one local process so DeepSpeed skips MPI discovery."""
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert strip_launcher_args(["--lr", "1e-5", "--local_rank=1", "--G", "4"]) == ["--lr", "1e-5", "--G", "4"]
    assert os.environ["LOCAL_RANK"] == "1"
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_launcher_args(["--local-rank", "0", "--max_steps", "2"]) == ["--max_steps", "2"]
    monkeypatch.delenv("LOCAL_RANK")
    ensure_launch_env()
    assert [os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")] == ["0", "0", "1", "127.0.0.1"]
    assert int(os.environ["MASTER_PORT"]) > 0


def test_metric_rows_reduce_over_processes():
    """Per-process rows combine into the global row: loss summed (each is a share of the global loss),
    per-token metrics weighted by completion tokens, per-row means averaged, skips and times maxed,
    globally computed values taken as they are."""
    a = {"step": 3, "loss": 0.25, "clip_frac": 0.5, "completion_tokens": 10.0, "accuracy": 0.4, "kl": None,
         "skipped_updates": 0, "time_update": 1.0, "reward/format": 0.2, "grad_norm": 2.0}
    b = {"step": 3, "loss": -0.05, "clip_frac": 0.0, "completion_tokens": 30.0, "accuracy": 0.4, "kl": None,
         "skipped_updates": 1, "time_update": 3.0, "reward/format": 0.2, "grad_norm": 2.0}
    r = reduce_rows([a, b])
    assert r["loss"] == pytest.approx(0.2) and r["clip_frac"] == pytest.approx(0.125)
    assert r["completion_tokens"] == 20.0 and r["skipped_updates"] == 1 and r["time_update"] == 3.0
    assert (r["step"], r["accuracy"], r["kl"], r["reward/format"], r["grad_norm"]) == (3, 0.4, None, 0.2, 2.0)


def test_plain_run_refuses_to_resume_a_deepspeed_checkpoint(tmp_path):
    """Resuming a DeepSpeed checkpoint without --run.deepspeed would lose the ZeRO optimizer shards:
    it stops with an error saying how to resume it."""
    ck = tmp_path / "run" / "checkpoints" / "step_000002"
    (ck / "deepspeed").mkdir(parents=True)
    (ck / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"written by a DeepSpeed run .* same --run.deepspeed config"):
        make_trainer(cfg_of("--output_dir", str(tmp_path / "run"), "--resume", "auto"))


def test_resume_with_another_process_count_is_refused(tmp_path):
    """DeepSpeed cannot re-partition ZeRO optimizer state: resuming a 2-process checkpoint with 1
    process stops with an error naming both counts (before DeepSpeed's own exception)."""
    from types import SimpleNamespace

    state = tmp_path / "deepspeed" / "state"
    state.mkdir(parents=True)
    for r in (0, 1):
        (state / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    me = SimpleNamespace(use_deepspeed=True, engine=object(), world=1)
    with pytest.raises(ConfigError, match=r"ZeRO optimizer state of 2 processes, this run has 1; resume with 2"):
        DeepSpeedBackend.load_shards(me, str(tmp_path))


# ----------------------------------------------------------------------------- multi-process runs

def tiny(out, cache, *extra):
    """A few steps of the embedded task at toy sizes; the custom reward makes advantages non-zero."""
    return tiny_args(out, cache, "--max_steps", "3", "--rollout.prompts_per_step", "4", "--G", "4",
                     "--rollout.max_new_tokens", "10", "--eval.num_examples", "6", "--eval.max_new_tokens", "10",
                     "--rewards.custom", '{"tests.distributed_helpers:digit_reward": 1.0}', "--run.device", DEVICE,
                     *extra)


# per-step metrics that must agree between 1 and 2 processes (timings aside)
COMPARED = ["keep", "injected_tokens", "completion_tokens", "reasoning_tokens", "reward", "reward_std", "accuracy",
            "zero_var_groups", "truncated_completions", "loss", "grad_norm", "clip_frac", "kl", "entropy", "lr",
            "skipped_updates", "eval/accuracy", "eval/format", "eval/reasoning_tokens", "eval/completion_tokens",
            "all_wrong_groups", "all_right_groups", "mean_example_keep", "hint_nll", "rollouts", "refill_rounds",
            "rerolled_groups"]
TOL = 1e-5


def max_differences(one, many, step):
    """(max |metric difference| over all rows, max |weight difference|) between two run folders."""
    from safetensors.torch import load_file

    ra, rb = read_metrics(os.path.join(one, "metrics.jsonl")), read_metrics(os.path.join(many, "metrics.jsonl"))
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    metric = 0.0
    for x, y in zip(ra, rb):
        assert set(x) == set(y), (set(x) ^ set(y))
        for k in COMPARED:
            if x.get(k) is not None or y.get(k) is not None:
                metric = max(metric, abs(x[k] - y[k]))
    ck = f"checkpoints/step_{step:06d}/model.safetensors"
    if os.path.isfile(os.path.join(one, ck.replace("model.", "adapter_model."))):  # LoRA: the adapter's weights
        ck = ck.replace("model.", "adapter_model.")
    wa, wb = load_file(os.path.join(one, ck)), load_file(os.path.join(many, ck))
    assert wa.keys() == wb.keys()
    weight = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    return metric, weight


def single(argv):
    return Trainer(parse_args([str(a) for a in argv]), log=lambda m: None).train()


def env(**extra):
    e = dict(os.environ, DS_ACCELERATOR="cuda" if DEVICE == "cuda" else "cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(extra)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def launch(cmd, timeout=300, **env_extra):
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=env(**env_extra))
    if p.returncode != 0:  # printed whole (pytest shows a failing test's output; it cuts the assert message short)
        print(f"--- exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-8000:]}")
    assert p.returncode == 0, p.stderr[-300:]
    return p


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def only_rank0_outputs(run, lora=False):
    """The run folder holds one set of outputs (rank 0's); ranks > 0 wrote none of theirs there."""
    assert sorted(os.listdir(run)) == ["base_model"] * lora + ["checkpoints", "config.json", "metrics.jsonl",
                                                               "samples.jsonl", "summary.json"]


def cpu_adam_built() -> bool:
    """DeepSpeed's CPU Adam (needed by optimizer offload) is JIT-compiled on first use: minutes on 2
    cores. The offload run joins the tests when it is built already, or with RTPO_TEST_BUILD_CPU_ADAM=1."""
    if os.environ.get("RTPO_TEST_BUILD_CPU_ADAM") == "1":
        return True
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return os.path.isfile(os.path.join(_get_build_directory("cpu_adam", False), "cpu_adam.so"))
    except Exception:
        return False


# name: (extra arguments, DeepSpeed config, steps). Each runs with 2 processes and with 1 (no DeepSpeed).
SCENARIOS = {
    # the padded log-prob layout (what models without a custom-mask attention get); the others run packed
    "zero1": (["--loss.loss_type", "dr_grpo", "--optim.packing", "false", "--optim.share_prefix", "false"], "zero1", 3),
    # max_grad_norm 0.3 < the gradient norms (about 0.5): DeepSpeed's clipping is active
    "zero2": (["--max_steps", "4", "--optim.max_grad_norm", "0.3"], "zero2", 4),
    "zero3": (["--loss.beta", "0.05", "--loss.scale_rewards", "batch", "--loss.num_iterations", "2"], "zero3", 3),
    "zero3_offload": (["--optim.weight_decay", "0.1", "--lr", "1e-3"], "zero3_offload", 3),
    # RTPO's adaptive hints: per-example keeps (gathered from every process), hint dropout, hint loss
    "zero1_hints": (["--curriculum.per_example", "true", "--curriculum.per_example_step", "0.5",
                     "--curriculum.hint_dropout", "0.34", "--loss.hint_loss", "0.5"], "zero1", 3),
    # round 3's same-data and literature knobs: SFT loss on whole responses (linear decay), the hint credited with
    # the rows' advantage (top half by entropy), hints on demand; sup rows and hint tokens across 2 processes
    "zero2_trace": (["--loss.sft_loss", "0.5", "--loss.sft_decay", "linear", "--loss.hint_advantage", "true",
                     "--loss.hint_top_entropy", "0.5", "--curriculum.hint_dropout", "0.5", "--curriculum.per_example",
                     "true", "--curriculum.per_example_start", "0.5"], "zero2", 3),
    # hint re-roll of all-wrong groups (uneven across processes) and dynamic sampling (the kept groups dealt out
    # again across processes); 2 groups per process
    "zero2_refill": (["--curriculum.schedule", "none", "--curriculum.reroll_keep", "0.5", "--rollout.dynamic_sampling",
                      "1", "--loss.hint_loss", "0.5", "--rollout.prompts_per_step", "4"], "zero2", 3),
    # LoRA: only the adapters in the optimizer; beta > 0 with the reference = the policy with adapters
    # disabled (no reference engine); ZeRO-3 partitions the frozen base too; 2 passes (old log-probs)
    "zero2_lora": (["--lora.r", "4", "--loss.beta", "0.1", "--lr", "1e-2"], "zero2", 3),
    "zero3_lora": (["--lora.r", "4", "--loss.beta", "0.1", "--lr", "1e-2", "--loss.num_iterations", "2"], "zero3", 3),
    # micro batches by tokens: 1 process cuts at the budget, 2 DeepSpeed processes keep their fixed count
    # (gradient_accumulation_steps) and balance the tokens; two prompts per group (hint dropout)
    "zero3_tokens": (["--optim.micro_batch_tokens", "40", "--curriculum.hint_dropout", "0.5", "--loss.hint_loss",
                      "0.5"], "zero3", 3),
    # image prompts (the tiny Qwen2-VL): pixel values and grids go into the engine's log-prob module
    "zero3_vlm": (["--model", "embedded-vl", "--dataset", "shapes", "--data.num_eval", "6", "--loss.hint_loss", "0.5"],
                  "zero3", 3),
}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """ONE 2-process DeepSpeed launch (tests/distributed_worker.py) running the SCENARIOS: ZeRO-1 with
    the dr_grpo loss and the padded log-prob layout; ZeRO-2 with active clipping, stopped by a SIGTERM to rank 1 only and resumed
    from its checkpoint; ZeRO-3 with beta > 0 (a ZeRO-3 reference engine), batch reward scaling and 2 iterations
    (old log-probs through the engine); ZeRO-3 with CPU offload of optimizer and parameters (when
    DeepSpeed's CPU Adam is built); ZeRO-3 with micro batches by tokens. The 1-process runs without DeepSpeed run in this process."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    base = tmp_path_factory.mktemp("dist")
    cache = base / "cache"
    runs = []
    only = os.environ.get("RTPO_TEST_SCENARIOS")  # e.g. zero2,zero2_refill: run just these (while developing)
    for name, (extra, ds, _) in SCENARIOS.items():
        if only and name not in only.split(","):
            continue
        if name == "zero3_offload" and not cpu_adam_built():
            continue
        single(tiny(base / f"{name}-1proc", cache, *extra))  # first: fills the warm-start cache the processes share
        argv = tiny(base / name, cache, *extra, "--deepspeed", CONFIGS[ds])
        if name in ("zero2", "zero2_lora", "zero3_lora"):  # rank 1 alone is sent SIGTERM during step 1; then a resume
            runs += [{"argv": argv, "sigterm_rank1_at_step": 1}, {"argv": argv + ["--resume", "auto"]}]
        elif name == "zero3":
            runs.append({"argv": argv, "probe_decode": str(base / "zero3-decode-collectives.json")})
        else:
            runs.append({"argv": argv})
    spec = base / "spec.json"
    spec.write_text(json.dumps({"runs": [{**r, "argv": [str(a) for a in r["argv"]]} for r in runs]}))
    launch(torchrun("tests/distributed_worker.py", spec))
    summaries = json.loads((base / "spec.json.summaries.json").read_text())
    return base, dict(zip([os.path.basename(r["argv"][1]) + ("+resume" if "--resume" in r["argv"] else "")
                           for r in runs], summaries))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_deepspeed_processes_equal_one_process(worker, name):
    """2 processes under DeepSpeed (ZeRO-1, 2, 3, 3 + CPU offload; CPU accelerator, gloo) give the same
    per-step metrics (loss, grad norm, rewards, KL, sharded eval...) and the same final weights as 1
    process without DeepSpeed on the same global batch and seed, within 1e-5: prompt sharding, exact
    group statistics, global loss normalisers, DeepSpeed's clipping and AdamW. The ZeRO-2 run was
    stopped by a SIGTERM that reached rank 1 only (both processes stop and save at the same step) and
    resumed from its DeepSpeed checkpoint, so signal agreement and resume are exact too. With LoRA (ZeRO-2 and
    ZeRO-3, both stopped and resumed the same way) the adapters and the base written for them agree too."""
    worker, summaries = worker
    if os.environ.get("RTPO_TEST_SCENARIOS") and name not in os.environ["RTPO_TEST_SCENARIOS"].split(","):
        pytest.skip(f"{name}: not in RTPO_TEST_SCENARIOS")
    if not (worker / name).exists():
        pytest.skip(f"{name}: DeepSpeed's CPU Adam op is not built (a JIT compile of minutes on first use); "
                    "set RTPO_TEST_BUILD_CPU_ADAM=1 to build it and run this case")
    steps = SCENARIOS[name][2]
    metric, weight = max_differences(worker / f"{name}-1proc", worker / name, steps)
    print(f"{name}: max |metric diff| {metric:.3g}, max |weight diff| {weight:.3g}")
    assert metric < TOL and weight < TOL
    only_rank0_outputs(worker / name, lora="lora" in name)
    if name == "zero2_refill":  # both refills acted (in the runs compared above)
        from rtpo.metrics import read_metrics

        rows = [r for r in read_metrics(worker / name / "metrics.jsonl") if "reward" in r]
        assert any(r["rerolled_groups"] > 0 for r in rows) and any(r["refill_rounds"] > 0 for r in rows)
    if "lora" in name:  # the base the adapter names was written once, gathered, before any update: the same
        from safetensors.torch import load_file

        wa, wb = (load_file(worker / n / "base_model" / "model.safetensors") for n in (f"{name}-1proc", name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ck = worker / name / "checkpoints" / f"step_{steps:06d}"
    shards = sorted(p.name for p in (ck / "deepspeed" / "state").iterdir() if "optim_states" in p.name)
    assert len(shards) == 2, shards  # one ZeRO optimizer shard per process
    if name in ("zero2", "zero2_lora", "zero3_lora"):
        assert summaries[name]["stopped"] == "SIGTERM" and summaries[name]["steps"] == 2
        assert summaries[f"{name}+resume"]["steps"] == steps


@pytest.mark.slow
def test_zero3_generation_gathers_once_not_per_token(worker):
    """Under ZeRO-3 the decoding loop issues no collective at all (parameters are gathered once for the
    whole rollout); without the trainer's gather the same rollout all-gathers inside decoding."""
    counts = json.loads((worker[0] / "zero3-decode-collectives.json").read_text())
    assert counts["gathered"] == 0 and counts["not_gathered"] > 0, counts


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ddp_under_torchrun_without_deepspeed(tmp_path, lora):
    """`torchrun --nproc_per_node 2 train.py` without --run.deepspeed trains with DDP, and runs even
    where DeepSpeed cannot be imported; 2 processes equal 1 process within 1e-5 (grpo loss, 2 micro
    batches per update: gradient sync only on the last one). With LoRA: DDP syncs the adapters only,
    the reference (beta > 0) is the policy with adapters disabled."""
    cache = tmp_path / "cache"
    extra = ["--loss.loss_type", "grpo"] + (["--lora.r", "4", "--loss.beta", "0.1", "--lr", "1e-2"] if lora else [])
    single(tiny(tmp_path / "one", cache, *extra))
    hide = tmp_path / "hide"
    hide.mkdir()
    # as if not installed: `import deepspeed` fails and importlib's find_spec says None, so neither rtpo
    # nor transformers/accelerate (which probe for it) can use it
    (hide / "sitecustomize.py").write_text('import sys\nsys.modules["deepspeed"] = None\n')
    p = launch(torchrun("train.py", *tiny(tmp_path / "ddp", cache, *extra)),
               PYTHONPATH=str(tmp_path / "hide") + os.pathsep + ROOT)
    assert "DDP: 2 process(es)" in p.stdout + p.stderr
    metric, weight = max_differences(tmp_path / "one", tmp_path / "ddp", 3)
    print(f"ddp: max |metric diff| {metric:.3g}, max |weight diff| {weight:.3g}")
    assert metric < TOL and weight < TOL
    only_rank0_outputs(tmp_path / "ddp", lora=lora)


@pytest.mark.slow
def test_plain_python_with_a_deepspeed_config_runs_as_one_process(tmp_path):
    """`python train.py --deepspeed ds_configs/zero2.json` with no launcher (no RANK/WORLD_SIZE in the
    environment) trains as one DeepSpeed process and equals the run without DeepSpeed."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    cache = tmp_path / "cache"
    single(tiny(tmp_path / "one", cache))
    p = launch([sys.executable, "train.py", *tiny(tmp_path / "ds", cache, "--deepspeed", CONFIGS["zero2"])])
    assert json.loads(p.stdout[p.stdout.index("{\n"):])["steps"] == 3
    metric, weight = max_differences(tmp_path / "one", tmp_path / "ds", 3)
    assert metric < TOL and weight < TOL
