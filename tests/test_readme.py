"""The README's quickstart runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks(language: str) -> list[str]:
    text = Path(ROOT, "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_quickstart_runs(tmp_path, children_temp):
    quickstart = readme_blocks("python")[0]
    out = subprocess.run(
        [sys.executable, "-c", quickstart], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SUCCESS [8.0, 7.0]" in out.stdout
    assert "pred" in out.stdout
    assert os.listdir(children_temp)  # its url (tempfile.mkdtemp()), here, not in /tmp


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = [block.strip() for block in readme_blocks("bash")]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci = Path(ROOT, ".ci", "run").read_text()
    assert "bash scripts/test.sh" in ci
