"""Run records: atomic and torn run.json, owner liveness, which runs count as stopped."""
import subprocess
import sys

import pytest

from ltrepro import runs
from ltrepro.errors import LtreproError
from ltrepro.runs import (
    finished_runs, is_stopped, owner_alive, process_owner, read_run_json, scan_runs, unfinished_runs, write_run,
)  # fmt: skip


def dead_owner() -> str:
    """The owner string of a process that has exited."""
    child = subprocess.run([sys.executable, "-c", "from ltrepro.runs import process_owner; print(process_owner())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return child.stdout.strip()


def test_owner_of_this_process_is_alive_and_of_an_exited_one_dead():
    assert owner_alive(process_owner()) is True
    assert owner_alive(dead_owner()) is False
    assert owner_alive(None) is None and owner_alive("another-host/x/1/2") is None
    host, boot, pid, start = process_owner().split("/")
    assert owner_alive(f"{host}/{boot}/{pid}/{int(start) + 1}") is False  # the pid reused by a later process


def test_stopped_means_killed_or_running_with_a_dead_owner():
    assert is_stopped({"status": "KILLED"}) and not is_stopped({"status": "KILLED", "superseded": True})
    assert is_stopped({"status": "RUNNING", "owner": dead_owner()})
    assert not is_stopped({"status": "RUNNING", "owner": process_owner()})
    assert not is_stopped({"status": "RUNNING"})  # an older record without owner: cannot tell, so not touched
    assert not is_stopped({"status": "FAILED"}) and not is_stopped({"status": "FINISHED"})


def test_run_json_is_written_atomically(tmp_path, monkeypatch):
    write_run(tmp_path, {"status": "RUNNING", "run_dir": tmp_path})
    assert read_run_json(tmp_path / "run.json") == {"status": "RUNNING"}  # run_dir is never stored

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "to_json", lambda values: '{"status": "FINI')  # what a torn write would leave
    monkeypatch.setattr("ltrepro.files.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_run(tmp_path, {"status": "FINISHED"})
    assert read_run_json(tmp_path / "run.json") == {"status": "RUNNING"}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left


@pytest.mark.parametrize("content", ["", '{"status": "FINI', "[1, 2]", "\xff\xfe"])
def test_a_torn_run_json_is_named_once_and_skipped(tmp_path, capsys, content):
    for name, status in (("a-good", "FINISHED"), ("b-torn", None), ("c-killed", "KILLED")):
        (tmp_path / name).mkdir()
        if status is None:
            (tmp_path / name / "run.json").write_bytes(content.encode("latin1"))
        else:
            write_run(tmp_path / name, {"status": status, "stage_key": "k"})
    (tmp_path / "a-good" / "best.pt").write_bytes(b"")
    assert list(scan_runs(tmp_path)) == [tmp_path / "c-killed", tmp_path / "a-good"]
    assert list(finished_runs(tmp_path)) == [tmp_path / "a-good"]
    assert list(unfinished_runs(tmp_path, "k")) == [tmp_path / "c-killed"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b-torn/run.json: unreadable run record" in err[0] and "treating that run as dead" in err[0]
    with pytest.raises(LtreproError, match="unreadable run record"):
        read_run_json(tmp_path / "b-torn" / "run.json")
