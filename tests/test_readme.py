"""The README stays true: every config key is documented, and CI runs its test command."""

import dataclasses
import os
import re

from rtpo.config import RTPOConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_config_key_is_in_the_readme_reference():
    """Each section.key of RTPOConfig appears in README.md's configuration table."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = text[text.index("config-reference"):]
    cfg = RTPOConfig()
    missing = [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg)
               for f in dataclasses.fields(getattr(cfg, s.name)) if f"`{s.name}.{f.name}`" not in table]
    assert not missing, f"undocumented config keys: {missing}"


def test_ci_runs_the_readme_test_command():
    """.ci/run takes the line after the ci-test-command marker; that line installs the pinned CPU
    torch and runs pytest."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    after = text[text.index("ci-test-command"):].splitlines()
    cmd = after[2]
    assert after[1] == "```bash" and "pip install torch==2.13.0" in cmd and re.search(r"pytest", cmd)
    assert "ci-test-command" in open(os.path.join(ROOT, ".ci/run")).read()
