"""Child processes run the parent's own packages, whatever the working directory holds."""

import subprocess
import sys

from ipc.process import spawn


def test_a_child_imports_our_package_not_a_namesake_in_the_working_directory(tmp_path, monkeypatch):
    # A user's project with its own `scheduler_proc/` (or a second checkout): `python -m` would run
    # that one in the child, since it puts the working directory first on sys.path.
    shadow = tmp_path / "scheduler_proc"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    (shadow / "__main__.py").write_text("import sys; sys.exit(42)\n")
    monkeypatch.chdir(tmp_path)
    assert subprocess.run([sys.executable, "-m", "scheduler_proc"]).returncode == 42  # the trap works
    child = spawn("scheduler_proc", ["not a config"], "ps-test")  # ours: fails to decode its config
    assert child.wait(timeout=60) not in (0, 42)
