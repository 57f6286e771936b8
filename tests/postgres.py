"""A throwaway PostgreSQL cluster for tests: ``initdb`` in a temp dir, started on a free port on
127.0.0.1 with trust auth, one fresh database per test, removed at the end.

PostgreSQL refuses to run as root, so under root (CI) the cluster belongs to the ``postgres``
system user that Debian's package creates, and its commands run through ``runuser``. The binaries
live under ``/usr/lib/postgresql/<version>/bin``, which is not on PATH.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ltrepro.serving.server import free_port

POSTGRES_BINS = "/usr/lib/postgresql/*/bin"
SYSTEM_USER = "postgres"  # created by Debian's postgresql package
SUPERUSER = "postgres"  # the cluster's superuser (initdb -U), whoever owns the files
START_ATTEMPTS = 3  # a free port can be taken by another test process before the server binds it
FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=200")


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory, or None when none is installed."""
    found = [path.parent for path in Path("/").glob(POSTGRES_BINS.lstrip("/") + "/initdb")]
    return max(found, key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0, default=None)


def as_cluster_owner(command: list[str]) -> list[str]:
    """``command`` run as the postgres system user when we are root (PostgreSQL refuses root)."""
    return ["runuser", "-u", SYSTEM_USER, "--", *command] if os.geteuid() == 0 else command


@dataclass
class Cluster:
    bin: Path
    folder: Path  # holds data/, the socket and the server log
    port: int

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        command = as_cluster_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), *args])
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database with a unique name; returns its SQLAlchemy URL."""
        import psycopg2

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres")
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)

    def stop(self) -> None:
        self.pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def start_cluster() -> Cluster:
    """initdb and start a private cluster; raises RuntimeError with the server's log if it cannot.
    The folder is made with tempfile, not pytest's tmp_path: that one sits under a 0700 folder of
    root's, which the postgres user could not enter."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise RuntimeError(f"no PostgreSQL under {POSTGRES_BINS} (Debian: apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="ltrepro-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, SYSTEM_USER, SYSTEM_USER)
    initdb = as_cluster_owner([str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", SUPERUSER, "-A", "trust",
                               "-E", "UTF8", "--locale=C", "--no-sync"])  # fmt: skip
    done = subprocess.run(initdb, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {done.stderr.strip() or done.stdout.strip()}")
    for attempt in range(1, START_ATTEMPTS + 1):
        cluster = Cluster(bin_dir, folder, free_port())
        options = " ".join([f"-p {cluster.port}", f"-k {folder}", "-c listen_addresses=127.0.0.1",
                            *(f"-c {setting}" for setting in FAST_SETTINGS)])  # fmt: skip
        started = cluster.pg_ctl("-l", str(cluster.log), "-w", "-t", "60", "-o", options, "start")
        if started.returncode == 0:
            return cluster
        if attempt == START_ATTEMPTS:
            log = cluster.log.read_text()[-2000:] if cluster.log.is_file() else ""
            cluster.stop()
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.strip()}\n{log}")
    raise AssertionError("unreachable: START_ATTEMPTS is at least 1")
