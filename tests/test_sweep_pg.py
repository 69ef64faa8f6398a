"""Sweeps across machines on a real PostgreSQL server (sweep file `storage: postgresql://...`).

The `pg_url` fixture starts a throwaway server: the Debian package's initdb / pg_ctl
(/usr/lib/postgresql/*/bin, or on PATH; .ci/run installs the package when it is missing), a temp
data dir, a free loopback port, trust authentication, run as the `postgres` (else `nobody`) user
when the tests run as root, since initdb refuses root. It is stopped and deleted at teardown.
The tests skip, saying why, only where no server can be started.

Two workers, each with its own output folder (as on two hosts that share only the database),
must never run a trial number twice and must stop at exactly `trials`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "tests" / "toy_train.py")


def pg_bin() -> Path | None:
    """Folder holding initdb and pg_ctl: the newest /usr/lib/postgresql/<v>/bin, else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3])
                   if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).resolve().parent if on_path and shutil.which("initdb") else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_url():
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 not installed (pip install psycopg2-binary)")
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb/pg_ctl): apt-get install postgresql")
    as_user: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="sweep-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
        if user is None or not shutil.which("runuser"):
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.skip("running as root without a 'postgres'/'nobody' user or runuser: cannot run initdb")
        as_user = ["runuser", "-u", user, "--"]
        shutil.chown(tmp, user)
    data, port = tmp / "data", free_port()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        """Output to a file, not a pipe: the server that pg_ctl starts would keep a pipe open."""
        with tempfile.TemporaryFile("w+") as f:
            r = subprocess.run([*as_user, *cmd], stdout=f, stderr=subprocess.STDOUT, text=True, timeout=120)
            f.seek(0)
            r.stdout, r.stderr = f.read(), ""
        return r

    r = run(str(bindir / "initdb"), "-D", str(data), "-U", "sweep", "--auth=trust", "-E", "UTF8", "--no-sync")
    if r.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"initdb failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {tmp} -c fsync=off -c max_connections=50"
    r = run(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(tmp / "server.log"), "-w", "-t", "60",
            "start")
    if r.returncode:
        log = (tmp / "server.log").read_text(errors="replace") if (tmp / "server.log").is_file() else r.stderr
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"pg_ctl start failed: {log.strip().splitlines()[-1:]}")
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="sweep", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE sweeps")
        conn.close()
        yield f"postgresql://sweep@127.0.0.1:{port}/sweeps"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_db_lock_excludes_a_second_session(pg_url):
    from lib.study import db_lock

    events = []

    def holder():
        with db_lock(pg_url, "study-x"):
            events.append(("a in", time.time()))
            time.sleep(0.5)
            events.append(("a out", time.time()))

    t = threading.Thread(target=holder, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not events and t.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    assert events, "the first db_lock was not taken"
    with db_lock(pg_url, "study-y"):  # another name: not blocked
        events.append(("other", time.time()))
    with db_lock(pg_url, "study-x"):  # the same name from another connection waits for the holder
        events.append(("b in", time.time()))
    t.join()
    names = [e[0] for e in events]
    assert names == ["a in", "other", "a out", "b in"]


@pytest.mark.slow
def test_two_hosts_share_one_postgres_study(pg_url, tmp_path):
    (tmp_path / "base.yaml").write_text("tracker: none\n")
    spec = {"script": TOY, "config": str(tmp_path / "base.yaml"), "metric": "score", "trials": 8,
            "storage": pg_url, "study_name": "toy_pg", "poll_s": 0.05, "pruner": {"name": "none"},
            "sampler": {"name": "random"},
            "overrides": ["train.total_steps=6", "train.eval_interval=2", "toy.sleep=0.02"],
            "space": {"toy.x": {"type": "float", "low": -2, "high": 2}}}
    path = tmp_path / "toy_pg.yaml"
    path.write_text(yaml.safe_dump(spec))
    hosts = [tmp_path / "host0", tmp_path / "host1"]  # each worker's own folder: they share only the database
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "run", str(path), "--worker", str(i),
                               f"output_dir={h}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i, h in enumerate(hosts)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    from lib.study import rdb_url

    trials = optuna.load_study(study_name="toy_pg", storage=rdb_url(pg_url)).get_trials()
    assert [t.number for t in trials] == list(range(8))  # exactly `trials`, none twice
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials
    assert len({t.params["toy.x"] for t in trials}) == 8
    for t in trials:  # each trial ran in one worker's folder only
        homes = [h for h in hosts if (h / "trials" / f"trial_{t.number:04d}" / "metrics.jsonl").is_file()]
        assert homes == [Path(t.user_attrs["run_dir"]).parents[1]]
    import sweep

    assert sweep.main(["summary", str(path), f"output_dir={hosts[0]}"]) == 0  # a host's summary: the whole study
    assert (hosts[0] / "trials.csv").read_text().count("COMPLETE") == 8
