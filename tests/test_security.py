"""Nothing rtpo reads from a checkpoint folder can execute code (issue 22, item 1).

A crafted trainer_state.pt whose pickle would write a marker file when unpickled is planted in a
real checkpoint, its manifest rewritten to match (whoever crafts a folder writes its manifest too).
Every entry point that reads the file must refuse it with one `error:` line, and the marker must
never appear. The trainer's own state must still round-trip through the weights-only loader.
"""

import json
import os

import pytest
import torch

import train
from conftest import tiny_args
from rtpo import checkpoint as ckpt
from rtpo.checkpoint import CKPT_DIR, STATE_FILE, load_state

pytestmark = pytest.mark.usefixtures("one_thread")


class _Payload:
    """Unpickling this calls builtins.exec: it writes `path` (an attacker would do worse)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('code ran')",)


def plant(folder, marker) -> None:
    """Replace folder's trainer_state.pt by a code-running pickle and re-sign its manifest."""
    torch.save({"step": 2, "config": {}, "payload": _Payload(str(marker))}, os.path.join(folder, STATE_FILE))
    step = json.load(open(os.path.join(folder, ckpt.MANIFEST)))["step"]
    os.remove(os.path.join(folder, ckpt.MANIFEST))
    ckpt.write_manifest(folder, step)


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:") and sum(ln.startswith("error:") for ln in lines) == 1, err
    return lines[-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    out, cache = root / "run", root / "cache"
    assert train.main(tiny_args(out, cache, "--max_steps", "2", "--eval.num_examples", "0")) == 0
    return out, cache


def test_trainer_state_loads_weights_only(run):
    """The state the trainer writes (optimizer, scheduler, curriculum, every RNG, config) is plain
    tensors and values: torch's weights-only unpickler reads it with no allow-list."""
    out, _ = run
    path = os.path.join(out, CKPT_DIR, "step_000002")
    st = torch.load(os.path.join(path, STATE_FILE), weights_only=True)
    assert st["step"] == 2 and torch.is_tensor(st["rng"]["numpy"]["keys"])
    assert load_state(path)["config"]["run"]["seed"] == st["config"]["run"]["seed"]


def test_crafted_trainer_state_never_runs(run, tmp_path, capfd):
    """--resume (the run folder and the checkpoint folder) and `python -m rtpo.eval` refuse the file:
    exit 2, one error line naming it, and the payload never ran."""
    import shutil

    from rtpo import eval as rtpo_eval

    src, cache = run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    folder = out / CKPT_DIR / "step_000002"
    marker = tmp_path / "pwned"
    plant(folder, marker)
    capfd.readouterr()
    for resume in (str(out), str(folder)):
        rc = train.main(tiny_args(out, cache, "--max_steps", "4", "--eval.num_examples", "0", "--resume", resume))
        line = error_line(capfd.readouterr().err)
        assert rc == 2 and STATE_FILE in line and "run code" in line, line
    alone = tmp_path / "downloaded"  # outside a run folder, rtpo.eval reads the config from trainer_state.pt
    shutil.copytree(folder, alone)
    assert rtpo_eval.main([str(alone), "--no-progress", "--num-examples", "2"]) == 2
    line = error_line(capfd.readouterr().err)
    assert STATE_FILE in line and "run code" in line, line
    assert not marker.exists()


def test_truncated_trainer_state_is_one_error_line_in_eval(run, tmp_path, capfd):
    """rtpo.eval on a checkpoint whose trainer_state.pt is cut short: exit 2 and one line (it was a
    traceback), as resume gives."""
    import shutil

    from rtpo import eval as rtpo_eval

    src, _ = run
    folder = tmp_path / "step_000002"
    shutil.copytree(src / CKPT_DIR / "step_000002", folder)
    state = folder / STATE_FILE
    state.write_bytes(state.read_bytes()[:200])
    capfd.readouterr()
    assert rtpo_eval.main([str(folder), "--no-progress", "--num-examples", "2"]) == 2
    line = error_line(capfd.readouterr().err)
    assert STATE_FILE in line and "damaged" in line, line


# ------------------------------------------------------------------ every folder rtpo loads weights from
def plant_bin(folder, marker, name="pytorch_model.bin", weights="model.safetensors") -> None:
    """Replace folder's safetensors weights by a pickled .bin that also holds a code-running object (torch
    would unpickle it on a weights_only=False load); re-sign the manifest if the folder has one."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, weights))
    os.remove(os.path.join(folder, weights))
    state["payload"] = _Payload(str(marker))
    torch.save(state, os.path.join(folder, name))
    if os.path.isfile(os.path.join(folder, ckpt.MANIFEST)):
        step = json.load(open(os.path.join(folder, ckpt.MANIFEST)))["step"]
        os.remove(os.path.join(folder, ckpt.MANIFEST))
        ckpt.write_manifest(folder, step)


def test_crafted_weights_never_run_in_any_entry_point(run, tmp_path, capfd):
    """A crafted pytorch_model.bin in place of model.safetensors, in: a `--model` folder, a checkpoint
    resumed from, a checkpoint given to rtpo.eval and to rtpo.export, and the warm-start cache. Each
    exits 2 with one error line naming the .bin file and saying it could run code; the payload never ran."""
    import glob
    import shutil

    from rtpo import eval as rtpo_eval, export as rtpo_export

    src, cache = run
    marker = tmp_path / "pwned"
    ck = tmp_path / "ckpt"
    shutil.copytree(src / CKPT_DIR / "step_000002", ck)
    plant_bin(ck, marker)

    def refused(rc, what):
        line = error_line(capfd.readouterr().err)
        assert rc == 2 and "pytorch_model.bin" in line and "could run code" in line, (what, line)

    capfd.readouterr()
    # --model <folder>: the checkpoint's weights and tokenizer (trainer_state.pt is not read)
    refused(train.main(tiny_args(tmp_path / "m", cache, "--model", ck, "--warmstart.enabled", "false",
                                 "--max_steps", "1")), "--model")
    # --resume: a run folder whose only checkpoint is the crafted one
    out = tmp_path / "run"
    shutil.copytree(src, out)
    shutil.rmtree(out / CKPT_DIR / "step_000002")
    shutil.copytree(ck, out / CKPT_DIR / "step_000002")
    refused(train.main(tiny_args(out, cache, "--max_steps", "4", "--eval.num_examples", "0", "--resume", "auto")),
            "resume")
    refused(rtpo_eval.main([str(ck), "--no-progress", "--num-examples", "2"]), "rtpo.eval")
    refused(rtpo_export.main([str(ck), str(tmp_path / "exported")]), "rtpo.export")
    assert not (tmp_path / "exported").exists()
    # the warm-start cache: a crafted folder under the key this run looks up
    crafted_cache = tmp_path / "cache"
    shutil.copytree(cache, crafted_cache)
    for folder in glob.glob(str(crafted_cache / "warmstart-*")):
        plant_bin(folder, marker)
    refused(train.main(tiny_args(tmp_path / "w", crafted_cache, "--max_steps", "1")), "warm-start cache")
    assert not marker.exists()


@pytest.fixture(scope="module")
def lora_run(run, tmp_path_factory):
    pytest.importorskip("peft")
    _, cache = run
    out = tmp_path_factory.mktemp("lora") / "run"
    assert train.main(tiny_args(out, cache, "--max_steps", "2", "--eval.num_examples", "0", "--lora.r", "2")) == 0
    return out


@pytest.mark.parametrize("what", ["base_model", "adapter"])
def test_crafted_lora_base_or_adapter_never_runs(what, lora_run, tmp_path, capfd):
    """A LoRA run's base (<run>/base_model, read by rtpo.eval / rtpo.export and resume) or its adapter with
    a crafted .bin in place of its safetensors: rtpo.export and rtpo.eval exit 2 with one error line; the
    payload never ran."""
    import shutil

    from rtpo import eval as rtpo_eval, export as rtpo_export
    from rtpo.lora import BASE_DIR

    out = tmp_path / "run"
    shutil.copytree(lora_run, out)
    marker = tmp_path / "pwned"
    ck = out / CKPT_DIR / "step_000002"
    ac = json.loads((ck / "adapter_config.json").read_text())  # the copy names its own base, as a downloaded run would
    ac["base_model_name_or_path"] = str(out / BASE_DIR)
    (ck / "adapter_config.json").write_text(json.dumps(ac))
    if what == "base_model":
        plant_bin(out / BASE_DIR, marker)
    else:
        plant_bin(ck, marker, name="adapter_model.bin", weights="adapter_model.safetensors")
    os.remove(ck / ckpt.MANIFEST)
    ckpt.write_manifest(ck, 2)
    capfd.readouterr()
    for call in (lambda: rtpo_export.main([str(ck), str(tmp_path / "exported")]),
                 lambda: rtpo_eval.main([str(ck), "--no-progress", "--num-examples", "2"])):
        rc = call()
        line = error_line(capfd.readouterr().err)
        assert rc == 2 and ".bin" in line and ("could run code" in line or "adapter" in line), line
    assert not marker.exists()


def test_no_unsafe_loader_in_rtpo_source():
    """Statically, over every module of rtpo/ and train.py: YAML only through yaml.safe_load, no
    pickle / marshal / dill / joblib load, every torch.load passes weights_only=True, and the loads of
    checkpoint, cache and base folders (load_pretrained outside the --model path) never pass
    trust_remote_code."""
    import ast
    import glob

    from conftest import ROOT

    bad = []
    for path in sorted(glob.glob(os.path.join(ROOT, "rtpo", "**", "*.py"), recursive=True)) + [os.path.join(ROOT, "train.py")]:
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{os.path.relpath(path, ROOT)}:{node.lineno} {f}"
            if f.startswith("yaml.") and f not in ("yaml.safe_load", "yaml.safe_dump"):
                bad.append(where)
            if f.split(".")[0] in ("pickle", "marshal", "dill", "joblib", "cloudpickle") and f.endswith(("load", "loads")):
                bad.append(where)
            if f == "torch.load" and kw.get("weights_only") != "True":
                bad.append(where)
            if f.endswith("load_pretrained") and "trust_remote_code" in kw:
                bad.append(where)
    assert not bad, bad


@pytest.mark.slow
def test_crafted_deepspeed_shard_never_runs(run, tmp_path):
    """DeepSpeed unpickles its ZeRO shards with weights_only=False: a real ZeRO-2 checkpoint's shards pass
    rtpo's scan (only DeepSpeed's own data classes), and the same checkpoint with a code-running pickle in its
    optimizer shard (manifest re-signed) is refused on --resume before DeepSpeed reads it: exit 2, one error
    line naming the file; the payload never ran."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    _, cache = run
    out = tmp_path / "ds"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [sys.executable, "train.py", *tiny_args(out, cache, "--max_steps", "2", "--eval.num_examples", "0",
                                                   "--deepspeed", "ds_configs/zero2.json")]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr
    folder = out / CKPT_DIR / "step_000002"
    ckpt.check_deepspeed_shards(str(folder / ckpt.DS_DIR))  # DeepSpeed's own files pass
    shard = next((folder / ckpt.DS_DIR).rglob("*optim_states.pt"))
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _Payload(str(marker))}, shard)
    os.remove(folder / ckpt.MANIFEST)
    ckpt.write_manifest(str(folder), 2)
    p = subprocess.run(argv[:-4] + ["--max_steps", "4", "--resume", "auto"] + argv[-2:], cwd=root, capture_output=True,
                       text=True, timeout=600, env=env)
    line = error_line(p.stderr)
    assert p.returncode == 2 and shard.name in line and "builtins.exec" in line and "run code" in line, line
    assert not marker.exists()
