"""A real, throwaway PostgreSQL server for the multi-worker tests.

`postgres_server` (session scope) runs Debian's PostgreSQL binaries (`initdb`, `pg_ctl`) in a
fresh temporary data directory, on 127.0.0.1 and a free port, with trust authentication, and
stops it and deletes the directory at the end of the session. `fresh_db()` creates a new empty
database on it and returns its URL, so every test starts from a database with no Optuna schema.

PostgreSQL refuses to run as root: when the tests run as root, the server runs as the
`postgres` user (Debian's package creates it) in a directory that user owns (pytest's tmp_path
lives under /tmp/pytest-of-root, which it cannot read). Tests skip with the reason when the
binaries, the user or the Python driver (psycopg2, the `[postgres]` extra) are missing; CI
installs them (`apt-get install postgresql`).

Use it from a test module with `from pg import postgres_server  # noqa: F401` (pytest puts
tests/ on sys.path), or import `PostgresServer` and start one by hand.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

PG_BIN_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin")
RUN_AS = "postgres"


def find_pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: $PG_BIN, Debian's newest version, or PATH."""
    candidates = [os.environ.get("PG_BIN", "")]
    for pattern in PG_BIN_GLOBS:
        candidates += sorted(glob.glob(pattern),
                             key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")],
                             reverse=True)
    which = shutil.which("initdb")
    if which:
        candidates.append(str(Path(which).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl start in a temporary directory; `stop()` removes it all."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="personclf-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.user = None  # the OS user the server runs as (None: this one)
        self.started = False
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam(RUN_AS)
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                pytest.skip(f"running as root and there is no {RUN_AS!r} user to run "
                            "PostgreSQL as (apt-get install postgresql creates it)")
            self.user = RUN_AS
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            os.chmod(self.root, 0o700)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        kw = {"user": self.user} if self.user else {}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=self.root, env={**os.environ, "LC_ALL": "C", "LANG": "C"}, **kw)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{self._log_tail()}")
        return proc

    def _log_tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return ""

    def start(self) -> "PostgresServer":
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-sync")
        # Only TCP on 127.0.0.1; the socket directory is ours too (not /var/run/postgresql).
        # fsync off: a test database need not survive a power cut, and it is much faster.
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c max_connections=200")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
                  "-t", "60", "start")
        self.started = True
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60) -> None:
        import psycopg2

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg2.connect(self.url("postgres")).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not accept connections:\n{self._log_tail()}")
                time.sleep(0.2)

    def url(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def fresh_db(self, prefix: str = "t") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg2

        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        conn = psycopg2.connect(self.url("postgres"))
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def stop(self) -> None:
        try:
            if self.started:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop",
                          timeout=60)
        finally:
            self.started = False
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A running PostgreSQL server for this test session (skips with the reason if impossible)."""
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install 'personclf-tune[postgres]'")
    pytest.importorskip("sqlalchemy")
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: "
                    "apt-get install postgresql, or set PG_BIN")
    server = PostgresServer(bin_dir)
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()
