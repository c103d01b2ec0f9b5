// Browser tests of the dashboard: `cd tests/web && npm ci && node run.mjs`.
// Expects a built gateway at $EVENTGATE_BIN (default target/debug/eventgate from the
// repository root) and Debian's /usr/bin/chromium. Starts its own PostgreSQL.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  Gateway, Jobs, OUTPUT, Postgres, atBottom, bin, launchBrowser, migrate, outputLines, settle,
  sleep, waitForLine, waitForState, waitUntil,
} from './harness.mjs';

const SCREENSHOTS = path.join(path.dirname(new URL(import.meta.url).pathname), 'screenshots');

let pg;
let gw;
let browser;
let jobs;

/** Asserts `lines` hold exactly `expected`, each once and in order. */
function assertExactly(lines, expected) {
  const seen = lines.filter((l) => expected.includes(l));
  assert.deepEqual(seen, expected, 'every line once, in order');
}

async function openJob(id, options = {}) {
  const page = await browser.context.newPage();
  if (options.before) await options.before(page);
  await page.goto(`${gw.base}/jobs/${id}`);
  return page;
}

describe('eventgate dashboard', { concurrency: 1 }, () => {
  before(async () => {
    assert.ok(fs.existsSync(bin), `no gateway binary at ${bin}: run cargo build first`);
    pg = new Postgres();
    await pg.start();
    migrate(pg.url);
    gw = new Gateway(pg.url);
    await gw.start();
    jobs = new Jobs(pg);
    browser = await launchBrowser();
  });

  after(async () => {
    if (browser) await browser.close();
    if (gw) await gw.stop();
    if (pg) pg.stop();
  });

  test('lines appear live as rows are inserted', async () => {
    const id = jobs.create('live lines');
    jobs.append(id, ['before the page 1', 'before the page 2']);
    const page = await openJob(id);
    await waitForState(page, 'live');
    await waitForLine(page, 'before the page 2');
    for (let batch = 0; batch < 3; batch++) {
      jobs.append(id, [`live ${batch}.a`, `live ${batch}.b`]);
      await waitForLine(page, `live ${batch}.b`);
    }
    // A coalesced event: several lines in one message.
    jobs.append(id, ['coalesced 1\ncoalesced 2\ncoalesced 3']);
    await waitForLine(page, 'coalesced 3');
    assertExactly(await outputLines(page), [
      'before the page 1', 'before the page 2', 'live 0.a', 'live 0.b', 'live 1.a', 'live 1.b',
      'live 2.a', 'live 2.b', 'coalesced 1', 'coalesced 2', 'coalesced 3',
    ]);
    assert.equal(await page.getByTestId('job-status').textContent(), 'running');
    await page.close();
  });

  test('the job list shows jobs and their status live over one stream', async () => {
    const page = await browser.context.newPage();
    const streams = [];
    page.on('request', (r) => {
      if (r.url().includes('/api/queue/jobs/stream')) streams.push(r.url());
    });
    await page.goto(gw.base + '/');
    await waitForState(page, 'live');
    const id = jobs.create('listed job', 'queued');
    const row = page.locator(`[data-testid="job-row"][data-id="${id}"]`);
    await row.waitFor({ timeout: 30_000 });
    jobs.setStatus(id, 'running');
    await waitUntil(async () => (await row.getByTestId('job-row-status').textContent()) === 'running', 'running');
    jobs.setStatus(id, 'succeeded');
    await waitUntil(async () => (await row.getByTestId('job-row-status').textContent()) === 'succeeded', 'succeeded');
    await row.getByRole('link').click();
    await page.waitForURL(`**/jobs/${id}`);
    await waitForState(page, 'ended');
    assert.equal(streams.length, 1, 'one status stream for the whole list');
    await page.close();
  });
});
