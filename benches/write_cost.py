#!/usr/bin/env python3
"""Where a 10-row INSERT's time goes: the project's table taken apart, piece by piece.

    cargo build --release --bin eventgate && python3 benches/write_cost.py [--reps 5] [--statements 15000] [--rows 10] [--adopted]

Issue 15's reference (only the `(job_id, seq)` key, one counter UPDATE per statement,
no trigger, no foreign key) against `agent_job_events` as `eventgate migrate` leaves
it, and between the two the same table with one piece removed at a time. Each variant
runs `--statements` prepared 10-row INSERTs over 1,000 jobs from one psql session,
each its own transaction, with `synchronous_commit = off` so that the fsync wait does
not hide the CPU, and the figure is the backend's CPU per statement, read from
/proc/<pid>/stat before and after: a figure the machine's load moves far less than a
rate. Variants take turns in a rotating order; medians over the repetitions
(lowest-highest). A throwaway cluster (fsync on) is started and removed here.
`--adopted`: the original system's database (the layout of tests/adopt.rs, with its two
further indexes on agent_job_events) adopted by `eventgate migrate`, as a drop-in runs.
Output, never an assertion: the figures belong in docs/performance.md.
"""

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = "1234567890123456"
PAYLOAD = '{"kind": "log", "stream": "stdout"}'

JOBS = """
INSERT INTO agent_jobs (id, name, status)
     SELECT gen_random_uuid(), 'bench', 'running' FROM generate_series(1, 1000);
"""
# The original's agent_jobs has no `name`, and `type` and `payload` have no default.
ADOPTED_JOBS = """
INSERT INTO agent_jobs (id, type, payload, status)
     SELECT gen_random_uuid(), 'bench', '{}', 'running' FROM generate_series(1, 1000);
"""

SETUP = """
-- Issue 15's reference, as benches/notify.rs's REFERENCE_SCHEMA (keep the two alike):
-- counters in a narrow table of their own, one key.
CREATE TABLE ref_jobs (id uuid PRIMARY KEY, last_seq bigint NOT NULL DEFAULT 0,
                       last_line bigint NOT NULL DEFAULT 0);
INSERT INTO ref_jobs (id) SELECT id FROM agent_jobs;
CREATE TABLE ref_events (id uuid NOT NULL, job_id uuid NOT NULL, seq bigint NOT NULL,
    line bigint NOT NULL, level text NOT NULL, message text NOT NULL,
    payload jsonb NOT NULL, created_at timestamptz NOT NULL, PRIMARY KEY (job_id, seq));
-- Copies of agent_job_events (its columns, checks, uuid primary key and (job_id, seq)
-- key), with or without the foreign key and eventgate's triggers.
CREATE TABLE bare_nofk (LIKE agent_job_events INCLUDING ALL);
CREATE TABLE bare_fk (LIKE agent_job_events INCLUDING ALL);
ALTER TABLE bare_fk ADD FOREIGN KEY (job_id) REFERENCES agent_jobs (id) ON DELETE CASCADE;
CREATE TABLE triggers_nofk (LIKE agent_job_events INCLUDING ALL);
CREATE TRIGGER agent_job_events_assign_seq BEFORE INSERT ON triggers_nofk
    FOR EACH ROW EXECUTE FUNCTION agent_job_events_assign_seq();
CREATE TRIGGER agent_job_events_statement_end AFTER INSERT ON triggers_nofk
    FOR EACH STATEMENT EXECUTE FUNCTION agent_job_events_statement_end();
"""


def counter_cte(table, counters, ids):
    """One statement of $2 rows (a literal, put in by `measure`, so that the plan is the
    one a client's statement gets) the reference's way: one counter UPDATE, then the rows."""
    return f"""WITH c AS (UPDATE {counters} SET last_seq = last_seq + $2, last_line = last_line + $2
                WHERE id = $1 RETURNING last_seq - $2 AS seq0, last_line - $2 AS line0)
    INSERT INTO {table} (id, job_id, seq, line, level, message, payload, created_at)
    SELECT {ids}, $1, c.seq0 + g, c.line0 + g, 'info', '{MESSAGE}', '{PAYLOAD}', clock_timestamp()
      FROM c, generate_series(1, $2) g"""


def plain_insert(table):
    """One statement of $2 rows the way any client writes: no seq, no line, no id."""
    return f"""INSERT INTO {table} (job_id, level, message, payload)
    SELECT $1, 'info', '{MESSAGE}', '{PAYLOAD}' FROM generate_series(1, $2)"""


UUID7 = "eventgate_uuid7(clock_timestamp(), c.seq0 + g)"
RANDOM = "gen_random_uuid()"
OFF = "SET eventgate.notify = 'off'"

