"""The README's commands run as pasted, in order, from a fresh copy of the repository.

Every ```` ```bash ```` block of README.md is a step a user pastes into one shell, in page order, and every
```` ```python ```` block is a snippet they run with the environment's Python at that point of the page. This
test joins them into one script and runs it in a copy of the tracked files (with this checkout's ``.venv``
linked in, as ``source .venv/bin/activate`` expects), against the README's own ports. Only the two
fresh-machine commands and test-suite commands are left out (they create ``.venv`` and run the suite; CI runs them).

``curl`` runs with ``--fail-with-body`` here, so a command that answers an HTTP error fails the test; a
command the page shows to demonstrate an error belongs in a ```` ```text ```` block. Blocks that are not
runnable as they stand (an option synopsis) use ```` ```text ```` too.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.server import REPO_ROOT, busy_ports, configured_ports

pytestmark = [pytest.mark.slow, pytest.mark.integration]

README = REPO_ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
FRESH_MACHINE = "python3 -m venv .venv"  # the main command and the test command
NOT_RUN = (FRESH_MACHINE, "-m pytest")  # ... and any test-suite command: CI runs the suite itself
SCRIPT_TIMEOUT_S = 1200


def readme_steps(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of the README's runnable blocks (bash and python), in page order."""
    return [(lang, code) for lang, code in FENCE.findall(text)
            if lang in ("bash", "python") and not any(marker in code for marker in NOT_RUN)]


def as_script(steps: list[tuple[str, str]]) -> str:
    """One bash script: the bash blocks as they are, each python block as a heredoc for the venv's Python."""
    parts = [
        "set -euo pipefail",
        'curl() { command curl --fail-with-body "$@"; }',  # an HTTP error fails the step, as a user would see it
        "trap 'yolo-ts-serve --stop >/dev/null 2>&1 || true' EXIT",  # never leave the README's server running
    ]
    for n, (lang, code) in enumerate(steps, 1):
        parts.append(f"echo '### README step {n} ({lang})'")
        parts.append(code if lang == "bash" else f"python - <<'README_PYTHON'\n{code}README_PYTHON")
    return "\n".join(parts) + "\n"


def test_readme_blocks_are_found():
    """The extraction itself: the page has runnable steps, and the fresh-machine commands are not among them."""
    steps = readme_steps(README.read_text())
    assert len(steps) >= 5, "README.md has fewer runnable ```bash/```python blocks than its guide needs"
    assert all(FRESH_MACHINE not in code for _, code in steps)
    assert FRESH_MACHINE in README.read_text(), "the fresh-machine commands must stay in the README"


def _fresh_copy(dest: Path) -> dict[str, str]:
    """The tracked files of this checkout (as they are now) in ``dest``, with ``.venv`` linked in; returns the
    sha256 of each copied file, by its path."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    digests = {}
    for rel in filter(None, tracked.decode().split("\0")):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
            digests[rel] = _sha256(dest / rel)
    (dest / ".venv").symlink_to(REPO_ROOT / ".venv", target_is_directory=True)
    return digests


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def test_readme_commands_run_as_pasted(tmp_path):
    if not (REPO_ROOT / ".venv" / "bin" / "activate").is_file():
        pytest.fail("the README's commands run in .venv; create it with the README's test command")
    clone = tmp_path / "clone"
    digests = _fresh_copy(clone)
    busy = busy_ports(configured_ports((clone / "config.properties").read_text()))
    assert not busy, f"the README's server needs the ports of config.properties, and these are in use: {busy}"
    script = as_script(readme_steps(README.read_text()))
    (tmp_path / "readme.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(Path(sys.executable).parent)))
    log = tmp_path / "readme.log"
    try:
        with log.open("w") as out:
            rc = subprocess.run(["bash", str(tmp_path / "readme.sh")], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=SCRIPT_TIMEOUT_S).returncode
    finally:
        subprocess.run([sys.executable, "-m", "tools.serve", "--stop", "--workdir", str(clone)], cwd=clone,
                       capture_output=True, timeout=120)
    text = log.read_text()
    steps = re.findall(r"### README step (\d+)", text)
    assert rc == 0, f"README step {steps[-1] if steps else '?'} failed (rc {rc}); the last lines:\n" + "\n".join(text.splitlines()[-40:])
    assert steps and int(steps[-1]) == len(readme_steps(README.read_text())), "the script stopped before the last step"
    # nothing the page runs changes a file of the repository (the launcher writes its own config elsewhere)
    changed = sorted(rel for rel, digest in digests.items() if _sha256(clone / rel) != digest)
    assert not changed, f"the README's commands changed tracked files: {changed}"
