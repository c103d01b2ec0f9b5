// The job list: one fetch, then ONE EventSource on /api/queue/jobs/stream for the
// status of every job (a connection per job would hit the browser's six-per-host limit).

import { setupTheme, statusBadge, formatTime, formatDuration, jobDuration, getJson } from './common.js';

/** Jobs shown at most. */
const LIMIT = 100;

const $ = (id) => document.getElementById(id);
const jobs = new Map(); // id -> Job
const rows = new Map(); // id -> <tr>
let statusFilter = '';

function rowFor(job) {
  let tr = rows.get(job.id);
  if (!tr) {
    tr = document.createElement('tr');
    tr.dataset.testid = 'job-row';
    tr.dataset.id = job.id;
    const name = document.createElement('td');
    name.className = 'name';
    const a = document.createElement('a');
    a.href = '/jobs/' + encodeURIComponent(job.id);
    name.appendChild(a);
    const id = document.createElement('div');
    id.className = 'muted mono small';
    name.appendChild(id);
    const status = document.createElement('td');
    status.appendChild(document.createElement('span'));
    const created = document.createElement('td');
    created.dataset.label = 'Created';
    const duration = document.createElement('td');
    duration.dataset.label = 'Duration';
    tr.append(name, status, created, duration);
    rows.set(job.id, tr);
  }
  const [name, status, created, duration] = tr.children;
  name.firstChild.textContent = job.name || job.id;
  name.lastChild.textContent = job.id;
  statusBadge(status.firstChild, job.status);
  status.firstChild.dataset.testid = 'job-row-status';
  created.textContent = formatTime(job.createdAt);
  duration.textContent = formatDuration(jobDuration(job));
  return tr;
}

function render() {
  const shown = [...jobs.values()]
    .filter((job) => !statusFilter || job.status === statusFilter)
    .sort((a, b) => (a.createdAt < b.createdAt ? 1 : a.createdAt > b.createdAt ? -1 : 0))
    .slice(0, LIMIT);
  $('jobs').replaceChildren(...shown.map(rowFor));
  $('empty').hidden = shown.length > 0;
  $('count').textContent = `${shown.length} job${shown.length === 1 ? '' : 's'}`;
}

function upsert(job) {
  const known = jobs.get(job.id);
  // Frames can overtake a list read; keep the newer row.
  if (known && known.updatedAt > job.updatedAt) return;
  jobs.set(job.id, job);
}

async function load() {
  const q = statusFilter ? `&status=${encodeURIComponent(statusFilter)}` : '';
  const { items } = await getJson(`/api/queue/jobs?limit=${LIMIT}${q}`);
  for (const job of items) upsert(job);
  render();
}

function setConn(state) {
  $('conn').dataset.state = state;
  $('conn').textContent = state;
}

let frame = false;
/** Set by an error: the next open re-reads the list (changes were missed meanwhile). */
let hadError = false;
function connect() {
  const es = new EventSource('/api/queue/jobs/stream');
  es.addEventListener('open', () => {
    setConn('live');
    // Changes made while disconnected were not sent: read the list again.
    if (hadError) load().catch(() => {});
    hadError = false;
  });
  es.addEventListener('job_status', (e) => {
    try {
      upsert(JSON.parse(e.data));
    } catch {
      return;
    }
    if (!frame) {
      frame = true;
      requestAnimationFrame(() => {
        frame = false;
        render();
      });
    }
  });
  es.addEventListener('error', () => {
    hadError = true;
    if (es.readyState === EventSource.CLOSED) {
      setConn('reconnecting');
      setTimeout(connect, 3000); // the browser gave up (a non-200 answer): start over
    } else {
      setConn('reconnecting');
    }
  });
}

$('status-filter').addEventListener('change', (e) => {
  statusFilter = e.target.value;
  render();
  load().catch(() => {});
});
setupTheme($('theme'));
// Running jobs' durations move on their own.
setInterval(() => {
  for (const [id, tr] of rows) {
    const job = jobs.get(id);
    if (job && job.startedAt && !job.finishedAt) tr.children[3].textContent = formatDuration(jobDuration(job));
  }
}, 1000);

load()
  .catch(() => {})
  .finally(connect);
