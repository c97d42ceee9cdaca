"""The README's main-job command runs verbatim on a fresh checkout.

Both README commands start with the same install (checked below), which CI has just run to get
here (``.ci/run`` is the test command verbatim); the main-job test runs the rest of its command,
verbatim, in a fresh copy of the checkout with that installation, instead of a second venv and
pip install (~70 s on the 2-core CI machine)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_readme_opens_with_two_commands():
    cmds = readme_commands()
    assert "ds4c compile" in cmds[0] and "ds4c run" in cmds[0]
    assert "pytest" in cmds[1]
    assert cmds[0].split("&&")[:3] == cmds[1].split("&&")[:3], "both commands install the same way"


@pytest.mark.slow
def test_main_job_command_runs_verbatim(tmp_path):
    cmd = readme_commands()[0]
    work = tmp_path / "checkout"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    for f in tracked:
        src = ROOT / f
        if src.is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / f)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    install, job = cmd.split("&&")[:3], "&&".join(cmd.split("&&")[3:])
    assert install == readme_commands()[1].split("&&")[:3] and "ds4c compile" in job
    if shutil.which("ds4c") is None:  # not installed as the README installs: run the whole command
        job = cmd
    else:
        env["PATH"] = os.pathsep.join([str(Path(shutil.which("ds4c")).parent), env["PATH"]])
    res = subprocess.run(["bash", "-c", job], cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "generated ids:" in res.stdout
    assert (work / "tiny-b200.ds4").is_file()
