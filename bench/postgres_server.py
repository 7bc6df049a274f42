"""A throwaway PostgreSQL server for the tests and benchmarks: `initdb` + `pg_ctl` in a temporary directory, on a
free loopback port, trust authentication, removed at the end. PostgreSQL refuses to run as root: as root the server
runs as the `postgres` user (`runuser -u postgres --`) in a directory that user owns."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from serving.launcher import free_port

INSTALL_HINT = ("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: run `apt-get install -y postgresql` "
                "(`make test` does it when run as root), or put their directory on PATH")
DATABASE = "ledger"


def binaries() -> Path | None:
    """The directory holding initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(bindir) / "initdb").exists() and (Path(bindir) / "pg_ctl").exists():
            return Path(bindir)
    return None


class TempPostgres:
    """`start()` → a running server whose `url` names an empty database; `stop()` / `start()` again keep its data
    (a restart on the same port); `close()` stops it and removes its directory."""

    def __init__(self, synchronous_commit: bool = True):
        bindir = binaries()
        if bindir is None:
            raise RuntimeError(INSTALL_HINT)
        self.bindir, self.port, self.synchronous_commit = bindir, free_port(), synchronous_commit
        self.base = Path(tempfile.mkdtemp(prefix="undistillable-pg-"))
        self.data, self.log = self.base / "data", self.base / "server.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.base, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.started = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run([*self.as_user, str(self.bindir / tool), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=self.base)
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}\n{log}")

    def start(self) -> TempPostgres:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c max_connections=200 "
                   f"-c synchronous_commit={'on' if self.synchronous_commit else 'off'}")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        self.started = True
        self._create_database()
        return self

    def _create_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True,
                                     connect_timeout=5) as conn:
                    if conn.execute("SELECT 1 FROM pg_database WHERE datname=%s", (DATABASE,)).fetchone() is None:
                        conn.execute(f"CREATE DATABASE {DATABASE}")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def new_database(self, hint: str = "db") -> str:
        """Create an empty database (its name made from `hint`) and return its URL."""
        import re

        import psycopg

        self._count = getattr(self, "_count", 0) + 1
        name = f"{re.sub(r'[^a-z0-9]+', '_', hint.lower())[:40]}_{self._count}"
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (fast: its connections are cut at once); its data stays for the next `start()`."""
        if self.started:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
            self.started = False

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
