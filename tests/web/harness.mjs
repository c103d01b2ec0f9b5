// Test set-up for the dashboard: a throwaway PostgreSQL, the real gateway
// (`eventgate migrate` + `eventgate serve`), Debian's Chromium through playwright-core,
// and helpers that write rows with plain SQL the way any worker would.

import { spawn, spawnSync, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '../..');
export const bin = path.resolve(repoRoot, process.env.EVENTGATE_BIN || 'target/debug/eventgate');
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Waits for `check()` to return a truthy value, at most `timeout` ms (bounded). */
export async function waitUntil(check, what, timeout = 30_000) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await sleep(100);
  }
  throw new Error(`timed out waiting for ${what} (last: ${last})`);
}

function pgBinDir() {
  const base = '/usr/lib/postgresql';
  const versions = fs
    .readdirSync(base)
    .filter((v) => fs.existsSync(path.join(base, v, 'bin', 'initdb')))
    .sort((a, b) => Number(b) - Number(a));
  if (!versions.length) throw new Error('no PostgreSQL server binaries under /usr/lib/postgresql');
  return path.join(base, versions[0], 'bin');
}

/** A throwaway cluster; initdb refuses root, so as root it all runs as `postgres`. */
export class Postgres {
  async start() {
    this.bin = pgBinDir();
    this.asPostgres = process.getuid && process.getuid() === 0;
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'eventgate-webtest-pg-'));
    if (this.asPostgres) {
      const uid = Number(execFileSync('id', ['-u', 'postgres']).toString().trim());
      const gid = Number(execFileSync('id', ['-g', 'postgres']).toString().trim());
      fs.chownSync(this.dir, uid, gid);
    }
    this.data = path.join(this.dir, 'data');
    this.port = await freePort();
    this.run('initdb', ['-D', this.data, '-U', 'postgres', '--auth=trust', '-E', 'UTF8', '--no-sync']);
    this.run('pg_ctl', [
      'start', '-w', '-t', '60', '-D', this.data, '-l', path.join(this.dir, 'server.log'),
      '-o', `-p ${this.port} -k ${this.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off`,
    ]);
    this.url = `postgres://postgres@127.0.0.1:${this.port}/postgres`;
  }

  run(program, args) {
    const full = path.join(this.bin, program);
    const [cmd, argv] = this.asPostgres ? ['runuser', ['-u', 'postgres', '--', full, ...args]] : [full, args];
    const r = spawnSync(cmd, argv, { cwd: this.dir, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`${program} failed: ${r.stderr || r.stdout}`);
  }

  stop() {
    if (!this.dir) return;
    try {
      this.run('pg_ctl', ['stop', '-m', 'immediate', '-w', '-D', this.data]);
    } catch {
      // already stopped
    }
    fs.rmSync(this.dir, { recursive: true, force: true });
    this.dir = null;
  }

  /** Runs SQL with psql; returns its unaligned output. */
  sql(text) {
    const r = spawnSync('psql', ['-X', '-q', '-tA', '-v', 'ON_ERROR_STOP=1', '-d', this.url, '-c', text], {
      encoding: 'utf8',
    });
    if (r.status !== 0) throw new Error(`psql failed: ${r.stderr}\n${text.slice(0, 500)}`);
    return r.stdout.trim();
  }
}

export const lit = (s) => `'${String(s).replace(/'/g, "''")}'`;

/** The gateway under test (`eventgate serve`), restartable on the same port. */
export class Gateway {
  constructor(databaseUrl) {
    this.databaseUrl = databaseUrl;
    this.log = [];
  }

