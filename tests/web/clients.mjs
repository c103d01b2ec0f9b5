// SSE clients we did not write, against the real gateway: `cd tests/web && npm ci &&
// node clients.mjs`. The npm `eventsource` package (a WHATWG EventSource for Node,
// with its own parser and its own reconnect) and Python's `httpx-sse` (in a venv made
// here, from PyPI). Our own parser (tests/common) could agree with our own server and
// both be wrong; these could not.
//
// Expects a built gateway at $EVENTGATE_BIN (default target/debug/eventgate from the
// repository root). Starts its own PostgreSQL.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { EventSource } from 'eventsource';
import { sleep, startStack, waitUntil } from './harness.mjs';

const here = path.dirname(new URL(import.meta.url).pathname);

/** Messages that trip line-based parsers: newlines, CR, the separators U+2028/U+2029
 * and U+0085 (which the gateway escapes in JSON), a colon at the start, non-BMP text. */
const AWKWARD = [
  'two\nlines',
  'carriage\rreturn',
  'crlf\r\nend',
  'sep \u2028 and \u2029 and \u0085',
  ': not a comment',
  'data: not a field',
  'emoji \u{1F600} and tab\t',
  '',
];

let pg;
let gw;
let jobs;

/** The job's events as the table holds them: [seq, message] in seq order; `logs`:
 * without the status events the gateway's trigger writes. */
function tableEvents(id, { logs = false } = {}) {
  const only = logs ? ` AND payload->>'kind' IS DISTINCT FROM 'status'` : '';
  const out = pg.sql(
    `SELECT json_agg(json_build_array(seq, message) ORDER BY seq) FROM agent_job_events WHERE job_id = '${id}'${only}`,
  );
  return JSON.parse(out);
}

/** A Python venv with httpx-sse from PyPI, made once under tests/web/.venv. */
function python() {
  const venv = path.join(here, '.venv');
  const py = path.join(venv, 'bin', 'python');
  if (!fs.existsSync(py)) {
    const made = spawnSync('python3', ['-m', 'venv', venv], { encoding: 'utf8' });
    assert.equal(made.status, 0, `python3 -m venv failed: ${made.stderr}`);
  }
  const have = spawnSync(py, ['-c', 'import httpx_sse'], { encoding: 'utf8' });
  if (have.status !== 0) {
    const pip = spawnSync(
      py,
      ['-m', 'pip', 'install', '--quiet', '--disable-pip-version-check', 'httpx==0.28.1', 'httpx-sse==0.4.3'],
      { encoding: 'utf8' },
    );
    assert.equal(pip.status, 0, `pip install httpx-sse failed: ${pip.stderr}`);
  }
  return py;
}

/** Runs sse_client.py: the frames of one response, as [{event, id, data, retry}]. */
function pythonFrames(py, url, lastEventId) {
  const args = [path.join(here, 'sse_client.py'), url];
  if (lastEventId) args.push(lastEventId);
  const r = spawnSync(py, args, { encoding: 'utf8', timeout: 60_000 });
  assert.equal(r.status, 0, `sse_client.py failed: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

describe('SSE clients we did not write', { concurrency: 1 }, () => {
  let stack;
  before(async () => {
    stack = await startStack();
    ({ pg, gw, jobs } = stack);
  });

  after(async () => {
    if (stack) await stack.stop();
  });

  test('npm eventsource: live, resumes across a gateway crash with exactly the rest, stops at the end', async () => {
    const id = jobs.create('npm eventsource');
    jobs.append(id, ['one', 'two', 'three', 'four', 'five']);
    const received = []; // [seq, message] of the log events, as they arrive
    const badIds = []; // ids whose seq is not the JSON's (asserted at the end)
    let ends = 0;
    let opens = 0;
    const es = new EventSource(`${gw.base}/api/queue/jobs/${id}/events/stream`);
    es.addEventListener('open', () => opens++);
    es.addEventListener('queue_event', (e) => {
      const event = JSON.parse(e.data);
      if (e.lastEventId.split('-')[0] !== String(event.seq)) badIds.push([e.lastEventId, event.seq]);
      if (event.payload.kind !== 'status') received.push([event.seq, event.message]);
    });
    es.addEventListener('end', () => ends++);
    try {
      await waitUntil(() => received.length >= 5, 'the first five events');

      // A crash: the client reconnects by itself, sends Last-Event-ID, and must get
      // what was written while the gateway was down, once.
      await gw.kill();
      jobs.append(id, ['six', 'seven']);
      jobs.append(id, AWKWARD);
      await sleep(1500); // at least one failed reconnect attempt while it is down
      await gw.start();
      await waitUntil(() => received.length >= 7 + AWKWARD.length, 'the events written while down');
      assert.ok(opens >= 2, `the client reconnected (opens: ${opens})`);
      jobs.append(id, ['after the restart']);
      await waitUntil(() => received.length >= 8 + AWKWARD.length, 'a live event after the restart');

      jobs.setStatus(id, 'succeeded');
      await waitUntil(() => ends >= 1, 'event: end');
      // After `end` the server closes; the client reconnects with the last id and
      // gets 204, which must close it for good (readyState 2), with nothing more.
      await waitUntil(() => es.readyState === EventSource.CLOSED, 'the client to stop on 204', 15_000);
      assert.deepEqual(received, tableEvents(id, { logs: true }), 'each event once, in seq order, bytes intact');
      assert.deepEqual(
        received.map(([, m]) => m),
        ['one', 'two', 'three', 'four', 'five', 'six', 'seven', ...AWKWARD, 'after the restart'],
      );
      await sleep(1500);
      assert.equal(ends, 1, 'one end, no stream after it');
      assert.deepEqual(badIds, [], 'every id: starts with the JSON seq');
    } finally {
      es.close();
    }
  });

  test('Python httpx-sse: the same frames, and Last-Event-ID gives exactly the rest', async () => {
    const py = python();
    const id = jobs.create('python httpx-sse');
    jobs.append(id, ['alpha', 'beta']);
    jobs.append(id, AWKWARD);
    jobs.setStatus(id, 'succeeded');
    const url = `${gw.base}/api/queue/jobs/${id}/events/stream`;

    const all = pythonFrames(py, url);
    const events = all.filter((f) => f.event === 'queue_event').map((f) => JSON.parse(f.data));
    const table = tableEvents(id);
    assert.deepEqual(events.map((e) => [e.seq, e.message]), table, 'every row once, in order, bytes intact');
    for (const f of all.filter((f) => f.event === 'queue_event')) {
      assert.match(f.id, /^\d+-[0-9a-f]{8}$/, 'id: <seq>-<tag>');
    }
    assert.equal(all[0].retry, 1000, 'retry: first, from EVENTGATE_RETRY_MS');
    const end = all[all.length - 1];
    assert.equal(end.event, 'end');
    assert.deepEqual(JSON.parse(end.data), { status: 'succeeded', lastSeq: table[table.length - 1][0] });

    // Resume from the third event's id: exactly the rest, then end.
    const third = all.filter((f) => f.event === 'queue_event')[2];
    const rest = pythonFrames(py, url, third.id).filter((f) => f.event === 'queue_event');
    assert.deepEqual(rest.map((f) => JSON.parse(f.data).seq), table.slice(3).map(([s]) => s));

    // From the last event's id of a finished job: 204 and no body.
    const last = all.filter((f) => f.event === 'queue_event').pop();
    assert.deepEqual(pythonFrames(py, url, last.id), [{ status: 204 }]);
  });
});
