// One job: status, timings and the Live Output panel.
//
// Data: the tail page first (the latest lines), older pages on scroll up, then live
// events from the SSE stream (or from polling when SSE keeps failing). Every event is
// accepted once, by seq, whichever way it came.
//
// Rendering: `lines` holds every loaded line; `view` the ones passing the filters; the
// DOM holds only the window view[winStart, winEnd) of at most MAX_ROWS rows, which
// slides as the user scrolls, so a 200,000-line log costs a few thousand nodes.
// Variable row heights (wrap) are fine because the window slides by measured height.

import { TERMINAL, setupTheme, statusBadge, formatTime, formatClock, formatDuration, jobDuration, getJson } from './common.js';
import { collapseCarriageReturns, stripAnsi, parseAnsi, appendRun, sgrCarry } from './ansi.js';

/** Most rows kept in the DOM. */
const MAX_ROWS = 3000;
/** Rows added or dropped per slide of the window. */
const CHUNK = 500;
/** Events per page request (the gateway's largest page). */
const PAGE = 1000;
/** Distance from an edge of the viewport, in px, at which the window slides. */
const EDGE_PX = 400;
/** Consecutive SSE failures before falling back to polling. */
const FAILS_BEFORE_POLLING = 3;
/** Time between two polls. */
const POLL_MS = 2000;
/** While polling, try SSE again every this many polls. */
const PROBE_EVERY = 3;
/** A seq above any real one: `beforeSeq` of the tail page. */
const END_SEQ = Number.MAX_SAFE_INTEGER;
/** Most lines kept in memory: past it, lines far from the window are dropped (and
 * fetched again by range if scrolled back to). */
const MAX_LINES = 50_000;
/** Lines before a permalinked one that its page also loads. */
const CONTEXT_LINES = 50;
/** Bidirectional controls: shown as their code, never applied (they can make text lie). */
const BIDI = /[\u202a-\u202e\u2066-\u2069]/g;

const jobId = decodeURIComponent(location.pathname.split('/')[2] || '');
const api = '/api/queue/jobs/' + encodeURIComponent(jobId);
const $ = (id) => document.getElementById(id);
const vp = $('viewport');
const out = $('output');

// ---- model ----------------------------------------------------------------------

/** Every loaded line, ascending: `{e: event meta, t: text, s: first line of a stage}`. */
let lines = [];
/** Lowest and highest seq loaded. */
let firstSeq = 0;
let lastSeq = 0;
/** Whether everything before `firstSeq` is loaded. */
let olderDone = false;
/** Whether everything after `lastSeq` that exists is loaded (else: opened at a permalink
 * and not scrolled to the end yet; the live stream starts once it is). */
let newerDone = true;
let loadingNewer = false;
/** The highlighted lines `[from, to]` (from `#L<a>-L<b>`), or null. */
let highlight = null;
/** The line a shift-click extends a range from. */
let anchorLine = null;
let loadingOlder = false;
/** Events received but not yet rendered (rendered together in the next frame). */
let pending = [];
let frameQueued = false;

let job = null;
let ended = false;

const filter = { kind: 'all', stdout: true, stderr: true, needle: '' };
let view = [];
let winStart = 0;
let winEnd = 0;
let follow = true;
let userPaused = false;
/** scrollTop after our last own change: a smaller one later means the user went up. */
let lastTop = 0;

function eventKind(ev) {
  const p = ev.payload;
  if (p && typeof p === 'object' && typeof p.kind === 'string') return p.kind;
  return 'log';
}

/**
 * Splits events into lines. `prevStage` is the stage of the event before the first:
 * null when there is none (the log's start), undefined when it is not loaded yet.
 */
/** The line number after the last event split (the fallback when events lack `line`). */
let nextLine = 1;

function linesOf(events, prevStage) {
  const result = [];
  for (const ev of events) {
    const p = ev.payload && typeof ev.payload === 'object' ? ev.payload : {};
    const kind = eventKind(ev);
    const meta = {
      seq: ev.seq,
      level: ev.level,
      kind,
      stream: kind === 'log' ? p.stream : undefined,
      stage: typeof p.stage === 'string' ? p.stage : undefined,
      status: kind === 'status' ? p.status : undefined,
      at: ev.createdAt,
      // The history tag of the stream's `id:` (see streamCursor).
      tag: typeof ev.id === 'string' && ev.id.length >= 8 ? ev.id.slice(-8) : undefined,
    };
    let stageStart = kind === 'stage' || kind === 'status';
    if ((kind === 'notice' || kind === 'truncated') && ev.level === 'warn') showNotice(ev.message);
    if (kind === 'log' && meta.stage !== undefined) {
      stageStart = prevStage !== undefined && meta.stage !== prevStage;
      prevStage = meta.stage;
    }
    const parts = String(ev.message ?? '').split('\n');
    // The number of the event's first line over the whole log (the gateway's `line`);
    // a gateway without it: counted here, which is right from the log's start.
    const first = typeof ev.line === 'number' ? ev.line : nextLine;
    nextLine = first + parts.length;
    if (parts.length > 1 && parts[parts.length - 1] === '') parts.pop();
    // Colours set on one line of a coalesced message stay on for the next, as in a terminal.
    let carry = '';
    parts.forEach((text, i) => {
      const line = collapseCarriageReturns(text);
      const mk = markerOf(text);
      if (mk) {
        result.push({ e: meta, t: mk.title || '', s: false, n: first + i, mk });
        return;
      }
      result.push({ e: meta, t: carry + line, s: stageStart && i === 0, n: first + i });
      if (i < parts.length - 1) carry = sgrCarry(line, carry);
    });
  }
  return result;
}

