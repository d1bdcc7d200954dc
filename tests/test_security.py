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
