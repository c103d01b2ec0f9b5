// Shared by the job list and the job page: theme toggle, status and time formatting.

export const TERMINAL = new Set(['succeeded', 'failed', 'cancelled', 'dead_letter']);

const THEME_KEY = 'eventgate.theme';
const THEMES = ['auto', 'light', 'dark'];

/** Light/dark follows prefers-color-scheme unless the user picked one (remembered). */
export function setupTheme(button) {
  let theme = 'auto';
  try {
    theme = localStorage.getItem(THEME_KEY) || 'auto';
  } catch {
    // storage can be disabled; the toggle still works for this page
  }
  const apply = () => {
    if (theme === 'auto') delete document.documentElement.dataset.theme;
    else document.documentElement.dataset.theme = theme;
    button.textContent = 'Theme: ' + theme;
    button.setAttribute('aria-label', `Colour theme: ${theme}. Change theme`);
  };
  button.addEventListener('click', () => {
    theme = THEMES[(THEMES.indexOf(theme) + 1) % THEMES.length];
    try {
      localStorage.setItem(THEME_KEY, theme);
    } catch {
      // see above
    }
    apply();
  });
  apply();
}

/** A status badge (text plus a colour class per status). */
export function statusBadge(el, status) {
  el.textContent = status || 'unknown';
  el.className = 'badge status-' + (status || 'unknown');
}

export function formatTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return d.toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'medium' });
}

/** Clock time with milliseconds, for log timestamps. */
export function formatClock(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '';
  const p = (n, w = 2) => String(n).padStart(w, '0');
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

export function formatDuration(ms) {
  if (!(ms >= 0)) return '—';
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${(ms / 1000).toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** The duration of a job so far (or in total once finished). */
export function jobDuration(job, now = Date.now()) {
  if (!job || !job.startedAt) return null;
  const start = Date.parse(job.startedAt);
  const end = job.finishedAt ? Date.parse(job.finishedAt) : now;
  return end - start;
}

export async function getJson(url, options) {
  const res = await fetch(url, { cache: 'no-store', ...options });
  if (!res.ok) {
    let code = String(res.status);
    try {
      code = (await res.json()).error || code;
    } catch {
      // not JSON
    }
    const err = new Error(`${url}: ${code}`);
    err.status = res.status;
    throw err;
  }
  return res.json();
}