// ---- sections ---------------------------------------------------------------------
//
// Stages (a change of `payload.stage`: the stage's first line is its header), and
// `::group::<title>` / `::endgroup::` (GitHub Actions) and
// `section_start:<unix>:<name>[collapsed=true]` / `section_end:<unix>:<name>` (GitLab)
// lines inside them, become headers that fold what they hold. Each line knows its
// innermost section (`p`); a header line holds its section (`h`); end markers (`x`)
// are never shown. A folded section's lines are left out of the view, so folding costs
// no DOM. Sections are built from the loaded lines: a section whose start is not loaded
// (a page opened in the middle of a huge log) shows its lines unfolded, without a
// header, until scrolling up loads its start.

const GROUP = /^::group::(.*)$/;
const ENDGROUP = /^::endgroup::\s*$/;
const SECTION_START = /section_start:(\d+):([^\s\[\r]+)(\[[^\]]*\])?\r?(.*)$/;
const SECTION_END = /section_end:(\d+):([^\s\[\r]+)/;

/** The section marker a raw line is, or null. */
function markerOf(raw) {
  if (raw.indexOf('::') < 0 && raw.indexOf('section_') < 0) return null;
  const text = stripAnsi(raw);
  let m = GROUP.exec(text);
  if (m) return { start: true, title: m[1].trim() || 'group', name: null, ts: null, collapsed: true };
  if (ENDGROUP.test(text)) return { start: false, name: null, ts: null };
  m = SECTION_START.exec(text);
  if (m) {
    const title = collapseCarriageReturns(m[4] || '').trim() || m[2];
    return { start: true, title, name: m[2], ts: Number(m[1]) * 1000, collapsed: /collapsed=true/.test(m[3] || '') };
  }
  m = SECTION_END.exec(text);
  if (m) return { start: false, name: m[2], ts: Number(m[1]) * 1000 };
  return null;
}

/** Open sections at the end of `lines` (where live lines go on). */
let sectionStack = [];
/** Fold state the user chose, by the header's line number. */
const openState = new Map();
/** Sections whose header shows a changed count or duration. */
const touched = new Set();

/** Closes every open section at time `at` (a new stage, or the job's status). */
function closeAll(at) {
  for (const sec of sectionStack) {
    if (sec.t1 === null || sec.stage) sec.t1 = at;
    touched.add(sec);
  }
  sectionStack = [];
}

/** Whether a line starts a stage section (the first line of a new `payload.stage`). */
function startsStage(line) {
  return line.s && !line.mk && line.e.kind === 'log' && line.e.stage !== undefined;
}

/** Whether anything loaded makes a section (else nothing needs rebuilding). */
function hasSections(list) {
  return list.some((l) => l.mk || l.s);
}

/** Assigns sections to `list` (lines in order), going on from `stack`. */
function assignSections(list) {
  for (const line of list) {
    if (startsStage(line)) {
      const at = Date.parse(line.e.at);
      closeAll(at);
      const sec = { title: line.e.stage, n: line.n, name: null, parent: null, depth: 0, count: 1, t0: at, t1: at, err: line.e.level === 'error', collapsed: false, stage: true };
      line.h = sec;
      line.p = null;
      sectionStack.push(sec);
      continue;
    }
    if (line.e.kind === 'status') {
      // A status change ends every section: it is the job's, not a step's.
      closeAll(Date.parse(line.e.at));
      line.p = null;
      continue;
    }
    const parent = sectionStack[sectionStack.length - 1] || null;
    const mk = line.mk;
    if (mk && mk.start) {
      const at = mk.ts ?? Date.parse(line.e.at);
      const depth = sectionStack.filter((open) => !open.stage).length;
      const sec = { title: mk.title, n: line.n, name: mk.name, parent, depth, count: 0, t0: at, t1: null, err: false, collapsed: mk.collapsed, stage: false };
      line.h = sec;
      line.p = parent;
      sectionStack.push(sec);
      continue;
    }
    if (mk) {
      line.x = true;
      // GitHub's end closes the innermost group; GitLab's closes its named section.
      let i = sectionStack.length - 1;
      if (mk.name !== null) while (i >= 0 && sectionStack[i].name !== mk.name) i--;
      if (i >= 0 && sectionStack[i].stage) i = -1; // an end marker never closes a stage
      if (i >= 0) {
        const at = mk.ts ?? Date.parse(line.e.at);
        for (let j = sectionStack.length - 1; j >= i; j--) {
          sectionStack[j].t1 = at;
          touched.add(sectionStack[j]);
        }
        sectionStack.length = i;
      }
      continue;
    }
    line.p = parent;
    let at = null;
    for (let sec = parent; sec; sec = sec.parent) {
      sec.count++;
      touched.add(sec);
      if (line.e.level === 'error') sec.err = true;
      if (sec.stage) sec.t1 = at ?? (at = Date.parse(line.e.at));
    }
  }
}

/** Rebuilds every section from the loaded lines (after older lines came in front). */
function rebuildSections() {
  sectionStack = [];
  for (const line of lines) {
    line.h = line.p = undefined;
    line.x = false;
  }
  assignSections(lines);
  touched.clear();
}

/** A section opens by itself when it holds an error; otherwise as its marker says. */
function isOpen(sec) {
  if (openState.has(sec.n)) return openState.get(sec.n);
  return sec.err || !sec.collapsed;
}

function sectionMeta(sec) {
  let text = `${sec.count} line${sec.count === 1 ? '' : 's'}`;
  if (sec.t1 !== null && Number.isFinite(sec.t1 - sec.t0)) text += `, ${formatDuration(Math.max(0, sec.t1 - sec.t0))}`;
  return text;
}

/** Log text as shown: bidirectional controls as their code. */
function shown(text) {
  return text.replace(BIDI, (c) => `<U+${c.charCodeAt(0).toString(16).toUpperCase()}>`);
}

/** A header row: the caret, a stage's name and the count and duration are CSS generated
 * content, so the row's text is the section's title (or the stage's first line). */
function headerOf(line, row) {
  const sec = line.h;
  row.classList.add('section');
  if (sec.stage) row.classList.add('stage');
  if (sec.err) row.classList.add('has-error');
  row.dataset.testid = 'section';
  row.setAttribute('role', 'button');
  row.tabIndex = 0;
  row.setAttribute('aria-expanded', String(isOpen(sec)));
  const caret = document.createElement('span');
  caret.className = 'caret';
  caret.setAttribute('aria-hidden', 'true');
  row.appendChild(caret);
  if (sec.stage) {
    const name = document.createElement('span');
    name.className = 'stage-name';
    name.dataset.name = sec.title;
    row.appendChild(name);
  }
  for (const [run, state] of parseAnsi(shown(line.t))) appendRun(row, run, state, filter.needle);
  const meta = document.createElement('span');
  meta.className = 'sec-meta';
  meta.dataset.testid = 'section-meta';
  meta.dataset.meta = sectionMeta(sec);
  row.appendChild(meta);
}

/** How far a line's text is indented: one step per group around it (stages: none). */
function indentOf(line) {
  if (line.h) return line.h.depth;
  const parent = line.p;
  return parent && !parent.stage ? parent.depth + 1 : 0;
}

/** Opens or closes a section, keeping its header where it is. */
function toggleSection(n, open) {
  openState.set(n, open);
  view = lines.filter(matches);
  follow = false;
  showLine(n, false);
  // Still at the end (a short log): keep following, as the user had it.
  if (!userPaused && newerDone && winEnd === view.length && atBottom()) follow = true;
  updateFollow();
}

/** Refreshes the headers in the DOM whose numbers changed; reopens what an error opened. */
function refreshSections() {
  let reopened = false;
  for (const sec of touched) {
    const row = out.querySelector(`[data-testid="section"][data-line="${sec.n}"]`);
    if (row) {
      row.querySelector('.sec-meta').dataset.meta = sectionMeta(sec);
      row.classList.toggle('has-error', sec.err);
      if (row.getAttribute('aria-expanded') !== String(isOpen(sec))) reopened = true;
    }
  }
  touched.clear();
  return reopened;
}

/** The first error-level line of the log: among the loaded lines when the log's start is
 * loaded, else asked of the gateway (`events?level=error&limit=1`); when it lies outside
 * what is loaded, the page opens at it as at a permalink. */
async function jumpToFirstError() {
  let line = olderDone ? lines.find((l) => l.e.level === 'error' && !l.x) : undefined;
  if (!line) {
    let first;
    try {
      first = (await getJson(`${api}/events?level=error&limit=1`)).items[0];
    } catch {
      toast('Could not look for the first error; try again');
      return;
    }
    if (!first) {
      toast('No error in this log');
      return;
    }
    line = lines.find((l) => l.e.seq === first.seq && !l.x) || lines.find((l) => l.e.seq === first.seq);
    if (!line) {
      // Not loaded: open the page at it (the hashchange handler reloads at an address).
      const hash = `#L${typeof first.line === 'number' ? first.line : 1}`;
      if (location.hash === hash) location.reload();
      else location.hash = hash;
      return;
    }
  }
  openAround(line);
  highlight = [line.n, line.n];
  anchorLine = line.n;
  history.replaceState(null, '', `#L${line.n}`);
  view = lines.filter(matches);
  follow = false;
  updateFollow();
  showLine(line.n);
}

/** Opens every section around a line (a permalink's, the first error's). */
function openAround(line) {
  for (let sec = line.p; sec; sec = sec.parent) openState.set(sec.n, true);
}

/** Plain lowercase text of a line, computed once when first searched. */
function lower(line) {
  if (line.l === undefined) line.l = stripAnsi(line.t).toLowerCase();
  return line.l;
}

function matches(line) {
  const m = line.e;
  if (line.x) return false;
  for (let sec = line.p; sec; sec = sec.parent) if (!isOpen(sec)) return false;
  if (filter.kind === 'stages' && !line.s) return false;
  if (filter.kind === 'logs' && m.kind !== 'log') return false;
  if (filter.kind === 'problems' && m.level !== 'warn' && m.level !== 'error') return false;
  if (m.stream === 'stdout' && !filter.stdout) return false;
  if (m.stream === 'stderr' && !filter.stderr) return false;
  if (filter.needle && !lower(line).includes(filter.needle)) return false;
  return true;
}

// ---- rendering ------------------------------------------------------------------

function rowOf(line) {
  const m = line.e;
  const row = document.createElement('div');
  let cls = 'row level-' + m.level;
  if (m.stream) cls += ' stream-' + m.stream;
  if (m.kind !== 'log') cls += ' kind-' + m.kind;
  if (line.s) cls += ' stage-start';
  if (line.p) cls += ' in-section';
  if (highlight && line.n >= highlight[0] && line.n <= highlight[1]) cls += ' hl';
  row.className = cls;
  row.dataset.seq = m.seq;
  row.dataset.line = line.n;
  row.dataset.ts = formatClock(m.at);
  // The number is drawn by CSS from an empty span, so it is not part of the log's text.
  const number = document.createElement('span');
  number.className = 'ln';
  number.dataset.n = line.n;
  number.setAttribute('aria-hidden', 'true');
  row.appendChild(number);
  const indent = indentOf(line);
  if (indent) row.style.setProperty('--indent', indent);
  if (line.h) {
    headerOf(line, row);
  } else {
    for (const [run, state] of parseAnsi(shown(line.t))) appendRun(row, run, state, filter.needle);
  }
  // textContent of the output reads as lines; the newline itself is not displayed.
  const nl = document.createElement('span');
  nl.className = 'nl';
  nl.textContent = '\n';
  row.appendChild(nl);
  return row;
}

function rowsFor(from, to) {
  const frag = document.createDocumentFragment();
  for (let i = from; i < to; i++) frag.appendChild(rowOf(view[i]));
  return frag;
}

function atBottom() {
  return vp.scrollHeight - vp.scrollTop - vp.clientHeight <= 2;
}

function scrollToBottom() {
  vp.scrollTop = vp.scrollHeight;
  lastTop = vp.scrollTop;
}

/** Shows the last rows of the view and scrolls to them. */
function resetWindowToEnd() {
  winEnd = view.length;
  winStart = Math.max(0, winEnd - 2 * CHUNK);
  out.replaceChildren(rowsFor(winStart, winEnd));
  $('empty').hidden = view.length > 0;
  updateOlder();
  scrollToBottom();
}

function trimTop() {
  const excess = winEnd - winStart - MAX_ROWS;
  if (excess <= 0) return;
  const before = vp.scrollHeight;
  for (let i = 0; i < excess; i++) out.firstChild.remove();
  winStart += excess;
  vp.scrollTop -= before - vp.scrollHeight;
  lastTop = vp.scrollTop;
}

function trimBottom() {
  const excess = winEnd - winStart - MAX_ROWS;
  if (excess <= 0) return;
  for (let i = 0; i < excess; i++) out.lastChild.remove();
  winEnd -= excess;
}

/** Slides the window up (older rows), loading an older page when all are shown. */
function extendUp() {
  if (winStart > 0) {
    const from = Math.max(0, winStart - CHUNK);
    const before = vp.scrollHeight;
    out.insertBefore(rowsFor(from, winStart), out.firstChild);
    winStart = from;
    vp.scrollTop += vp.scrollHeight - before;
    lastTop = vp.scrollTop;
    trimBottom();
    // Near the first loaded line: fetch the page before it now, while these rows are
    // read, not when the top is reached.
    if (winStart < 2 * CHUNK && !olderDone) loadOlder();
    updateOlder();
  } else if (!olderDone) {
    loadOlder();
  }
}

/** Slides the window down (newer rows). */
function extendDown() {
  if (winEnd >= view.length) {
    if (!newerDone) loadNewer();
    return;
  }
  const to = Math.min(view.length, winEnd + CHUNK);
  out.appendChild(rowsFor(winEnd, to));
  winEnd = to;
  trimTop();
}

/** Adds new lines (live) to the model, the view and, if in the window, the DOM. */
function appendLines(newLines) {
  for (const line of newLines) lines.push(line);
  loadedChanged();
  assignSections(newLines);
  if (refreshSections()) {
    // An error opened a folded section: show what it holds.
    view = lines.filter(matches);
    if (follow) resetWindowToEnd();
    else showLine(Number(out.firstChild?.dataset.line || 1), false);
    return;
  }
  const oldLength = view.length;
  for (const line of newLines) if (matches(line)) view.push(line);
  const added = view.length - oldLength;
  if (added === 0) return;
  $('empty').hidden = true;
  if (follow) {
    if (winEnd !== oldLength || added > MAX_ROWS) {
      resetWindowToEnd();
      return;
    }
    out.appendChild(rowsFor(winEnd, view.length));
    winEnd = view.length;
    trimTop();
    scrollToBottom();
    trimOlder();
  } else {
    if (winEnd === oldLength && winEnd - winStart < MAX_ROWS) {
      const to = Math.min(view.length, winStart + MAX_ROWS);
      out.appendChild(rowsFor(winEnd, to));
      winEnd = to;
    }
    trimOlder();
    updateJump();
  }
}

/** Adds an older page in front of everything loaded. */
function prependLines(older) {
  if (!older.length) return;
  // The first loaded line may turn out to start a stage now that its predecessor is known.
  const first = lines[0];
  const lastOlder = older[older.length - 1];
  if (first && first.e.kind === 'log' && first.e.stage !== undefined && lastOlder.e.stage !== undefined) {
    first.s = first.e.stage !== lastOlder.e.stage;
  }
  lines = older.concat(lines);
  if (hasSections(older) || hasSections(lines)) {
    // Sections may start in the older lines: rebuild them and the view, keeping the window.
    const firstShown = view[winStart];
    rebuildSections();
    view = lines.filter(matches);
    const at = firstShown ? view.indexOf(firstShown) : -1;
    const shift = at >= 0 ? at - winStart : 0;
    winStart += shift;
    winEnd += shift;
    return;
  }
  const olderView = older.filter(matches);
  view = olderView.concat(view);
  winStart += olderView.length;
  winEnd += olderView.length;
}

/** Rebuilds the view after a filter change and shows its end. */
function refilter() {
  view = lines.filter(matches);
  if (!userPaused) follow = true;
  resetWindowToEnd();
  updateFollow();
  $('matches').textContent = filter.needle ? `${view.length} matching line${view.length === 1 ? '' : 's'}` : '';
  queueMicrotask(fill);
}

/** Loads older rows while the viewport is not filled (nothing to scroll yet). */
function fill() {
  if (vp.scrollTop < EDGE_PX) extendUp();
}

function updateOlder() {
  const el = $('older');
  if (loadingOlder) el.textContent = 'Loading older lines…';
  else if (winStart > 0 || !olderDone) el.textContent = '↑ Scroll up for older lines';
  else el.textContent = lines.length ? 'Beginning of the log' : '';
}

function updateJump() {
  const jump = $('jump');
  jump.hidden = follow;
  const unseen = view.length - winEnd;
  jump.textContent = unseen > 0 ? `Jump to latest ↓ (${unseen} more)` : 'Jump to latest ↓';
}

function updateFollow() {
  const button = $('follow');
  button.textContent = follow ? 'Pause' : 'Follow';
  button.setAttribute('aria-pressed', String(follow));
  button.title = follow ? 'Stop scrolling to new lines' : 'Scroll to new lines as they arrive';
  updateJump();
}

function jumpToLatest() {
  if (!newerDone) {
    // The end is not loaded (a permalink, or trimmed): open the page at its tail.
    location.href = location.pathname;
    return;
  }
  userPaused = false;
  follow = true;
  if (winEnd === view.length) scrollToBottom();
  else resetWindowToEnd();
  updateFollow();
}

vp.addEventListener(
  'scroll',
  () => {
    const top = vp.scrollTop;
    const windowAtEnd = winEnd === view.length;
    if (atBottom() && windowAtEnd) {
      if (!follow && !userPaused) {
        follow = true;
        updateFollow();
      }
    } else if (top < lastTop - 1 && follow) {
      follow = false; // the user scrolled up
      updateFollow();
    }
    lastTop = top;
    if (top < EDGE_PX) extendUp();
    if (vp.scrollHeight - top - vp.clientHeight < EDGE_PX) extendDown();
  },
  { passive: true },
);

new ResizeObserver(() => {
  if (follow) scrollToBottom();
}).observe(vp);

// ---- receiving events -----------------------------------------------------------

/** Accepts an event once (by seq) and renders it with the others of this frame. */
function receive(ev) {
  if (typeof ev.seq !== 'number' || ev.seq <= lastSeq) return;
  lastSeq = ev.seq;
  if (!firstSeq) firstSeq = ev.seq;
  pending.push(ev);
  if (!frameQueued) {
    frameQueued = true;
    requestAnimationFrame(flush);
  }
}

/** The stage of the last loaded line (see linesOf). */
let prevStage = null;

function flush() {
  frameQueued = false;
  const events = pending;
  pending = [];
  if (!events.length) return;
  const newLines = linesOf(events, prevStage);
  for (const ev of events) {
    const stage = ev.payload && ev.payload.kind === 'log' ? ev.payload.stage : undefined;
    if (typeof stage === 'string') prevStage = stage;
  }
  appendLines(newLines);
  $('t-events').textContent = String(lastSeq);
  const status = [...events].reverse().find((ev) => eventKind(ev) === 'status');
  if (status && status.payload.status) {
    setStatus(status.payload.status);
    // Timings change with the status; the terminal one is read once by finish().
    if (!TERMINAL.has(status.payload.status)) refreshJob().catch(() => {});
  }
}

// ---- older pages ----------------------------------------------------------------

async function loadOlder() {
  if (loadingOlder || olderDone) return;
  loadingOlder = true;
  updateOlder();
  try {
    const page = await getJson(`${api}/events?beforeSeq=${firstSeq}&limit=${PAGE}`);
    const events = page.items.filter((ev) => ev.seq < firstSeq);
    // A page may be cut short by the gateway's byte budget (about 1 MiB), so a short
    // page is not the start: only seq 1 or an empty page is.
    if (!events.length || events[0].seq <= 1) olderDone = true;
    if (events.length) {
      firstSeq = events[0].seq;
      prependLines(linesOf(events, olderDone ? null : undefined));
      trimNewer();
      loadedChanged();
    }
  } catch {
    $('older').textContent = 'Could not load older lines; scroll up to retry';
    loadingOlder = false;
    return;
  }
  loadingOlder = false;
  updateOlder();
  if (vp.scrollTop < EDGE_PX) extendUp();
}

/** Index in `lines` of the first line of the event after the one holding line `i`. */
function eventEnd(i) {
  let j = i + 1;
  while (j < lines.length && lines[j].e === lines[i].e) j++;
  return j;
}

/** Drops old lines above the window once more than MAX_LINES are loaded. */
function trimOlder() {
  if (lines.length <= MAX_LINES) return;
  const shown = view[winStart];
  let cut = eventEnd(lines.length - MAX_LINES - 1);
  if (shown) cut = Math.min(cut, lines.indexOf(shown));
  while (cut > 0 && cut < lines.length && lines[cut].e === lines[cut - 1].e) cut--;
  if (cut <= 0) return;
  const keepSeq = lines[cut].e.seq;
  let drop = 0;
  while (drop < view.length && view[drop].e.seq < keepSeq) drop++;
  lines = lines.slice(cut);
  view = view.slice(drop);
  winStart -= drop;
  winEnd -= drop;
  firstSeq = keepSeq;
  olderDone = false;
  if (hasSections(lines)) rebuildSections();
  updateOlder();
  loadedChanged();
}

/** Drops new lines below the window once more than MAX_LINES are loaded; the live
 * stream stops until the view comes back down to the end. */
function trimNewer() {
  if (lines.length <= MAX_LINES) return;
  const shown = view[winEnd - 1];
  let keep = MAX_LINES;
  if (shown) keep = Math.max(keep, lines.indexOf(shown) + 1);
  keep = eventEnd(keep - 1);
  if (keep >= lines.length) return;
  const lastKept = lines[keep - 1].e.seq;
  let viewKeep = view.length;
  while (viewKeep > 0 && view[viewKeep - 1].e.seq > lastKept) viewKeep--;
  lines.length = keep;
  view.length = viewKeep;
  winEnd = Math.min(winEnd, viewKeep);
  lastSeq = lastKept;
  if (!newerDone) {
    loadedChanged();
    return;
  }
  newerDone = false;
  pending = [];
  if (!ended) {
    closeSse();
    stopPolling();
    clearTimeout(retryTimer);
    setConn('paused', 'Scrolled far from the end: newer lines load as you scroll down');
  }
  if (hasSections(lines)) rebuildSections();
  loadedChanged();
}

/** How many lines the model holds, for the curious (and the tests). */
function loadedChanged() {
  vp.dataset.loadedLines = String(lines.length);
}

/** Opened at a permalink: the next page after what is loaded; at the end, go live. */
async function loadNewer() {
  if (loadingNewer || newerDone) return;
  loadingNewer = true;
  try {
    const page = await getJson(`${api}/events?afterSeq=${lastSeq}&limit=${PAGE}`);
    for (const ev of page.items) receive(ev);
    if (page.items.length < PAGE) {
      newerDone = true;
      if (!ended) connectSse();
    }
  } catch {
    toast('Could not load newer lines; scroll down to retry');
  } finally {
    loadingNewer = false;
  }
}

/** `#L<a>` or `#L<a>-L<b>` as `[a, b]`, else null. */
function parseHash(hash) {
  const m = /^#L(\d+)(?:-L?(\d+))?$/.exec(hash);
  if (!m) return null;
  const a = Number(m[1]);
  const b = m[2] ? Number(m[2]) : a;
  return [Math.min(a, b), Math.max(a, b)];
}

/** Marks the highlighted rows in the DOM. */
function markHighlight() {
  for (const row of out.children) {
    const n = Number(row.dataset.line);
    row.classList.toggle('hl', !!highlight && n >= highlight[0] && n <= highlight[1]);
  }
}

/** Shows the window of the view around line `n` and scrolls it to the middle. */
function showLine(n, center = true) {
  let i = view.findIndex((line) => line.n >= n);
  if (i < 0) i = view.length - 1;
  winStart = Math.max(0, i - CHUNK);
  winEnd = Math.min(view.length, i + CHUNK);
  out.replaceChildren(rowsFor(winStart, winEnd));
  $('empty').hidden = view.length > 0;
  updateOlder();
  const row = out.querySelector(`[data-line="${view[i] ? view[i].n : n}"]`);
  if (row) row.scrollIntoView({ block: center ? 'center' : 'start' });
  lastTop = vp.scrollTop;
}

function showNotice(text) {
  const el = $('notice');
  el.textContent = text;
  el.hidden = false;
}

// Clicking a line number sets the address (shift-click: a range from the last one).
out.addEventListener('click', (e) => {
  const number = e.target.closest && e.target.closest('.ln');
  const header = e.target.closest && e.target.closest('[data-testid="section"]');
  if (!number && header) {
    toggleSection(Number(header.dataset.line), header.getAttribute('aria-expanded') !== 'true');
    return;
  }
  if (!number) return;
  const n = Number(number.dataset.n);
  if (e.shiftKey && anchorLine !== null) {
    highlight = [Math.min(anchorLine, n), Math.max(anchorLine, n)];
  } else {
    highlight = [n, n];
    anchorLine = n;
  }
  const hash = highlight[0] === highlight[1] ? `#L${highlight[0]}` : `#L${highlight[0]}-L${highlight[1]}`;
  history.replaceState(null, '', hash);
  markHighlight();
});
out.addEventListener('keydown', (e) => {
  const header = e.target.closest && e.target.closest('[data-testid="section"]');
  if (header && (e.key === 'Enter' || e.key === ' ')) {
    e.preventDefault();
    toggleSection(Number(header.dataset.line), header.getAttribute('aria-expanded') !== 'true');
  }
});
// An address typed by hand: open it afresh.
window.addEventListener('hashchange', () => {
  if (parseHash(location.hash)) location.reload();
});

// ---- connection: SSE, falling back to polling, back to SSE ------------------------

let es = null;
let mode = 'sse'; // or 'polling'
let failures = 0;
let pollTimer = null;
let polls = 0;
let retryTimer = null;

function setConn(state, detail) {
  const el = $('conn');
  el.dataset.state = state;
  el.textContent = state;
  el.title = detail || 'Connection to the live stream: ' + state;
}

function closeSse() {
  if (es) es.close();
  es = null;
}

function connectSse() {
  clearTimeout(retryTimer);
  closeSse();
  if (ended) return;
  // On its own reconnects EventSource sends Last-Event-ID; a new one starts after the
  // last line we have, naming it as the stream's `id:` does (`<seq>-<the last 8 hex
  // digits of its id>`), so that a history a failover rewrote meanwhile gets `reset`.
  const source = new EventSource(`${api}/events/stream?afterSeq=${streamCursor()}`);
  es = source;
  if (mode !== 'polling') setConn(failures ? 'reconnecting' : 'connecting');
  source.addEventListener('open', () => {
    if (es !== source) return;
    failures = 0;
    stopPolling();
    setConn('live');
  });
  source.addEventListener('queue_event', (e) => {
    if (es !== source) return;
    try {
      receive(JSON.parse(e.data));
    } catch {
      // a malformed frame is skipped; the seq check catches any gap on resume
    }
  });
  // History went back (a failover lost events we showed): what is shown is wrong now.
  source.addEventListener('reset', () => {
    if (es !== source) return;
    closeSse();
    location.reload();
  });
  source.addEventListener('end', (e) => {
    if (es !== source) return;
    closeSse();
    let status;
    try {
      status = JSON.parse(e.data).status;
    } catch {
      status = undefined;
    }
    finish(status);
  });
  source.addEventListener('error', () => onSseError(source));
}

/** `lastSeq` as an SSE id naming the event we hold there, when it is rendered; else
 * the bare seq. */
function streamCursor() {
  const last = lines.length ? lines[lines.length - 1].e : null;
  if (last && last.seq === lastSeq && last.tag) return `${lastSeq}-${last.tag}`;
  return String(lastSeq);
}

function onSseError(source) {
  if (es !== source || ended) return;
  if (mode === 'polling') {
    closeSse(); // a failed probe: keep polling
    return;
  }
  failures++;
  if (source.readyState === EventSource.CLOSED) {
    // A 204 (the job is finished and we have it all) or a non-200 answer (a deploy):
    // the browser gave up; ask the job which one it was.
    closeSse();
    afterClosed();
  } else if (failures >= FAILS_BEFORE_POLLING) {
    closeSse();
    startPolling();
  } else {
    setConn('reconnecting'); // EventSource retries by itself, with Last-Event-ID
  }
}

async function afterClosed() {
  try {
    const current = await getJson(api);
    showJob(current);
    if (TERMINAL.has(current.status)) {
      mode = 'polling'; // reuse the page reader to pick up anything left
      setConn('polling');
      await pollOnce();
      return;
    }
  } catch (e) {
    if (e.status === 404) {
      gone();
      return;
    }
    // otherwise the gateway is down: count it as one more failure
  }
  if (ended) return;
  if (failures >= FAILS_BEFORE_POLLING) startPolling();
  else {
    setConn('reconnecting');
    retryTimer = setTimeout(connectSse, 500 * 2 ** failures);
  }
}

function startPolling() {
  if (ended) return;
  mode = 'polling';
  polls = 0;
  setConn('polling');
  clearTimeout(pollTimer);
  pollTimer = setTimeout(pollOnce, 0);
}

function stopPolling() {
  mode = 'sse';
  clearTimeout(pollTimer);
  pollTimer = null;
}

/** Reads the next pages; finishes when the job is terminal and nothing is left. */
async function pollOnce() {
  pollTimer = null;
  if (ended || mode !== 'polling') return;
  let delay = POLL_MS;
  try {
    const page = await getJson(`${api}/events?afterSeq=${lastSeq}&limit=${PAGE}`);
    if (mode !== 'polling' || ended) return;
    for (const ev of page.items) receive(ev);
    // The status event commits with the status, so a terminal status read before these
    // events means the page reached the end.
    // (An empty page: a short one may only have met the gateway's byte budget.)
    if (TERMINAL.has(page.jobStatus) && page.items.length === 0) {
      await finish(page.jobStatus);
      return;
    }
    if (page.items.length === PAGE) delay = 0;
  } catch (e) {
    if (e.status === 404) {
      gone();
      return;
    }
    delay = POLL_MS * 2;
  }
  polls++;
  if (polls % PROBE_EVERY === 0 && !es) connectSse(); // back to SSE when it works
  if (mode === 'polling' && !ended) pollTimer = setTimeout(pollOnce, delay);
}

/** The job is over: stop every connection and timer, show the final status. */
async function finish(status) {
  if (ended) return;
  ended = true;
  closeSse();
  stopPolling();
  clearTimeout(retryTimer);
  if (pending.length) flush();
  try {
    showJob(await getJson(api));
  } catch {
    if (status) setStatus(status);
  }
  clearInterval(ticker);
  setConn('ended', 'The job is finished; the output is complete');
}

/** The job was deleted while shown: keep the output, stop asking. */
function gone() {
  ended = true;
  closeSse();
  stopPolling();
  clearTimeout(retryTimer);
  clearInterval(ticker);
  statusBadge($('status'), 'deleted');
  setConn('ended', 'The job no longer exists');
}

// ---- the job header ---------------------------------------------------------------

function setStatus(status) {
  statusBadge($('status'), status);
  if (job) job.status = status;
}

function showJob(j) {
  job = j;
  const name = j.name || j.id;
  $('title').textContent = name;
  document.title = `${name} · eventgate`;
  setStatus(j.status);
  $('t-created').textContent = formatTime(j.createdAt);
  $('t-started').textContent = formatTime(j.startedAt);
  $('t-finished').textContent = formatTime(j.finishedAt);
  $('t-events').textContent = String(Math.max(j.lastSeq || 0, lastSeq));
  tick();
}

function tick() {
  const ms = jobDuration(job);
  $('t-duration').textContent = ms === null ? '—' : formatDuration(ms);
}

const ticker = setInterval(tick, 1000);

async function refreshJob() {
  showJob(await getJson(api));
}

// ---- toolbar ------------------------------------------------------------------------

function toast(text) {
  const el = $('toast');
  el.textContent = text;
  el.classList.add('shown');
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => el.classList.remove('shown'), 4000);
}

