// Browser tests of the dashboard: `cd tests/web && npm ci && node run.mjs`.
// Expects a built gateway at $EVENTGATE_BIN (default target/debug/eventgate from the
// repository root) and Debian's /usr/bin/chromium. Starts its own PostgreSQL.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  OUTPUT, atBottom, launchBrowser, outputLines, settle, startStack,
  sleep, waitForLine, waitForState, waitUntil,
} from './harness.mjs';

/** The docs' screenshots (docs/viewer.md), made by the last test. */
const IMAGES = path.join(path.dirname(new URL(import.meta.url).pathname), '../../docs/img');

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
  let stack;
  before(async () => {
    stack = await startStack();
    ({ pg, gw, jobs } = stack);
    browser = await launchBrowser();
  });

  after(async () => {
    if (browser) await browser.close();
    if (stack) await stack.stop();
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
  test('follow pauses on scroll-up and resumes', async () => {
    const id = jobs.create('follow');
    jobs.append(id, Array.from({ length: 300 }, (_, i) => `follow line ${i + 1}`));
    const page = await openJob(id);
    await waitForState(page, 'live');
    await waitForLine(page, 'follow line 300');
    await waitUntil(() => atBottom(page), 'the view at the bottom');
    const follow = page.getByTestId('follow-toggle');
    const jump = page.getByTestId('jump-latest');
    assert.equal(await follow.getAttribute('aria-pressed'), 'true');
    assert.equal(await jump.isVisible(), false);

    // Scrolling up pauses follow and offers "jump to latest".
    await page.getByTestId('output-viewport').hover();
    await page.mouse.wheel(0, -1500);
    await jump.waitFor({ state: 'visible', timeout: 10_000 });
    assert.equal(await follow.getAttribute('aria-pressed'), 'false');
    // Let any smooth-scroll animation finish before taking the position.
    const scrollTop = () => page.getByTestId('output-viewport').evaluate((el) => el.scrollTop);
    let top = await scrollTop();
    await waitUntil(async () => {
      await settle(page);
      const now = await scrollTop();
      const still = now === top;
      top = now;
      return still;
    }, 'the scroll position to settle');
    jobs.append(id, ['while scrolled up']);
    await waitForLine(page, 'while scrolled up');
    await settle(page);
    assert.equal(await atBottom(page), false, 'a paused view does not move');
    assert.equal(await scrollTop(), top);

    // Jump to latest resumes following.
    await jump.click();
    await waitUntil(() => atBottom(page), 'the view at the bottom');
    assert.equal(await follow.getAttribute('aria-pressed'), 'true');
    jobs.append(id, ['after jumping']);
    await waitForLine(page, 'after jumping');
    await waitUntil(() => atBottom(page), 'the view to follow the new line');

    // The pause/resume toggle (keyboard too).
    await follow.focus();
    await page.keyboard.press('Enter');
    assert.equal(await follow.getAttribute('aria-pressed'), 'false');
    jobs.append(id, Array.from({ length: 40 }, (_, i) => `paused ${i}`));
    await waitForLine(page, 'paused 39');
    await settle(page);
    assert.equal(await atBottom(page), false, 'paused: new lines do not scroll the view');
    await page.keyboard.press('Enter');
    assert.equal(await follow.getAttribute('aria-pressed'), 'true');
    await waitUntil(() => atBottom(page), 'resumed: the view at the bottom');
    await page.close();
  });

  test('filters: stages, logs, warnings/errors, streams, search, timestamps, wrap', async () => {
    const id = jobs.create('filters', 'queued');
    jobs.setStatus(id, 'running');
    jobs.append(id, [
      { message: '==> build', stage: 'build' },
      { message: 'compiling foo', stage: 'build' },
      { message: 'warning: unused needle', stage: 'build', level: 'warn', stream: 'stderr' },
      { message: '==> test', stage: 'test' },
      { message: 'test a ... ok', stage: 'test' },
      { message: 'error: test b failed', stage: 'test', level: 'error', stream: 'stderr' },
      { message: 'stderr note with NEEDLE', stage: 'test', stream: 'stderr' },
    ]);
    const page = await openJob(id);
    await waitForState(page, 'live');
    await waitForLine(page, 'stderr note with NEEDLE');
    const all = ['status: running', '==> build', 'compiling foo', 'warning: unused needle', '==> test',
      'test a ... ok', 'error: test b failed', 'stderr note with NEEDLE'];
    assert.deepEqual(await outputLines(page), all);

    const show = async (testid, expected) => {
      await page.getByTestId(testid).click();
      await waitUntil(async () => JSON.stringify(await outputLines(page)) === JSON.stringify(expected),
        `${testid} to show ${JSON.stringify(expected)} (has ${JSON.stringify(await outputLines(page))})`, 10_000);
      assert.equal(await page.getByTestId(testid).getAttribute('aria-pressed'), 'true');
    };
    await show('filter-stages', ['status: running', '==> build', '==> test']);
    await show('filter-logs', all.slice(1));
    await show('filter-problems', ['warning: unused needle', 'error: test b failed']);
    await show('filter-all', all);

    // A live line that does not match the filter stays hidden; one that does appears.
    await page.getByTestId('filter-problems').click();
    jobs.append(id, [{ message: 'live info', stage: 'test' }, { message: 'live warning', stage: 'test', level: 'warn' }]);
    await waitForLine(page, 'live warning');
    assert.ok(!(await outputLines(page)).includes('live info'));
    await page.getByTestId('filter-all').click();
    await waitForLine(page, 'live info');
    const everything = [...all, 'live info', 'live warning'];

    await page.getByTestId('stream-stdout').uncheck();
    await waitUntil(async () => JSON.stringify(await outputLines(page)) === JSON.stringify(
      ['status: running', 'warning: unused needle', 'error: test b failed', 'stderr note with NEEDLE']), 'stderr only');
    await page.getByTestId('stream-stdout').check();
    await page.getByTestId('stream-stderr').uncheck();
    await waitUntil(async () => !(await outputLines(page)).some((l) => l.includes('error:') || l.includes('NEEDLE')), 'stdout only');
    assert.ok((await outputLines(page)).includes('compiling foo'));
    await page.getByTestId('stream-stderr').check();
    await waitUntil(async () => (await outputLines(page)).length === everything.length, 'both streams');

    // Search filters to matching lines (case-insensitive) and highlights the matches.
    await page.getByTestId('search').fill('needle');
    await waitUntil(async () => JSON.stringify(await outputLines(page)) === JSON.stringify(
      ['warning: unused needle', 'stderr note with NEEDLE']), 'search results');
    const marks = await page.locator(`${OUTPUT} mark`).allTextContents();
    assert.deepEqual(marks, ['needle', 'NEEDLE']);
    assert.match(await page.getByTestId('search-count').textContent(), /2 matching lines/);
    await page.getByTestId('search').press('Escape');
    await waitUntil(async () => (await outputLines(page)).length === everything.length, 'search cleared');

    // Timestamps: shown beside each line (not part of the log text).
    const before = await page.locator(`${OUTPUT} .row`).first().evaluate((el) => getComputedStyle(el, '::before').content);
    assert.equal(before, 'none');
    await page.getByTestId('toggle-timestamps').check();
    const stamp = await page.locator(`${OUTPUT} .row`).first().evaluate((el) => getComputedStyle(el, '::before').content);
    assert.match(stamp, /\d\d:\d\d:\d\d\.\d{3}/);
    assert.deepEqual(await outputLines(page), everything, 'timestamps are not in the log text');

    // Wrap.
    const whiteSpace = () => page.locator(OUTPUT).evaluate((el) => getComputedStyle(el).whiteSpace);
    assert.equal(await whiteSpace(), 'pre');
    await page.getByTestId('toggle-wrap').check();
    assert.equal(await whiteSpace(), 'pre-wrap');
    await page.close();
  });

  test('copy puts the visible output on the clipboard, with a fallback', async () => {
    const id = jobs.create('copy');
    jobs.append(id, ['copy one', { message: 'copy \x1b[31mtwo\x1b[0m', level: 'warn', stream: 'stderr' }, 'copy three']);
    const origin = gw.base;
    await browser.context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin });
    const page = await openJob(id);
    await waitForLine(page, 'copy three');
    await page.getByTestId('filter-problems').click();
    await waitUntil(async () => (await outputLines(page)).length === 1, 'the filter');
    await page.getByTestId('copy').click();
    await waitUntil(async () => /Copied 1 line/.test(await page.getByTestId('copy-status').textContent()), 'the copy confirmation');
    assert.equal(await page.evaluate(() => navigator.clipboard.readText()), 'copy two');

    // Without the async clipboard API: the textarea + execCommand fallback.
    await page.getByTestId('filter-all').click();
    await page.evaluate(() => {
      Object.defineProperty(navigator, 'clipboard', { value: undefined, configurable: true });
      window.__copied = null;
      document.addEventListener('copy', () => {
        window.__copied = document.activeElement && document.activeElement.value;
      });
    });
    await page.getByTestId('copy').click();
    await waitUntil(async () => /Copied 3 lines/.test(await page.getByTestId('copy-status').textContent()), 'the fallback confirmation');
    assert.equal(await page.evaluate(() => window.__copied), 'copy one\ncopy two\ncopy three');
    assert.equal(await page.getByTestId('copy-fallback').count(), 0, 'the textarea is removed');
    await page.close();
  });

  test('download is the raw log route: the whole log as text', async () => {
    const id = jobs.create('download', 'queued');
    // 2,500 events (three pages), the first one with colour, the last with two lines.
    pg.sql(`INSERT INTO agent_job_events (job_id, level, message, payload)
      SELECT '${id}', 'info', E'\\x1b[32mdl\\x1b[0m line ' || i, '{"kind":"log","stream":"stdout"}'::jsonb
      FROM generate_series(1, 2499) i`);
    jobs.append(id, ['dl line 2500\ndl line 2501']);
    const page = await openJob(id);
    await waitForLine(page, 'dl line 2501');
    const [download] = await Promise.all([page.waitForEvent('download', { timeout: 60_000 }), page.getByTestId('download').click()]);
    assert.equal(download.suggestedFilename(), `job-${id}.log`);
    const file = await download.path();
    const lines = fs.readFileSync(file, 'utf8').split('\n');
    assert.equal(lines.pop(), '');
    assert.deepEqual(lines, Array.from({ length: 2501 }, (_, i) => `dl line ${i + 1}`));
    await page.close();
  });

  test('a permalinked line in a huge log opens highlighted, fetching a sliver of it', async () => {
    const total = Number(process.env.HUGE_LINES || 1_000_000);
    const target = total - 12_346; // #L987654 in a log of a million lines
    // The log's only error, in a folded group, far before the tail's page.
    const failing = 4321;
    const id = jobs.create('a million lines', 'queued');
    const t0 = Date.now();
    pg.sql(`INSERT INTO agent_job_events (job_id, level, message, payload)
      SELECT '${id}', CASE WHEN i = ${failing} THEN 'error' ELSE 'info' END,
             CASE WHEN i = ${failing - 1} THEN '::group::Failing step' WHEN i = ${failing + 1} THEN '::endgroup::'
                  ELSE 'million line ' || i || ' of ${total}' END,
             '{"kind":"log","stream":"stdout"}'::jsonb
      FROM generate_series(1, ${total}) i`);
    console.log(`# inserted ${total} one-line events in ${Date.now() - t0} ms`);
    jobs.setStatus(id, 'succeeded');
    const page = await browser.context.newPage();
    const fetched = [];
    page.on('response', async (res) => {
      if (!res.url().includes('/events')) return;
      try {
        const body = await res.json();
        fetched.push(body.items.length);
      } catch {
        // not a page (a stream)
      }
    });
    await page.goto(`${gw.base}/jobs/${id}#L${target}`);
    const row = page.locator(`${OUTPUT} [data-line="${target}"]`);
    await row.waitFor({ timeout: 60_000 });
    await settle(page);
    assert.equal(await row.textContent(), `million line ${target} of ${total}\n`);
    assert.match(await row.getAttribute('class'), /\bhl\b/, 'highlighted');
    assert.equal(await page.locator(`${OUTPUT} .hl`).count(), 1);
    const box = await row.boundingBox();
    const vpBox = await page.getByTestId('output-viewport').boundingBox();
    assert.ok(box.y >= vpBox.y && box.y + box.height <= vpBox.y + vpBox.height, 'the line is in view');
    await sleep(500);
    const events = fetched.reduce((a, b) => a + b, 0);
    assert.ok(events < total / 100, `fetched ${events} of ${total} events (< 1 %)`);
    const heap = await page.evaluate(() => performance.memory && performance.memory.usedJSHeapSize);
    console.log(`# opened #L${target} of ${total}: ${fetched.length} page requests, ${events} events, JS heap ${(heap / 1048576).toFixed(1)} MiB`);

    // A click on a line number sets the address; a shift-click makes a range.
    const other = page.locator(`${OUTPUT} [data-line="${target + 3}"] .ln`);
    await other.click();
    assert.equal(new URL(page.url()).hash, `#L${target + 3}`);
    assert.equal(await page.locator(`${OUTPUT} .hl`).count(), 1);
    await page.locator(`${OUTPUT} [data-line="${target + 6}"] .ln`).click({ modifiers: ['Shift'] });
    assert.equal(new URL(page.url()).hash, `#L${target + 3}-L${target + 6}`);
    assert.equal(await page.locator(`${OUTPUT} .hl`).count(), 4);
    // The numbers are not part of the log's text.
    assert.ok(!(await page.locator(OUTPUT).textContent()).includes(`${target + 3}million`));

    // A range permalink opens with every line of it highlighted.
    const ranged = await browser.context.newPage();
    await ranged.goto(`${gw.base}/jobs/${id}#L${target}-L${target + 2}`);
    await ranged.locator(`${OUTPUT} [data-line="${target + 2}"]`).waitFor({ timeout: 60_000 });
    await settle(ranged);
    assert.equal(await ranged.locator(`${OUTPUT} .hl`).count(), 3);
    await ranged.close();
    await page.close();

    // Scrolling a long way up keeps a bounded window of the log in memory.
    const far = await browser.context.newPage();
    const middle = Math.floor(total / 2);
    await far.goto(`${gw.base}/jobs/${id}#L${middle}`);
    await far.locator(`${OUTPUT} [data-line="${middle}"]`).waitFor({ timeout: 60_000 });
    const firstShown = () => far.locator(`${OUTPUT} .row`).first().getAttribute('data-line').then(Number);
    const loaded = () => far.getByTestId('output-viewport').getAttribute('data-loaded-lines').then(Number);
    const goal = middle - 70_000;
    for (let i = 0; i < 400 && (await firstShown()) > goal; i++) {
      await far.getByTestId('output-viewport').evaluate((el) => { el.scrollTop = 0; });
      await settle(far);
      await sleep(20);
    }
    assert.ok((await firstShown()) <= goal, `scrolled up to line ${await firstShown()}`);
    const held = await loaded();
    assert.ok(held <= 50_000, `at most 50,000 lines held after scrolling 70,000 up (${held})`);
    const farHeap = await far.evaluate(() => performance.memory && performance.memory.usedJSHeapSize);
    console.log(`# scrolled from #L${middle} up to line ${await firstShown()}: ${held} lines held, JS heap ${(farHeap / 1048576).toFixed(1)} MiB`);
    await far.close();

    // "First error" from the tail: the error is 995,000 lines before the loaded page,
    // so the gateway finds it (events?level=error&limit=1) and the page opens there.
    const tail = await browser.context.newPage();
    const tailFetched = [];
    tail.on('response', async (res) => {
      if (!res.url().includes('/events')) return;
      try {
        tailFetched.push((await res.json()).items.length);
      } catch {
        // not a page
      }
    });
    await tail.goto(`${gw.base}/jobs/${id}`);
    await waitForState(tail, 'ended');
    await tail.locator(`${OUTPUT} [data-line="${total}"]`).waitFor();
    await tail.getByTestId('first-error').click();
    const error = tail.locator(`${OUTPUT} [data-line="${failing}"]`);
    await error.waitFor({ timeout: 60_000 });
    await settle(tail);
    assert.equal(new URL(tail.url()).hash, `#L${failing}`);
    assert.equal(await error.textContent(), `million line ${failing} of ${total}\n`);
    assert.match(await error.getAttribute('class'), /\blevel-error\b.*\bhl\b|\bhl\b.*\blevel-error\b/);
    const group = tail.locator(`${OUTPUT} [data-testid="section"]`, { hasText: 'Failing step' });
    assert.equal(await group.getAttribute('aria-expanded'), 'true', 'the group holding the error is open');
    const errorBox = await error.boundingBox();
    const tailBox = await tail.getByTestId('output-viewport').boundingBox();
    assert.ok(errorBox.y >= tailBox.y && errorBox.y + errorBox.height <= tailBox.y + tailBox.height, 'the error is in view');
    await sleep(500);
    const tailEvents = tailFetched.reduce((a, b) => a + b, 0);
    assert.ok(tailEvents < total / 100, `fetched ${tailEvents} of ${total} events (< 1 %)`);
    console.log(`# first error from the tail: line ${failing}, ${tailFetched.length} page requests, ${tailEvents} events`);
    await tail.close();

    // The whole log scrolled from its end to its start: the JS heap stays in a budget.
    // (About 8 minutes on a loaded 2-core VM; HEAP_WALK_LINES=N walks only N lines up.)
    const walkGoal = Math.max(1, total - Number(process.env.HEAP_WALK_LINES || total) + 1);
    const walk = await browser.context.newPage();
    await walk.goto(`${gw.base}/jobs/${id}`);
    await waitForState(walk, 'ended');
    await walk.locator(`${OUTPUT} [data-line="${total}"]`).waitFor();
    const cdp = await browser.context.newCDPSession(walk);
    const heapNow = async (gc) => {
      if (gc) await cdp.send('HeapProfiler.collectGarbage');
      return (await cdp.send('Runtime.getHeapUsage')).usedSize;
    };
    const atOpen = await heapNow(true);
    let peak = atOpen;
    let peakAfterGc = atOpen;
    let top = Infinity;
    let maxRows = 0;
    const walkStart = Date.now();
    for (let i = 0; i < 20_000 && top > walkGoal; i++) {
      [top, maxRows] = await walk.evaluate(async (most) => {
        const vp = document.querySelector('[data-testid="output-viewport"]');
        const out = document.querySelector('[data-testid="live-output"]');
        for (let k = 0; k < 20; k++) {
          vp.scrollTop = 0;
          await new Promise((r) => requestAnimationFrame(r));
          most = Math.max(most, out.children.length);
        }
        return [Number(out.firstChild.dataset.line), most];
      }, maxRows);
      peak = Math.max(peak, await heapNow(false));
      if (i % 25 === 0) peakAfterGc = Math.max(peakAfterGc, await heapNow(true));
    }
    const walkMs = Date.now() - walkStart;
    assert.ok(top <= walkGoal, `scrolled up to line ${top}`);
    if (walkGoal === 1) {
      assert.equal(await walk.locator(`${OUTPUT} .row`).first().textContent(), `million line 1 of ${total}\n`);
    }
    const atStart = await heapNow(true);
    peakAfterGc = Math.max(peakAfterGc, atStart);
    const walkHeld = await walk.getByTestId('output-viewport').getAttribute('data-loaded-lines').then(Number);
    const mib = (b) => (b / 1048576).toFixed(1);
    console.log(`# scrolled ${total - top + 1} lines from the end up to line ${top} in ${(walkMs / 1000).toFixed(0)} s: ` +
      `JS heap ${mib(atOpen)} MiB at the tail, at most ${mib(peakAfterGc)} MiB after GC (${mib(peak)} MiB before GC), ` +
      `${mib(atStart)} MiB at line ${top}; ${walkHeld} lines held, at most ${maxRows} rows in the DOM`);
    // A budget, not a timing: the model holds at most 50,000 lines and the DOM 3,000 rows.
    const HEAP_BUDGET = 64 * 1048576;
    assert.ok(peakAfterGc < HEAP_BUDGET, `JS heap after GC ${mib(peakAfterGc)} MiB < ${mib(HEAP_BUDGET)} MiB`);
    assert.ok(walkHeld <= 50_000 && maxRows <= 3000, `${walkHeld} lines, ${maxRows} rows`);
    await walk.close();
  });

  test('groups of both syntaxes fold, nested; a failed step opens itself; first error jumps there', async () => {
    const id = jobs.create('sections');
    const filler = Array.from({ length: 300 }, (_, i) => `filler ${i + 1}`);
    jobs.append(id, [
      'before groups',
      '::group::Install deps',
      'installing a',
      '::group::Nested step',
      'nested line',
      '::endgroup::',
      'installed',
      '::endgroup::',
      '\x1b[0Ksection_start:1700000000:build[collapsed=true]\r\x1b[0KBuild the thing',
      'compiling',
      'section_end:1700000012:build',
      '::group::Run tests',
      'test ok',
      { message: 'test failed: boom', level: 'error', stream: 'stderr' },
      '::endgroup::',
      ...filler,
      'after groups',
    ]);
    jobs.setStatus(id, 'failed');
    const page = await openJob(id);
    await waitForState(page, 'ended');
    await waitForLine(page, 'after groups');
    const sections = page.locator(`${OUTPUT} [data-testid="section"]`);
    const header = (title) => sections.filter({ hasText: title });
    const text = await page.locator(OUTPUT).textContent();
    assert.ok(!/::group::|::endgroup::|section_start|section_end/.test(text), 'markers are headers, not text');
    let lines = await outputLines(page);
    assert.ok(!lines.includes('installing a') && !lines.includes('compiling'), 'folded by default');
    assert.equal(await header('Install deps').getAttribute('aria-expanded'), 'false');
    assert.equal(await header('Build the thing').getAttribute('aria-expanded'), 'false');
    const meta = (title) => header(title).getByTestId('section-meta').getAttribute('data-meta');
    assert.match(await meta('Install deps'), /^3 lines(, |$)/);
    assert.equal(await meta('Build the thing'), '1 line, 12.0 s');
    assert.equal(await header('Build the thing').textContent(), 'Build the thing\n', 'a header reads as its title');
    // The failed step's section opened by itself.
    assert.equal(await header('Run tests').getAttribute('aria-expanded'), 'true');
    assert.ok(lines.includes('test failed: boom'));

    // Nested: opening the outer group shows the inner one, still folded.
    await header('Install deps').click();
    await waitForLine(page, 'installing a');
    assert.equal(await header('Install deps').getAttribute('aria-expanded'), 'true');
    assert.equal(await header('Nested step').getAttribute('aria-expanded'), 'false');
    assert.ok(!(await outputLines(page)).includes('nested line'));
    await header('Nested step').click();
    await waitForLine(page, 'nested line');
    lines = await outputLines(page);
    const nested = lines.indexOf('Nested step');
    assert.match(await meta('Nested step'), /^1 line(, |$)/);
    assert.ok(lines.indexOf('installing a') < nested && nested < lines.indexOf('nested line')
      && lines.indexOf('nested line') < lines.indexOf('installed'), `nested in order: ${lines.join(' | ')}`);
    await header('Build the thing').click();
    await waitForLine(page, 'compiling');
    await header('Install deps').click();
    await waitUntil(async () => !(await outputLines(page)).includes('nested line'), 'the outer group to fold');
    assert.ok(!(await outputLines(page)).includes('installing a'));

    // "First error" scrolls to the error and gives it an address.
    await page.getByTestId('output-viewport').evaluate((el) => { el.scrollTop = el.scrollHeight; });
    await settle(page);
    await page.getByTestId('first-error').click();
    const error = page.locator(`${OUTPUT} .row.level-error`, { hasText: 'test failed: boom' });
    await settle(page);
    const n = await error.getAttribute('data-line');
    assert.equal(new URL(page.url()).hash, `#L${n}`);
    assert.equal(n, '14', 'the line number of the error over the whole log');
    const box = await error.boundingBox();
    const vpBox = await page.getByTestId('output-viewport').boundingBox();
    assert.ok(box.y >= vpBox.y && box.y + box.height <= vpBox.y + vpBox.height, 'the error is in view');
    await page.close();
  });

  test('stages fold into headers; groups nest inside them; an error opens its group', async () => {
    const id = jobs.create('stages', 'queued');
    jobs.setStatus(id, 'running');
    const build = Array.from({ length: 5 }, (_, i) => ({ message: `build step ${i + 1}`, stage: 'build' }));
    jobs.append(id, [
      { message: '==> build', stage: 'build' },
      ...build,
      { message: '==> test', stage: 'test' },
      { message: '::group::Unit tests', stage: 'test' },
      { message: 'unit ok', stage: 'test' },
      { message: '::endgroup::', stage: 'test' },
      { message: '::group::Integration tests', stage: 'test' },
      { message: 'integration a ok', stage: 'test' },
      { message: 'integration b FAILED', stage: 'test', level: 'error', stream: 'stderr' },
      { message: '::endgroup::', stage: 'test' },
      { message: 'test summary: 1 failed', stage: 'test' },
    ]);
    jobs.setStatus(id, 'failed');
    const page = await openJob(id);
    await waitForState(page, 'ended');
    await waitForLine(page, 'status: failed');
    const sections = page.locator(`${OUTPUT} [data-testid="section"]`);
    const stage = (name) => page.locator(`${OUTPUT} [data-testid="section"].stage`, { hasText: `==> ${name}` });
    assert.equal(await page.locator(`${OUTPUT} [data-testid="section"].stage`).count(), 2, 'one header per stage');
    // A stage header is its first line, with the stage's name, count and duration beside it.
    assert.equal(await stage('build').textContent(), '==> build\n');
    assert.equal(await stage('build').locator('.stage-name').getAttribute('data-name'), 'build');
    assert.match(await stage('build').getByTestId('section-meta').getAttribute('data-meta'), /^6 lines, \d/);
    // 5 lines: its first, the groups' 3 lines and the summary (markers are not lines of it).
    assert.match(await stage('test').getByTestId('section-meta').getAttribute('data-meta'), /^5 lines, \d/);
    assert.equal(await stage('build').getAttribute('aria-expanded'), 'true', 'stages start open');
    assert.equal(await sections.filter({ hasText: 'Unit tests' }).getAttribute('aria-expanded'), 'false');
    assert.equal(await sections.filter({ hasText: 'Integration tests' }).getAttribute('aria-expanded'), 'true',
      'the group holding the error opened by itself');
    assert.deepEqual(await outputLines(page), [
      'status: running', '==> build', ...build.map((l) => l.message), '==> test', 'Unit tests', 'Integration tests',
      'integration a ok', 'integration b FAILED', 'test summary: 1 failed', 'status: failed',
    ]);
    // Lines in a group are indented under its header; a stage's own lines are not.
    const indent = (text) => page.locator(`${OUTPUT} .row`, { hasText: text }).first()
      .evaluate((row) => getComputedStyle(row).getPropertyValue('--indent').trim());
    assert.equal(await indent('integration a ok'), '1');
    assert.equal(await indent('build step 1'), '');

    // Folding a stage hides everything in it, groups included; the header stays in place.
    await stage('build').click();
    await waitUntil(async () => !(await outputLines(page)).includes('build step 1'), 'the build stage to fold');
    assert.equal(await stage('build').getAttribute('aria-expanded'), 'false');
    await stage('test').press('Enter');
    await waitUntil(async () => !(await outputLines(page)).includes('integration a ok'), 'the test stage to fold');
    assert.deepEqual(await outputLines(page), ['status: running', '==> build', '==> test', 'status: failed']);
    // "First error" opens the folded stage and its group again.
    await page.getByTestId('first-error').click();
    await waitForLine(page, 'integration b FAILED');
    assert.equal(await stage('test').getAttribute('aria-expanded'), 'true');
    const error = page.locator(`${OUTPUT} .row`, { hasText: 'integration b FAILED' });
    assert.match(await error.getAttribute('class'), /\bhl\b/);
    assert.equal(new URL(page.url()).hash, `#L${await error.getAttribute('data-line')}`);
    await page.close();
  });

  /** An asynchronous failover as the gateway sees it, while a page shows `old 1..10`:
   * the gateway is down while events 6..10 are replaced by `fresh` new ones, then comes
   * back with no memory of the old history. The page must reload and show the new
   * history (old 1..5, new 1..fresh). */
  async function failoverUnderAPage(name, fresh) {
    const id = jobs.create(name);
    jobs.append(id, Array.from({ length: 10 }, (_, i) => `old ${i + 1}`));
    const page = await openJob(id);
    await waitForState(page, 'live');
    await waitForLine(page, 'old 10');
    await page.evaluate(() => { window.__beforeReset = true; });
    await gw.kill();
    pg.sql(`BEGIN;
      DELETE FROM agent_job_events WHERE job_id = '${id}' AND seq > 5;
      UPDATE agent_jobs SET last_seq = 5, last_line = 5 WHERE id = '${id}';
      INSERT INTO agent_job_events (job_id, level, message, payload)
        SELECT '${id}', 'info', 'new ' || i, '{"kind":"log","stream":"stdout"}' FROM generate_series(1, ${fresh}) i;
      COMMIT;`);
    await gw.start();
    await waitForLine(page, `new ${fresh}`, 60_000);
    assert.equal(await page.evaluate(() => window.__beforeReset), undefined, 'the page was reloaded');
    assert.deepEqual(await outputLines(page), [
      'old 1', 'old 2', 'old 3', 'old 4', 'old 5',
      ...Array.from({ length: fresh }, (_, i) => `new ${i + 1}`),
    ]);
    return { id, page };
  }

  test('a reset (history went back) reloads the view with the new history', async () => {
    // New events take seqs 6..8, so the page's cursor (10) is past the job's end.
    const { id, page } = await failoverUnderAPage('reset', 3);
    await waitForState(page, 'live', 60_000);
    jobs.append(id, ['after the reset']);
    await waitForLine(page, 'after the reset');
    assert.equal((await outputLines(page)).length, 9);
    await page.close();
  });

  test('a reset also when the new history is longer: the id names the event held', async () => {
    // New events take seqs 6..12: the page's cursor (10) is inside the new history, so
    // only the tag in its Last-Event-ID (`10-<tag>`) tells that the event it holds at
    // 10 is not the job's.
    const { page } = await failoverUnderAPage('reset-longer', 7);
    await page.close();
  });

  test('bidi controls are shown, not applied; a worker notice is a banner', async () => {
    const id = jobs.create('bidi');
    jobs.append(id, [
      'access \u202egnp.exe\u202c granted',
      { message: 'output past --max-log-bytes is not stored', level: 'warn', kind: 'notice' },
    ]);
    const page = await openJob(id);
    await waitForLine(page, 'access <U+202E>gnp.exe<U+202C> granted');
    assert.ok(!(await page.locator(OUTPUT).textContent()).includes('\u202e'), 'no raw control');
    const notice = page.getByTestId('notice');
    await notice.waitFor({ state: 'visible' });
    assert.equal(await notice.textContent(), 'output past --max-log-bytes is not stored');
    await page.close();
  });

  test('ANSI colours become spans; escapes, carriage returns and HTML are handled', async () => {
    const id = jobs.create('ansi');
    jobs.append(id, [
      '\x1b[31mred text\x1b[0m then plain',
      '\x1b[1;32mbold green\x1b[0m \x1b[38;5;208morange\x1b[0m \x1b[38;2;10;20;30mtruecolor\x1b[0m',
      'progress 10%\rprogress 50%\rprogress 100%',
      '\x1b]0;window title\x07cleared\x1b[K line\x1b[2J',
      '<b>not bold</b> & <script>window.__pwned = 1</script>',
      '\x1b[35mmagenta start\nmagenta continued\x1b[0m\nplain after',
    ]);
    const page = await openJob(id);
    await waitForLine(page, 'plain after');
    const text = await page.locator(OUTPUT).textContent();
    assert.ok(!text.includes('\x1b'), 'no raw escape');
    assert.ok(!text.includes('\r'), 'no carriage return');
    assert.ok(!/\[\d+(;\d+)*m/.test(text), 'no leftover SGR text');
    const lines = await outputLines(page);
    assert.deepEqual(lines, [
      'red text then plain',
      'bold green orange truecolor',
      'progress 100%',
      'cleared line',
      '<b>not bold</b> & <script>window.__pwned = 1</script>',
      'magenta start',
      'magenta continued',
      'plain after',
    ]);
    // A colour set on one line of a coalesced event carries to the next.
    assert.deepEqual(await page.locator(`${OUTPUT} span.fg-magenta`).allTextContents(), ['magenta start', 'magenta continued']);
    const red = page.locator(`${OUTPUT} span.fg-red`);
    assert.equal(await red.textContent(), 'red text');
    const colours = await page.locator(`${OUTPUT} .row`).first().evaluate((row) => [
      getComputedStyle(row.querySelector('span.fg-red')).color, getComputedStyle(row).color,
    ]);
    assert.notEqual(colours[0], colours[1], 'the red span has its own colour');
    assert.equal(await page.locator(`${OUTPUT} span.fg-green.ansi-bold`).textContent(), 'bold green');
    assert.equal(await page.locator(`${OUTPUT} span`, { hasText: 'orange' }).evaluate((el) => el.style.color), 'rgb(255, 135, 0)');
    assert.equal(await page.locator(`${OUTPUT} span`, { hasText: 'truecolor' }).evaluate((el) => el.style.color), 'rgb(10, 20, 30)');
    assert.equal(await page.locator(`${OUTPUT} b, ${OUTPUT} script`).count(), 0, 'log text is never HTML');
    assert.equal(await page.evaluate(() => window.__pwned), undefined);
    await page.close();
  });

  test('a gateway restart mid-stream leaves no gap and no duplicate', async () => {
    const id = jobs.create('restart');
    const expected = [];
    const write = (from, to) => {
      const batch = [];
      for (let i = from; i <= to; i++) batch.push(`restart line ${i}`);
      expected.push(...batch);
      jobs.append(id, batch);
    };
    write(1, 20);
    const page = await openJob(id);
    await waitForState(page, 'live');
    await waitForLine(page, 'restart line 20');

    await gw.kill();
    for (let b = 0; b < 4; b++) {
      write(21 + b * 10, 30 + b * 10); // written while the gateway is down
      await sleep(300);
    }
    await waitUntil(async () => (await page.getByTestId('connection-state').getAttribute('data-state')) !== 'live', 'the page to notice');
    await gw.start();
    write(61, 80);
    await waitForLine(page, 'restart line 80', 60_000);
    await waitForState(page, 'live', 60_000);
    write(81, 90);
    await waitForLine(page, 'restart line 90');
    const lines = await outputLines(page);
    assert.deepEqual(lines, expected, 'every line exactly once, in order');
    await page.close();
  });

  test('SSE blocked -> polling -> back to SSE', async () => {
    const id = jobs.create('blocked');
    jobs.append(id, ['blocked 1']);
    const block = (route) => route.abort('connectionrefused');
    const page = await openJob(id, { before: (p) => p.route('**/events/stream**', block) });
    await waitForLine(page, 'blocked 1');
    await waitForState(page, 'polling', 60_000);
    jobs.append(id, ['polled 2', 'polled 3']);
    await waitForLine(page, 'polled 3');
    await page.unroute('**/events/stream**', block);
    await waitForState(page, 'live', 60_000);
    jobs.append(id, ['streamed 4']);
    await waitForLine(page, 'streamed 4');
    assert.deepEqual(await outputLines(page), ['blocked 1', 'polled 2', 'polled 3', 'streamed 4']);
    await page.close();
  });

  test('a finished job shows its final status and makes no more requests', async () => {
    const countRequests = async (page) => {
      const seen = [];
      const listener = (r) => seen.push(r.url());
      page.on('request', listener);
      await sleep(4000);
      page.off('request', listener);
      return seen;
    };

    // Finished before the page opens: 300 lines and a coloured one (the acceptance case).
    const done = jobs.create('finished', 'queued');
    jobs.setStatus(done, 'running');
    jobs.append(done, Array.from({ length: 300 }, (_, i) => `done line ${i + 1}`));
    jobs.append(done, ['\x1b[1;31mcoloured\x1b[0m \x1b[32mline\x1b[0m']);
    jobs.setStatus(done, 'succeeded');
    let page = await openJob(done);
    await waitForState(page, 'ended');
    assert.equal(await page.getByTestId('job-status').textContent(), 'succeeded');
    let text = await page.locator(OUTPUT).textContent();
    for (let i = 1; i <= 300; i++) assert.ok(text.includes(`done line ${i}\n`), `line ${i}`);
    assert.ok(text.includes('coloured line'));
    assert.ok(!text.includes('\x1b'));
    assert.deepEqual(await countRequests(page), []);
    await page.close();

    // Finishing while watched: the stream's `end` stops everything.
    const live = jobs.create('finishing');
    jobs.append(live, ['working']);
    page = await openJob(live);
    await waitForState(page, 'live');
    jobs.append(live, ['last words']);
    jobs.setStatus(live, 'failed');
    await waitForState(page, 'ended');
    assert.equal(await page.getByTestId('job-status').textContent(), 'failed');
    await waitForLine(page, 'status: failed');
    assert.deepEqual((await outputLines(page)).slice(-3), ['working', 'last words', 'status: failed']);
    assert.deepEqual(await countRequests(page), []);
    await page.close();

    // Terminal without a status event (inserted finished): the stream answers 204.
    const inserted = jobs.create('inserted finished', 'cancelled');
    jobs.append(inserted, ['only line']);
    page = await openJob(inserted);
    await waitForState(page, 'ended');
    assert.equal(await page.getByTestId('job-status').textContent(), 'cancelled');
    assert.deepEqual(await outputLines(page), ['only line']);
    assert.deepEqual(await countRequests(page), []);
    await page.close();
  });

  test('a 200,000-line log keeps a bounded DOM and loads older lines on scroll up', async () => {
    const id = jobs.create('huge');
    // 200 events of 1,000 coalesced lines each.
    pg.sql(`INSERT INTO agent_job_events (job_id, level, message, payload)
      SELECT '${id}', 'info',
             (SELECT string_agg('huge line ' || (g * 1000 + i), E'\\n') FROM generate_series(1, 1000) i),
             '{"kind":"log","stream":"stdout"}'::jsonb
      FROM generate_series(0, 199) g`);
    jobs.append(id, ['the very end']);
    const page = await openJob(id);
    await waitForLine(page, 'the very end', 60_000);
    await waitForLine(page, 'huge line 200000');
    const rows = () => page.locator(`${OUTPUT} .row`).count();
    assert.ok((await rows()) <= 3000, `bounded DOM (${await rows()} rows)`);
    const firstLine = async () => (await outputLines(page))[0];
    const start = Number((await firstLine()).split(' ').pop());
    // Scroll up a few times: older lines come in, the DOM stays bounded.
    for (let i = 0; i < 8; i++) {
      await page.getByTestId('output-viewport').evaluate((el) => { el.scrollTop = 0; });
      await settle(page);
    }
    await waitUntil(async () => Number((await firstLine()).split(' ').pop()) < start - 2000, 'older lines');
    assert.ok((await rows()) <= 3000, `still bounded (${await rows()} rows)`);
    // Jump back to the end.
    await page.getByTestId('jump-latest').click();
    await waitForLine(page, 'the very end');
    await waitUntil(() => atBottom(page), 'the bottom');
    await page.close();
  });

  test('keyboard and phone: every control reachable, no page-wide sideways scroll', async () => {
    const id = jobs.create('keyboard');
    jobs.append(id, ['kb info', { message: 'kb warning', level: 'warn', stream: 'stderr' }, 'x'.repeat(400)]);
    const page = await browser.context.newPage();
    await page.setViewportSize({ width: 390, height: 800 });
    await page.goto(`${gw.base}/jobs/${id}`);
    await waitForLine(page, 'kb warning');
    assert.ok(await page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth), 'fits a phone');
    // "/" focuses the search; Tab walks the controls; Enter/Space press them.
    await page.keyboard.press('/');
    assert.equal(await page.evaluate(() => document.activeElement.dataset.testid), 'search');
    const reached = new Set();
    await page.getByTestId('back-link').focus();
    for (let i = 0; i < 30; i++) {
      await page.keyboard.press('Tab');
      reached.add(await page.evaluate(() => document.activeElement.dataset.testid));
    }
    for (const testid of ['theme-toggle', 'filter-all', 'filter-stages', 'filter-logs', 'filter-problems', 'stream-stdout',
      'stream-stderr', 'search', 'toggle-timestamps', 'toggle-wrap', 'follow-toggle', 'copy', 'download', 'output-viewport']) {
      assert.ok(reached.has(testid), `${testid} is reachable with Tab`);
    }
    await page.getByTestId('filter-problems').focus();
    await page.keyboard.press('Enter');
    await waitUntil(async () => JSON.stringify(await outputLines(page)) === '["kb warning"]', 'the filter by keyboard');
    await page.getByTestId('toggle-wrap').focus();
    await page.keyboard.press('Space');
    assert.equal(await page.getByTestId('toggle-wrap').isChecked(), true);
    await page.close();
  });

  test('screenshots for the docs, light and dark: folded sections, a permalinked line', async () => {
    const id = jobs.create('demo build #7', 'queued');
    jobs.setStatus(id, 'running');
    const at = (stage, messages) => messages.map((m) => (typeof m === 'string' ? { message: m, stage } : { stage, ...m }));
    jobs.append(id, at('checkout', [
      '\x1b[1;34m==> checkout\x1b[0m', 'git fetch --depth 1 origin 5f3c2a1',
      '::group::Fetch submodules', 'fetching vendor/a', '::group::vendor/b', 'fetching vendor/b', '::endgroup::', '::endgroup::',
      'HEAD is now at 5f3c2a1 http: one stream slot per response',
    ]));
    jobs.append(id, at('build', [
      '\x1b[1;34m==> build\x1b[0m',
      '\x1b[0Ksection_start:1700000000:deps[collapsed=true]\r\x1b[0KResolve dependencies',
      ...Array.from({ length: 40 }, (_, k) => `resolved crate_${k} v1.${k}.0`),
      'section_end:1700000007:deps',
      '\x1b[32m   Compiling\x1b[0m eventgate v0.1.0',
      { message: '\x1b[33mwarning\x1b[0m: unused variable `x` (src/lib.rs:42)', level: 'warn', stream: 'stderr' },
      '     |     let x = 1;', '     |         ^ help: prefix it with an underscore: `_x`',
      '\x1b[32m    Finished\x1b[0m `dev` profile in 41.7 s',
    ]));
    jobs.append(id, at('test', [
      '\x1b[1;34m==> test\x1b[0m',
      '::group::Unit tests', ...Array.from({ length: 12 }, (_, k) => `test unit_${k} ... \x1b[32mok\x1b[0m`), '::endgroup::',
      '::group::Integration tests', 'test gateway::resume ... \x1b[32mok\x1b[0m',
      { message: 'test gateway::failover ... \x1b[31mFAILED\x1b[0m', level: 'error', stream: 'stderr' },
      { message: "thread 'failover' panicked at tests/failover.rs:154: reset expected", level: 'error', stream: 'stderr' },
      '::endgroup::',
      'test result: \x1b[31mFAILED\x1b[0m. 13 passed; 1 failed',
    ]));
    jobs.setStatus(id, 'failed');
    fs.mkdirSync(IMAGES, { recursive: true });
    for (const scheme of ['light', 'dark']) {
      const page = await browser.context.newPage();
      await page.emulateMedia({ colorScheme: scheme });
      // Folded sections: groups folded by default, the failing one opened by itself,
      // the checkout stage folded by hand.
      await page.goto(`${gw.base}/jobs/${id}`);
      await waitForState(page, 'ended');
      await page.locator(`${OUTPUT} [data-testid="section"].stage`, { hasText: '==> checkout' }).click();
      await settle(page);
      await page.screenshot({ path: path.join(IMAGES, `viewer-sections-${scheme}.png`) });
      // A permalinked range, highlighted, with timestamps.
      const warning = await page.locator(`${OUTPUT} .row.level-warn`).getAttribute('data-line');
      await page.close();
      const linked = await browser.context.newPage();
      await linked.emulateMedia({ colorScheme: scheme });
      await linked.goto(`${gw.base}/jobs/${id}#L${warning}-L${Number(warning) + 2}`);
      await waitForState(linked, 'ended');
      assert.equal(await linked.locator(`${OUTPUT} .hl`).count(), 3);
      await linked.getByTestId('toggle-timestamps').check();
      await settle(linked);
      await linked.screenshot({ path: path.join(IMAGES, `viewer-permalink-${scheme}.png`) });
      await linked.close();
    }
  });
});
