"""A full disk, a read-only folder or another OS failure on a run's own files is one line, and the run resumes."""

import errno
import json
import shutil
import subprocess
import sys

import pytest
from helpers import TINY, metrics
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.errors import storage_error

runner = CliRunner()


def one_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.output
    return lines


def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_run_resumes(tmp_path, monkeypatch):
    import sapo_lite.train.checkpoint as checkpoint

    real_save, calls = checkpoint.torch.save, []

    def save_until_the_disk_fills(obj, path):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: step 4
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_fills)
    out = tmp_path / "run"
    first = runner.invoke(app, ["train", *TINY, "train.max_steps=6", "train.save_every=2", "--out", str(out)])
    lines = one_line(first)
    assert lines[0] == f"error: no space left on device while writing {out}/checkpoints/.tmp-step-4"
    assert lines[1] == f"hint: free some space on that disk; then continue with `sapo-lite train --resume {out}`"
    assert not (out / "checkpoints" / ".tmp-step-4").exists()  # the half-written checkpoint gave its space back

    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    resumed = runner.invoke(app, ["train", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert sorted(metrics(out)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("code,expected", [
    (errno.ENOSPC, "no space left on device while writing run/metrics.jsonl"),
    (errno.EROFS, "read-only file system: cannot write run/metrics.jsonl"),
    (errno.EACCES, "permission denied: cannot write run/metrics.jsonl"),
])
def test_os_errors_name_the_file(code, expected):
    error = storage_error(OSError(code, "x"), "run/metrics.jsonl", "run")
    assert error.message == expected and "sapo-lite train --resume run" in error.hint


def test_disk_full_in_other_disguises_is_recognised(tmp_path):
    from safetensors import SafetensorError

    disguised = [SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                 'message: "No space left on device" })'),
                 __import__("sqlite3").OperationalError("database or disk is full")]
    for exc in disguised:
        assert storage_error(exc, tmp_path / "f").message.startswith("no space left on device")
    assert storage_error(RuntimeError("some other bug"), tmp_path / "f") is None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None or sys.platform != "linux", reason="needs unshare")
def test_a_real_full_disk_on_tmpfs(tmp_path):
    """A 3 MB tmpfs (in a private mount namespace) fills during the run; a larger one lets it finish."""
    disk = tmp_path / "disk"
    disk.mkdir()
    train = f"{sys.executable} -m sapo_lite.cli train"
    script = f"""
        mount -t tmpfs -o size=3m tmpfs {disk} || exit 77
        cd {disk}
        {train} {' '.join(TINY)} train.max_steps=6 train.save_every=2 --out run 2> {tmp_path}/err1 > /dev/null
        echo $? > {tmp_path}/rc1
        mount -o remount,size=64m {disk}
        {train} --resume run 2> {tmp_path}/err2 > /dev/null
        echo $? > {tmp_path}/rc2
        cp run/metrics.jsonl run/summary.json {tmp_path}/ 2>/dev/null
    """
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 77 or not (tmp_path / "rc1").exists():
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[-200:]}")
    err1 = (tmp_path / "err1").read_text().strip().splitlines()
    assert (tmp_path / "rc1").read_text().strip() == "1"
    assert len(err1) == 2 and err1[0].startswith("error: no space left on device while writing run/"), err1
    assert err1[1] == "hint: free some space on that disk; then continue with `sapo-lite train --resume run`"
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()[-2000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 6