function lineText(line, withTime) {
  const text = stripAnsi(line.t);
  return withTime ? `${formatClock(line.e.at)} ${text}` : text;
}

function fallbackCopy(text) {
  const area = document.createElement('textarea');
  area.value = text;
  area.setAttribute('readonly', '');
  area.className = 'offscreen';
  area.dataset.testid = 'copy-fallback';
  document.body.appendChild(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand('copy');
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}

async function copyVisible() {
  const withTime = $('o-ts').checked;
  const text = view.map((line) => lineText(line, withTime)).join('\n');
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      ok = true;
    }
  } catch {
    ok = false;
  }
  if (!ok) ok = fallbackCopy(text);
  toast(ok ? `Copied ${view.length} line${view.length === 1 ? '' : 's'}` : 'Copy failed: select the text and copy it by hand');
}

/** The raw log route streams the whole log from the gateway, whatever its size. */
function downloadAll() {
  const a = document.createElement('a');
  a.href = `${api}/log?download=1&ansi=strip`;
  a.download = `job-${jobId}.log`;
  document.body.appendChild(a);
  a.click();
  a.remove();
  toast('Downloading the full log');
}

for (const button of document.querySelectorAll('[data-filter]')) {
  button.addEventListener('click', () => {
    filter.kind = button.dataset.filter;
    for (const b of document.querySelectorAll('[data-filter]')) b.setAttribute('aria-pressed', String(b === button));
    refilter();
  });
}
$('f-stdout').addEventListener('change', (e) => {
  filter.stdout = e.target.checked;
  refilter();
});
$('f-stderr').addEventListener('change', (e) => {
  filter.stderr = e.target.checked;
  refilter();
});
let searchTimer = null;
$('search').addEventListener('input', (e) => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => {
    filter.needle = e.target.value.toLowerCase();
    refilter();
  }, 150);
});
$('search').addEventListener('keydown', (e) => {
  if (e.key === 'Escape' && e.target.value) {
    e.target.value = '';
    filter.needle = '';
    refilter();
  }
});
$('o-ts').addEventListener('change', (e) => {
  out.classList.toggle('show-ts', e.target.checked);
  if (follow) scrollToBottom();
});
$('o-wrap').addEventListener('change', (e) => {
  out.classList.toggle('wrap', e.target.checked);
  if (follow) scrollToBottom();
});
$('follow').addEventListener('click', () => {
  if (follow) {
    follow = false;
    userPaused = true;
    updateFollow();
  } else {
    jumpToLatest();
  }
});
$('jump').addEventListener('click', jumpToLatest);
$('copy').addEventListener('click', copyVisible);
$('download').addEventListener('click', downloadAll);
$('first-error').addEventListener('click', jumpToFirstError);
vp.addEventListener('keydown', (e) => {
  if (e.key === 'End') {
    e.preventDefault();
    jumpToLatest();
  }
});
document.addEventListener('keydown', (e) => {
  const typing = e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement;
  if (e.key === '/' && !typing && !e.ctrlKey && !e.metaKey && !e.altKey) {
    e.preventDefault();
    $('search').focus();
  }
});
setupTheme($('theme'));