  async start(port) {
    this.port = port || this.port || (await freePort());
    this.base = `http://127.0.0.1:${this.port}`;
    const env = { ...process.env, DATABASE_URL: this.databaseUrl, EVENTGATE_RETRY_MS: '1000', RUST_LOG: 'warn' };
    this.child = spawn(bin, ['serve', '--listen', `127.0.0.1:${this.port}`], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    const keep = (chunk) => {
      this.log.push(chunk.toString());
      if (this.log.length > 200) this.log.shift();
    };
    this.child.stdout.on('data', keep);
    this.child.stderr.on('data', keep);
    const child = this.child;
    await waitUntil(async () => {
      if (child.exitCode !== null) throw new Error('gateway exited: ' + this.log.join(''));
      const res = await fetch(this.base + '/readyz').catch(() => null);
      return res && res.ok;
    }, 'the gateway to be ready');
  }

  /** Kills it abruptly (SIGKILL), as a crash or a redeploy would. */
  async kill() {
    const child = this.child;
    if (!child || child.exitCode !== null) return;
    const gone = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await gone;
  }

  async stop() {
    const child = this.child;
    if (!child || child.exitCode !== null) return;
    const gone = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
    await gone;
    clearTimeout(timer);
  }
}

export function migrate(databaseUrl) {
  const r = spawnSync(bin, ['migrate'], { env: { ...process.env, DATABASE_URL: databaseUrl }, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`eventgate migrate failed: ${r.stderr}`);
}

/** A throwaway PostgreSQL, migrated, and one gateway on it: what most test files start
 * with. `stop()` takes both down. */
export async function startStack() {
  if (!fs.existsSync(bin)) throw new Error(`no gateway binary at ${bin}: run cargo build first`);
  const pg = new Postgres();
  await pg.start();
  migrate(pg.url);
  const gw = new Gateway(pg.url);
  await gw.start();
  return {
    pg,
    gw,
    jobs: new Jobs(pg),
    async stop() {
      await gw.stop();
      pg.stop();
    },
  };
}

/** Debian's Chromium, headless, with a fresh profile directory; never downloaded. */
export async function launchBrowser() {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: apt-get install -y chromium (never download a browser)`);
  }
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'eventgate-webtest-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-quic',
    ],
    viewport: { width: 1280, height: 800 },
  });
  return {
    context,
    async close() {
      await context.close().catch(() => {});
      fs.rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** Writes rows the way any worker does: plain SQL, one statement per batch. */
export class Jobs {
  constructor(pg) {
    this.pg = pg;
  }

  create(name, status = 'running') {
    return this.pg.sql(`INSERT INTO agent_jobs (name, status) VALUES (${lit(name)}, ${lit(status)}) RETURNING id`);
  }

  /** `lines`: strings or `{message, level, stream, stage, kind}`; one INSERT for all. */
  append(jobId, lines) {
    const values = lines.map((line) => {
      const l = typeof line === 'string' ? { message: line } : line;
      const payload = { kind: l.kind || 'log', stream: l.stream || 'stdout' };
      if (l.stage) payload.stage = l.stage;
      return `(${lit(jobId)}, ${lit(l.level || 'info')}, ${lit(l.message)}, ${lit(JSON.stringify(payload))}::jsonb)`;
    });
    this.pg.sql(`INSERT INTO agent_job_events (job_id, level, message, payload) VALUES ${values.join(', ')}`);
  }

  setStatus(jobId, status) {
    this.pg.sql(`UPDATE agent_jobs SET status = ${lit(status)} WHERE id = ${lit(jobId)}`);
  }
}

// ---- page helpers -------------------------------------------------------------------

export const OUTPUT = '[data-testid="live-output"]';

/** The lines of the Live Output panel, read from its text. */
export async function outputLines(page) {
  const text = await page.locator(OUTPUT).textContent();
  const lines = text.split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  return lines;
}

export async function waitForLine(page, text, timeout = 30_000) {
  await page.waitForFunction(
    ([sel, t]) => document.querySelector(sel).textContent.split('\n').includes(t),
    [OUTPUT, text],
    { timeout, polling: 100 },
  );
}

export async function waitForState(page, state, timeout = 30_000) {
  await page.waitForFunction(
    (s) => document.querySelector('[data-testid="connection-state"]').dataset.state === s,
    state,
    { timeout, polling: 100 },
  );
}

/** Whether the output viewport is scrolled to its bottom. */
export function atBottom(page) {
  return page.evaluate(() => {
    const vp = document.querySelector('[data-testid="output-viewport"]');
    return vp.scrollHeight - vp.scrollTop - vp.clientHeight <= 3;
  });
}

/** Two animation frames: whatever was received has been rendered. */
export function settle(page) {
  return page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
}