# (name, what it is, session setting, statement), from the reference to the real table.
VARIANTS = [
    ("reference", "issue 15's reference table", "", counter_cte("ref_events", "ref_jobs", RANDOM)),
    ("shape", "our table, no trigger, no FK, counters in a narrow table, time-ordered ids",
     "", counter_cte("bare_nofk", "ref_jobs", UUID7)),
    ("shape, random ids", "the same with uuid v4 ids (as the original's worker sends)",
     "", counter_cte("bare_nofk", "ref_jobs", RANDOM)),
    ("+ FK", "our table with the FK, no trigger, counters in agent_jobs, time-ordered ids",
     "", counter_cte("bare_fk", "agent_jobs", UUID7)),
    ("triggers, no FK", "eventgate's triggers (NOTIFY off), no FK", OFF, plain_insert("triggers_nofk")),
    ("ours, NOTIFY off", "agent_job_events as migrated, `eventgate.notify = off`", OFF,
     plain_insert("agent_job_events")),
    ("ours", "agent_job_events as migrated, default (adaptive NOTIFY)", "", plain_insert("agent_job_events")),
]


def original_layout():
    """The original system's two tables, as tests/adopt.rs creates them."""
    text = open(os.path.join(ROOT, "tests/adopt.rs")).read()
    start = text.index('const ORIGINAL_LAYOUT: &str = r#"') + len('const ORIGINAL_LAYOUT: &str = r#"')
    return text[start:text.index('"#;', start)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A throwaway PostgreSQL 15 cluster, fsync on; as root it runs as `postgres`."""

    def __init__(self):
        versions = sorted(
            (v for v in os.listdir("/usr/lib/postgresql") if os.path.exists(f"/usr/lib/postgresql/{v}/bin/initdb")),
            key=int,
        )
        self.bin = f"/usr/lib/postgresql/{versions[-1]}/bin"
        self.dir = tempfile.mkdtemp(prefix="eventgate-write-cost-")
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.run("pg_ctl", "start", "-w", "-t", "60", "-D", self.data, "-l", os.path.join(self.dir, "log"),
                 "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c shared_buffers=256MB")
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, program, *args):
        argv = [os.path.join(self.bin, program), *args]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=self.dir)

    def stop(self):
        try:
            self.run("pg_ctl", "stop", "-m", "immediate", "-w", "-D", self.data)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def backend_cpu(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url, jobs, setting, statement, count, rows):
    """Backend CPU per statement, in microseconds, over `count` statements."""
    psql = subprocess.Popen(["psql", "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1", "-d", url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    prelude = "SET synchronous_commit = off;\n" + (setting + ";\n" if setting else "")
    statement = statement.replace("$2", str(rows))
    psql.stdin.write(prelude + f"PREPARE s(uuid) AS {statement};\nSELECT pg_backend_pid();\n")
    psql.stdin.flush()
    pid = int(psql.stdout.readline())
    pick = random.Random(1)

    def batch(n, mark):
        for _ in range(n):
            psql.stdin.write(f"EXECUTE s('{pick.choice(jobs)}');\n")
        psql.stdin.write(f"SELECT '{mark}';\n")
        psql.stdin.flush()
        while True:
            line = psql.stdout.readline()
            if not line:
                sys.exit(f"psql ended early: {statement[:80]}...")
            if line.strip() == mark:
                return

    batch(200, "warm")  # plans cached, PL/pgSQL compiled
    before = backend_cpu(pid)
    batch(count, "done")
    spent = backend_cpu(pid) - before
    psql.stdin.close()
    psql.wait()
    return spent / count * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--statements", type=int, default=15000)
    parser.add_argument("--rows", type=int, default=10, help="rows per statement")
    parser.add_argument("--eventgate", default=os.path.join(ROOT, "target/release/eventgate"))
    parser.add_argument("--adopted", action="store_true", help="the original's database, adopted")
    args = parser.parse_args()
    cluster = Cluster()
    try:
        def sql(text):
            subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", cluster.url, "-c", text], check=True)

        if args.adopted:
            sql(original_layout())
        env = {**os.environ, "DATABASE_URL": cluster.url}
        subprocess.run([args.eventgate, "migrate"], check=True, env=env, stdout=subprocess.DEVNULL)
        sql((ADOPTED_JOBS if args.adopted else JOBS) + SETUP)
        jobs = subprocess.run(["psql", "-X", "-tA", "-d", cluster.url, "-c", "SELECT id FROM agent_jobs ORDER BY id"],
                              check=True, capture_output=True, text=True).stdout.split()
        load = os.getloadavg()[0]
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results = {name: [] for name, *_ in VARIANTS}
        for rep in range(args.reps):
            order = VARIANTS[rep % len(VARIANTS):] + VARIANTS[:rep % len(VARIANTS)]
            for name, _, setting, statement in order:
                us = measure(cluster.url, jobs, setting, statement, args.statements, args.rows)
                results[name].append(us)
                print(f"rep {rep + 1}/{args.reps} {name}: {us:.0f} us", file=sys.stderr, flush=True)
        reference = statistics.median(results["reference"])
        layout = "the original's database, adopted" if args.adopted else "a fresh database"
        print(f"\n{started}, {layout}, {args.statements} statements of {args.rows} rows x {args.reps} reps per variant, "
              f"1-minute load {load:.2f} before, {os.getloadavg()[0]:.2f} after\n")
        print(f"| variant | what | backend CPU per {args.rows}-row statement | reference / variant |")
        print("|---|---|---:|---:|")
        for name, what, _, _ in VARIANTS:
            v = results[name]
            median = statistics.median(v)
            print(f"| {name} | {what} | {median:.0f} µs ({min(v):.0f}-{max(v):.0f}) | {reference / median:.2f}x |")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