// ---- start ----------------------------------------------------------------------------

async function start() {
  if (!jobId) {
    setConn('ended', 'No job id in the address');
    return;
  }
  // Bounded retries while the gateway is unreachable at page load.
  for (let attempt = 0; ; attempt++) {
    try {
      showJob(await getJson(api));
      break;
    } catch (e) {
      if (e.status === 404 || e.status === 400 || attempt >= 50) {
        $('title').textContent = e.status === 404 ? 'Job not found' : 'Cannot load the job';
        statusBadge($('status'), 'unknown');
        setConn('ended', e.message);
        vp.setAttribute('aria-busy', 'false');
        clearInterval(ticker);
        return;
      }
      setConn('reconnecting', e.message);
      await new Promise((r) => setTimeout(r, Math.min(10_000, 500 * 2 ** attempt)));
    }
  }
  highlight = parseHash(location.hash);
  let tail;
  try {
    if (highlight) {
      // The page around the permalinked line, not what comes before it.
      const from = Math.max(1, highlight[0] - CONTEXT_LINES);
      tail = await getJson(`${api}/events?line=${from}&limit=${PAGE}`);
      newerDone = tail.items.length < PAGE;
      anchorLine = highlight[0];
      // And the page before it, so that sections starting up to a page above the line
      // have their headers (one that starts further up shows its lines unfolded).
      if (tail.items.length && tail.items[0].seq > 1) {
        try {
          const before = await getJson(`${api}/events?beforeSeq=${tail.items[0].seq}&limit=${PAGE}`);
          tail.items = before.items.concat(tail.items);
        } catch {
          // without it: the line's own page, sections above it not known until scrolled to
        }
      }
    } else {
      tail = await getJson(`${api}/events?beforeSeq=${END_SEQ}&limit=${PAGE}`);
    }
  } catch {
    tail = { items: [], jobStatus: job.status, failed: true };
    newerDone = true;
  }
  const items = tail.items;
  olderDone = !tail.failed && (!items.length || items[0].seq <= 1);
  if (items.length && typeof items[0].line !== 'number' && !olderDone) nextLine = items[0].seq;
  prevStage = olderDone ? null : undefined;
  if (items.length) {
    firstSeq = items[0].seq;
    lastSeq = items[items.length - 1].seq;
    lines = linesOf(items, prevStage);
    for (const ev of items) if (ev.payload && typeof ev.payload.stage === 'string') prevStage = ev.payload.stage;
  }
  if (tail.failed) firstSeq = lastSeq = 0; // SSE starts from the beginning instead
  rebuildSections();
  if (highlight) {
    const target = lines.find((l) => l.n >= highlight[0]);
    if (target) openAround(target);
  }
  view = lines.filter(matches);
  if (highlight) {
    follow = false;
    showLine(highlight[0]);
  } else {
    resetWindowToEnd();
  }
  vp.setAttribute('aria-busy', 'false');
  updateFollow();
  setStatus(tail.jobStatus || job.status);
  $('t-events').textContent = String(Math.max(job.lastSeq || 0, lastSeq));
  if (!highlight) fill();
  const last = items[items.length - 1];
  if (!newerDone) return; // the stream starts when the view reaches the end
  if (TERMINAL.has(tail.jobStatus) && last && eventKind(last) === 'status' && TERMINAL.has(last.payload.status)) {
    // Finished, and the tail reaches its final status event: nothing more will come.
    ended = true;
    clearInterval(ticker);
    setConn('ended', 'The job is finished; the output is complete');
    return;
  }
  connectSse();
}

start();
