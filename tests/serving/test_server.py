"""running_server: a server that exits before it answers is one clear error carrying its log."""
import sys
import urllib.request

import pytest

from ltrepro.errors import LtreproError
from ltrepro.serving.server import free_port, running_server


def test_a_server_that_exits_at_start_is_an_error_with_its_log(tmp_path):
    command = [sys.executable, "-c", "import sys; print('port in use'); sys.exit(3)"]
    with pytest.raises(LtreproError, match=r"(?s)toy server did not start \(see .*server\.log\).*port in use"):
        with running_server("toy server", command, free_port(), tmp_path / "server.log", "ping", startup_s=60):
            pass


def test_a_server_answering_its_probe_is_yielded_and_stopped(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    (tmp_path / "health").write_text("ok")  # http.server answers 200 for an existing file
    with running_server("http.server", command, port, tmp_path / "logs" / "server.log", "health", startup_s=60) as url:
        assert url == f"http://127.0.0.1:{port}"
    with pytest.raises(OSError):  # the process group was stopped on exit
        urllib.request.urlopen(f"{url}/health", timeout=2)
