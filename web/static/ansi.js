// Terminal text -> safe DOM: ANSI SGR colours become spans, every other escape
// sequence is dropped, carriage-return progress lines keep what a terminal would show.
// Text only ever reaches the DOM through textContent / Text nodes, never innerHTML.

// CSI (ESC [ ... final byte), OSC (ESC ] ... BEL or ESC \), and any other two-byte
// escape. The 8-bit CSI (U+009B) is accepted too.
const ESCAPES = /(?:\x1b\[|\x9b)([0-?]*)[ -/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?/g;

/** What a terminal shows for one line: the text after its last carriage return. */
export function collapseCarriageReturns(line) {
  let end = line.length;
  while (end > 0 && line.charCodeAt(end - 1) === 13) end--; // "text\r\n" endings
  const text = end === line.length ? line : line.slice(0, end);
  const cr = text.lastIndexOf('\r');
  return cr < 0 ? text : text.slice(cr + 1);
}

const SGR = /(?:\x1b\[|\x9b)([0-9;:]*)m/g;

/**
 * The SGR sequences still in force at the end of `line` (those after its last reset),
 * so the next line of the same output can start with the colours a terminal would
 * still be using. Empty when nothing is in force.
 */
export function sgrCarry(line, carry = '') {
  if (line.indexOf('\x1b') < 0 && line.indexOf('\x9b') < 0) return carry;
  SGR.lastIndex = 0;
  for (let m; (m = SGR.exec(line)); ) {
    if (m[1] === '' || m[1] === '0' || m[1] === '00') carry = '';
    else carry += m[0];
  }
  return carry;
}

/** A line without any escape sequence (for search, copy and download). */
export function stripAnsi(line) {
  return line.indexOf('\x1b') < 0 && line.indexOf('\x9b') < 0 ? line : line.replace(ESCAPES, '');
}

const BASIC = ['black', 'red', 'green', 'yellow', 'blue', 'magenta', 'cyan', 'white'];

function xterm256(n) {
  if (n < 16) return null; // a class, so the theme picks it
  if (n < 232) {
    n -= 16;
    const level = (v) => (v === 0 ? 0 : 55 + v * 40);
    return `rgb(${level(Math.floor(n / 36))},${level(Math.floor(n / 6) % 6)},${level(n % 6)})`;
  }
  const grey = 8 + (n - 232) * 10;
  return `rgb(${grey},${grey},${grey})`;
}

function colourFrom(params, i) {
  // 38;5;n or 38;2;r;g;b -> [css class or null, css colour or null, params consumed]
  if (params[i + 1] === 5 && params[i + 2] !== undefined) {
    const n = params[i + 2] & 255;
    if (n < 16) return [(n < 8 ? '' : 'bright-') + BASIC[n % 8], null, 3];
    return [null, xterm256(n), 3];
  }
  if (params[i + 1] === 2 && params[i + 4] !== undefined) {
    const [r, g, b] = params.slice(i + 2, i + 5).map((v) => v & 255);
    return [null, `rgb(${r},${g},${b})`, 5];
  }
  return [null, null, 1];
}

function applySgr(state, text) {
  const params = text === '' ? [0] : text.split(/[;:]/).map((p) => (p === '' ? 0 : Number(p)));
  for (let i = 0; i < params.length; i++) {
    const p = params[i];
    if (p === 0) Object.assign(state, { fg: null, fgRgb: null, bg: null, bgRgb: null, bold: false, dim: false, italic: false, underline: false, inverse: false });
    else if (p === 1) state.bold = true;
    else if (p === 2) state.dim = true;
    else if (p === 3) state.italic = true;
    else if (p === 4) state.underline = true;
    else if (p === 7) state.inverse = true;
    else if (p === 22) state.bold = state.dim = false;
    else if (p === 23) state.italic = false;
    else if (p === 24) state.underline = false;
    else if (p === 27) state.inverse = false;
    else if (p >= 30 && p <= 37) [state.fg, state.fgRgb] = [BASIC[p - 30], null];
    else if (p >= 90 && p <= 97) [state.fg, state.fgRgb] = ['bright-' + BASIC[p - 90], null];
    else if (p === 39) [state.fg, state.fgRgb] = [null, null];
    else if (p >= 40 && p <= 47) [state.bg, state.bgRgb] = [BASIC[p - 40], null];
    else if (p >= 100 && p <= 107) [state.bg, state.bgRgb] = ['bright-' + BASIC[p - 100], null];
    else if (p === 49) [state.bg, state.bgRgb] = [null, null];
    else if (p === 38 || p === 48) {
      const [cls, rgb, used] = colourFrom(params, i);
      if (p === 38) [state.fg, state.fgRgb] = [cls, rgb];
      else [state.bg, state.bgRgb] = [cls, rgb];
      i += used - 1;
    }
  }
}

function styled(state) {
  return state.fg || state.fgRgb || state.bg || state.bgRgb || state.bold || state.dim || state.italic || state.underline || state.inverse;
}

/**
 * Splits one line (already carriage-return collapsed) into `[text, state|null]` runs.
 * Non-SGR escapes are dropped.
 */
export function parseAnsi(line) {
  if (line.indexOf('\x1b') < 0 && line.indexOf('\x9b') < 0) return [[line, null]];
  const runs = [];
  const state = {};
  applySgr(state, '0');
  let last = 0;
  ESCAPES.lastIndex = 0;
  for (let m; (m = ESCAPES.exec(line)); ) {
    if (m.index > last) runs.push([line.slice(last, m.index), styled(state) ? { ...state } : null]);
    if (m[2] === 'm') applySgr(state, m[1]);
    last = ESCAPES.lastIndex;
    if (m[0] === '') ESCAPES.lastIndex++; // never loop on an empty match
  }
  if (last < line.length) runs.push([line.slice(last), styled(state) ? { ...state } : null]);
  return runs;
}

/**
 * Appends one run to `parent` as a span (or a bare text node when unstyled), wrapping
 * the parts that match `needle` (lowercase) in <mark>.
 */
export function appendRun(parent, text, state, needle) {
  let target = parent;
  if (state) {
    const span = document.createElement('span');
    const cls = [];
    let fg = state.fg, bg = state.bg, fgRgb = state.fgRgb, bgRgb = state.bgRgb;
    if (state.inverse) [fg, bg, fgRgb, bgRgb] = [bg || 'inverse-fg', fg || 'inverse-bg', bgRgb, fgRgb];
    if (fg) cls.push('fg-' + fg);
    if (bg) cls.push('bg-' + bg);
    if (state.bold) cls.push('ansi-bold');
    if (state.dim) cls.push('ansi-dim');
    if (state.italic) cls.push('ansi-italic');
    if (state.underline) cls.push('ansi-underline');
    if (cls.length) span.className = cls.join(' ');
    if (fgRgb) span.style.color = fgRgb;
    if (bgRgb) span.style.backgroundColor = bgRgb;
    parent.appendChild(span);
    target = span;
  }
  if (!needle) {
    target.appendChild(document.createTextNode(text));
    return 0;
  }
  const lower = text.toLowerCase();
  let at = 0;
  let hits = 0;
  for (let i = lower.indexOf(needle); i >= 0; i = lower.indexOf(needle, i + needle.length)) {
    if (i > at) target.appendChild(document.createTextNode(text.slice(at, i)));
    const mark = document.createElement('mark');
    mark.textContent = text.slice(i, i + needle.length);
    target.appendChild(mark);
    at = i + needle.length;
    hits++;
  }
  if (at < text.length) target.appendChild(document.createTextNode(text.slice(at)));
  return hits;
}
