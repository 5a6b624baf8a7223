"""Drive explorer notebooks in a real JupyterLab + Chromium (Playwright sync API).

Three layers, each usable on its own:
- `ensure_chromium`, `LabServer`, `launch_browser`: the set-up (used by the session fixtures in conftest.py);
- `LabNotebook`: one notebook page: open, run all cells, wait for the kernel, collect console errors, check that no
  widget failed to render and that no cell raised;
- `WidgetView`: one widget output of that notebook: move sliders, pick dropdown values, click buttons, read the
  HTML info text, digest the plotly data and take screenshots, wait until the plot changes.
See README.md for how to add another explorer notebook.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / 'tests' / '_artifacts' / 'browser'
CHROMIUM = Path(os.environ.get('FOLK_NB_CHROMIUM', '/usr/bin/chromium'))
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic']
LAB_START_TIMEOUT = 90      # s, JupyterLab answering /api/status
RUN_ALL_TIMEOUT = 120       # s, a notebook's Run All Cells
UPDATE_TIMEOUT = 30         # s, the kernel redrawing a widget after one interaction
SETTLE_QUIET = 1.5          # s without any change before a widget counts as settled

# Console errors that say nothing about our widgets. Keep this list short and say why each entry is harmless.
BENIGN_CONSOLE = [
    re.compile(r'favicon'),   # a browser may ask for /favicon.ico, JupyterLab serves its own under /static
]


def in_ci() -> bool:
    "True when the CI environment variable says so (then a missing browser is an error, not a skip)."
    return os.environ.get('CI', '').strip().lower() in ('true', '1', 'yes')


# ---------------------------------------------------------------------------------------------------- set-up
def ensure_chromium(path: Path = CHROMIUM, install_timeout: int = 900) -> tuple[Path | None, str]:
    "Return (path, '') when Chromium is there, installing Debian's package as root if needed; else (None, why)."
    if path.is_file() and os.access(path, os.X_OK): return path, ''
    log = ''
    apt = shutil.which('apt-get')
    if apt and hasattr(os, 'geteuid') and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
        try:
            r = subprocess.run(f'{apt} update && {apt} install -y chromium', shell=True, env=env, timeout=install_timeout,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            log = r.stdout[-2000:]
        except subprocess.TimeoutExpired: log = f'apt-get timed out after {install_timeout} s'
        if path.is_file() and os.access(path, os.X_OK): return path, ''
        why = f'{path} is missing and `apt-get install -y chromium` did not provide it:\n{log}'
    else:
        why = (f'{path} is missing and this user cannot install it (needs root and apt-get); '
               'install Debian\'s chromium (`apt-get update && apt-get install -y chromium`) or set FOLK_NB_CHROMIUM')
    return None, why


def free_port() -> int:
    "A TCP port on 127.0.0.1 that nobody listens on right now."
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


# JupyterLab user settings for the tests: every cell in the DOM (no windowing), start the default kernel without the
# kernel-selection dialog (nbdev notebooks carry no kernelspec), never fetch news or check for updates (no internet).
LAB_SETTINGS = {
    '@jupyterlab/notebook-extension/tracker.jupyterlab-settings': {'windowingMode': 'none', 'autoStartDefaultKernel': True},
    '@jupyterlab/apputils-extension/notification.jupyterlab-settings': {'fetchNews': 'false', 'checkForUpdates': False},
}


@dataclass
class LabServer:
    "A JupyterLab server on 127.0.0.1 serving a temporary copy of `notebooks`, with a random token."
    # folder copied into the server's root (the copy gets the autosaved outputs, not nbs/); FOLK_NB_BROWSER_NOTEBOOKS
    # points the tests at another folder (e.g. a notebook being fixed)
    notebooks: Path = field(default_factory=lambda: Path(os.environ.get('FOLK_NB_BROWSER_NOTEBOOKS', REPO / 'nbs')))
    start_timeout: float = LAB_START_TIMEOUT
    port: int = 0
    token: str = ''
    root: Path | None = None
    proc: subprocess.Popen | None = None
    tmp: Path | None = None
    log_path: Path | None = None

    @property
    def base(self) -> str: return f'http://127.0.0.1:{self.port}'

    def url(self, path: str = 'lab') -> str:
        "URL of `path` (e.g. 'lab/tree/NAME.ipynb') with the token."
        return f'{self.base}/{path.lstrip("/")}?token={self.token}'

    def start(self) -> 'LabServer':
        "Copy the notebooks, start `jupyter lab` and wait until it answers."
        self.tmp = Path(tempfile.mkdtemp(prefix='folk_nb_lab_'))
        self.root = self.tmp / 'nbs'
        shutil.copytree(self.notebooks, self.root, ignore=shutil.ignore_patterns('.ipynb_checkpoints', '__pycache__'))
        for name, value in LAB_SETTINGS.items(): _write_json(self.tmp / 'lab-settings' / name, value)
        env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(self.tmp / 'lab-settings'),
                   JUPYTERLAB_WORKSPACES_DIR=str(self.tmp / 'workspaces'), JUPYTER_CONFIG_DIR=str(self.tmp / 'config'),
                   JUPYTER_RUNTIME_DIR=str(self.tmp / 'runtime'), IPYTHONDIR=str(self.tmp / 'ipython'),
                   JUPYTER_PLATFORM_DIRS='1', PYTHONUNBUFFERED='1')
        self.port, self.token = free_port(), secrets.token_hex(24)
        cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ip=127.0.0.1', f'--port={self.port}',
               '--ServerApp.port_retries=0', f'--IdentityProvider.token={self.token}',
               f'--ServerApp.root_dir={self.root}', '--ServerApp.open_browser=False',
               '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate', '--LabApp.news_url=',
               '--LabApp.extension_manager=readonly', '--ServerApp.terminals_enabled=False']
        if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')   # containers and CI run as root
        self.log_path = self.tmp / 'jupyterlab.log'
        self._log = open(self.log_path, 'w')
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f'jupyter lab exited with code {self.proc.returncode}:\n{self.log_tail()}'
                self.stop()
                raise RuntimeError(msg)
            try:
                with urllib.request.urlopen(f'{self.base}/api/status?token={self.token}', timeout=5) as r:
                    if r.status == 200: return self
            except (urllib.error.URLError, ConnectionError, socket.timeout): pass
            time.sleep(0.5)
        msg = f'jupyter lab did not answer on {self.base} within {self.start_timeout:.0f} s:\n{self.log_tail()}'
        self.stop()
        raise TimeoutError(msg)

    def api(self, path: str, method: str = 'GET'):
        "Call the server's REST API; the decoded JSON answer (None when empty)."
        req = urllib.request.Request(f'{self.base}/api/{path}', method=method,
                                     headers={'Authorization': f'token {self.token}'})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self, notebook: str):
        "Delete the sessions (and so the kernels) of `notebook`."
        try:
            for sess in self.api('sessions'):
                if sess.get('path') == notebook: self.api(f'sessions/{sess["id"]}', method='DELETE')
        except (urllib.error.URLError, ConnectionError, socket.timeout, ValueError): pass

    def log_tail(self, n: int = 4000) -> str:
        "The end of the server's log (for failure messages)."
        try: return self.log_path.read_text(errors='replace')[-n:]
        except (OSError, AttributeError): return ''

    def stop(self):
        "Shut the server down (REST shutdown, then terminate, then kill) and remove the temporary folder."
        if self.proc is not None and self.proc.poll() is None:
            try:   # polite: the server shuts its kernels down
                req = urllib.request.Request(f'{self.base}/api/shutdown?token={self.token}', method='POST', data=b'')
                urllib.request.urlopen(req, timeout=5).close()
            except (urllib.error.URLError, ConnectionError, socket.timeout): pass
            for stop in (None, self.proc.terminate, self.proc.kill):
                if stop is not None: stop()
                try: self.proc.wait(timeout=10); break
                except subprocess.TimeoutExpired: continue
        if getattr(self, '_log', None): self._log.close()
        if self.tmp is not None:
            if ARTIFACTS.is_dir() and self.log_path and self.log_path.exists():
                shutil.copy(self.log_path, ARTIFACTS / 'jupyterlab.log')
            shutil.rmtree(self.tmp, ignore_errors=True)


def launch_browser(playwright, executable: Path, user_data_dir: Path, viewport=(1400, 1400)):
    "A headless Debian Chromium (persistent context in a fresh profile folder) that may only reach 127.0.0.1."
    ctx = playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=str(executable), headless=True, args=CHROMIUM_ARGS,
        viewport={'width': viewport[0], 'height': viewport[1]}, accept_downloads=False)
    ctx.external_requests = []

    def guard(route):   # anything not on 127.0.0.1 is recorded and refused: the tests run offline
        host = urlparse(route.request.url).hostname
        if host == '127.0.0.1': return route.continue_()
        ctx.external_requests.append(route.request.url)
        return route.abort()
    ctx.route(re.compile(r'^(?!https?://127\.0\.0\.1[:/])'), guard)
    return ctx


# ---------------------------------------------------------------------------------------------------- notebook page
PANEL = '.jp-NotebookPanel:not(.lm-mod-hidden)'   # the notebook on show (each LabNotebook has its own workspace)
CELLS_JS = """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell')].map(c => ({
    prompt: (c.querySelector('.jp-InputArea-prompt') || {}).textContent || '',
    source: ((c.querySelector('.cm-content') || {}).textContent || '').trim().length}))"""


# Records the length of one trace in plots identified by a subplot title, whenever it changes: hooked on plotly's
# redraw events (so no update is missed while a cell keeps the kernel busy) and polled every 25 ms as well.
RECORD_JS = """([key, title, trace]) => {
    const store = (window.__folkRecords = window.__folkRecords || {});
    const rec = store[key] = {lengths: []};
    const plots = [];
    const length = (gd) => { const t = (gd.data || []).find(d => d.name === trace); return t && t.x ? (t.x.length || 0) : 0; };
    const check = () => {
        for (const gd of document.querySelectorAll('""" + PANEL + """ .js-plotly-plot')) {
            if (!gd.layout || !(gd.layout.annotations || []).some(a => a.text === title)) continue;
            let i = plots.indexOf(gd);
            if (i < 0) { i = plots.push(gd) - 1; rec.lengths.push([]); }
            if (gd.on && !gd['__folk_' + key]) {   // plotly has set the plot up: hook its redraw events once
                gd['__folk_' + key] = true;
                for (const ev of ['plotly_afterplot', 'plotly_restyle', 'plotly_update', 'plotly_redraw']) gd.on(ev, check);
            }
            const n = length(gd), seen = rec.lengths[i];
            if (seen[seen.length - 1] !== n) seen.push(n);
        }
    };
    check();
    rec.timer = setInterval(check, 25);
}"""


class LabNotebook:
    "One notebook opened in JupyterLab, with its console errors collected from the moment the page opens."
    def __init__(self, context, server: LabServer, name: str, artifacts: Path = ARTIFACTS):
        self.server, self.name, self.stem = server, name, Path(name).stem
        self.artifacts = artifacts
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.console_errors: list[str] = []
        self.page = context.new_page()
        self.page.set_default_timeout(UPDATE_TIMEOUT * 1000)
        self.page.on('console', self._on_console)
        self.page.on('pageerror', lambda e: self.console_errors.append(f'pageerror: {e}'))
        self.external = context.external_requests
        self.timings: dict[str, float] = {}   # seconds per phase, written next to the screenshots

    def _on_console(self, msg):
        if msg.type != 'error': return
        loc = msg.location or {}
        text = f"console.error: {msg.text} ({loc.get('url', '')}:{loc.get('lineNumber', '')})"
        if not any(p.search(text) for p in BENIGN_CONSOLE): self.console_errors.append(text)

    def open(self) -> 'LabNotebook':
        "Load lab/tree/NAME and wait until the notebook's cells and its kernel are there."
        # a fresh workspace per page: JupyterLab must not restore notebooks that earlier tests opened
        workspace = f'test-{re.sub(r"[^A-Za-z0-9]+", "-", self.stem)}-{secrets.token_hex(4)}'
        t0 = time.monotonic()
        self.page.goto(self.server.url(f'lab/workspaces/{workspace}/tree/{self.name}'), wait_until='domcontentloaded',
                       timeout=60_000)
        self.page.locator(f'{PANEL} .jp-Notebook .jp-Cell').first.wait_for(state='attached', timeout=60_000)
        self._accept_kernel_dialog()
        self.wait_kernel_idle(timeout=60)
        self.timings['open'] = round(time.monotonic() - t0, 1)
        return self

    def _accept_kernel_dialog(self):
        dialog = self.page.locator('.jp-Dialog')   # only if a kernel-selection dialog shows after all
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        try: dialog.wait_for(state='visible', timeout=2000)
        except PlaywrightTimeout: return
        dialog.locator('.jp-mod-accept').click()

    def kernel_status(self) -> str:
        "The notebook toolbar's execution indicator status ('idle', 'busy', ...), '' when absent."
        ind = self.page.locator(f'{PANEL} .jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator')
        return (ind.first.get_attribute('data-status') or '') if ind.count() else ''

    def kernel_name(self) -> str:
        "The kernel shown in the notebook toolbar ('No Kernel' until one is started)."
        loc = self.page.locator(f'{PANEL} .jp-NotebookPanel-toolbar .jp-Toolbar-kernelName')
        return loc.first.inner_text().strip() if loc.count() else ''

    def wait_kernel_idle(self, timeout: float = 60):
        "Wait until a kernel is attached and reports idle (the indicator says 'idle' before any kernel exists)."
        deadline = time.monotonic() + timeout
        while (status := self.kernel_status()) != 'idle' or self.kernel_name() in ('', 'No Kernel'):
            if time.monotonic() > deadline:
                raise TimeoutError(f'{self.name}: kernel not idle after {timeout:.0f} s '
                                   f'(kernel {self.kernel_name()!r}, status {status!r})')
            self.page.wait_for_timeout(250)

    def cells(self) -> list[dict]:
        "Prompt text and source length of every code cell."
        return self.page.evaluate(CELLS_JS)

    def code_cell_index(self, contains: str) -> int:
        "Index (among the code cells) of the first code cell whose source contains `contains`."
        i = self.page.evaluate("""(text) => [...document.querySelectorAll('""" + PANEL + """ .jp-Notebook .jp-CodeCell')]
            .findIndex(c => ((c.querySelector('.cm-content') || {}).textContent || '').includes(text))""", contains)
        if i < 0: raise LookupError(f'{self.name}: no code cell contains {contains!r}')
        return i

    def select_code_cells(self, first: int, last: int | None = None):
        "Make code cell `first` the active cell (a click on its input prompt); with `last`, select up to that one too."
        cells = self.page.locator(f'{PANEL} .jp-Notebook .jp-CodeCell')
        cells.nth(first).locator('.jp-InputPrompt').click()
        if last is not None and last != first: cells.nth(last).locator('.jp-InputPrompt').click(modifiers=['Shift'])

    def _run_menu(self, item):
        "Click Run > `item` (the label, or a compiled pattern of it)."
        self.page.locator('.lm-MenuBar-itemLabel', has_text=re.compile(r'^Run$')).click()
        label = item if isinstance(item, re.Pattern) else re.compile(rf'^{re.escape(item)}$')
        self.page.locator('.lm-Menu-itemLabel', has_text=label).click()

    def _wait_ran(self, first: int, stop: int | None, deadline: float, timeout: float, what: str):
        "Wait until code cell `first` has its number, none is pending and the kernel is idle; fail on errors or skipped cells."
        while True:
            cells = self.cells()
            pending = [c for c in cells if '*' in c['prompt']]
            if (len(cells) > first and re.search(r'\[\d+\]', cells[first]['prompt']) and not pending
                    and self.kernel_status() == 'idle'):
                break
            if time.monotonic() > deadline:
                self.screenshot('timeout')
                numbered = [c for c in cells if re.search(r'\[\d+\]', c['prompt'])]
                raise TimeoutError(f'{self.name}: {what} not finished after {timeout:.0f} s '
                                   f'({len(numbered)} of {len(cells)} code cells ran, {len(pending)} pending)')
            self.page.wait_for_timeout(300)
        self.assert_clean()
        missed = [i for i, c in enumerate(cells[:stop]) if i >= first and c['source'] and not re.search(r'\[\d+\]', c['prompt'])]
        assert not missed, f'{self.name}: code cells {missed} did not run (prompts: {[cells[i]["prompt"] for i in missed]})'

    def run_all(self, timeout: float = RUN_ALL_TIMEOUT, pauses: tuple = ()) -> float:
        """Run > Run All Cells, wait until every cell ran (or one raised) and the kernel is idle; return seconds taken.
        `pauses`: (text, callback) pairs, in notebook order, to run as a reader does who looks at a widget before running
        the cell that drives it: the cells above the first code cell containing text, callback(), on to the next, ..."""
        t0 = time.monotonic()
        deadline, start = t0 + timeout, 0
        for text, callback in pauses:
            k = self.code_cell_index(text)
            if k <= start and start: raise ValueError(f'{self.name}: pause {text!r} (code cell {k}) is not after code cell {start}')
            if start == 0:
                self.select_code_cells(k)
                self._run_menu('Run All Above Selected Cell')
            else:
                self.select_code_cells(start, k - 1)
                self._run_menu(re.compile(r'^Run Selected Cells?$'))
            self._wait_ran(start, k, deadline, timeout, f'running code cells {start} to {k - 1}')
            callback()
            start = k
        if start == 0: self._run_menu('Run All Cells')
        else:
            self.select_code_cells(start)
            self._run_menu('Run Selected Cell and All Below')
        self._wait_ran(start, None, deadline, timeout, 'Run All' if start == 0 else f'running code cell {start} and below')
        self.timings['run_all'] = round(time.monotonic() - t0, 1)
        return time.monotonic() - t0

    def record_trace_lengths(self, key: str, subplot_title: str, trace_name: str):
        "From now on, record each change of the length of trace `trace_name` in every plot showing `subplot_title`."
        self.page.evaluate(RECORD_JS, [key, subplot_title, trace_name])

    def recorded(self, key: str) -> list[list[int]]:
        "The lengths `record_trace_lengths` saw, per plot (in page order): one list of successive lengths each."
        return self.page.evaluate('(key) => window.__folkRecords[key].lengths', key)

    def problems(self) -> list[str]:
        "What is wrong on the page now: widget render errors, tracebacks, console errors, requests off 127.0.0.1."
        out = []
        n = self.page.locator('.jp-OutputArea-output', has_text='Error displaying widget').count()
        if n: out.append(f'{n} output(s) show "Error displaying widget"')
        for t in self.page.locator('.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts():
            if 'Traceback' in t or re.search(r'^\w+(Error|Exception)\b', t, re.M): out.append(f'error output:\n{t[-1500:]}')
        out += self.console_errors
        out += [f'request off 127.0.0.1: {u}' for u in self.external]
        return out

    def assert_clean(self):
        "Fail (with a screenshot) when `problems` finds anything."
        probs = self.problems()
        if probs:
            self.screenshot('problems')
            raise AssertionError(f'{self.name}: ' + '\n'.join(probs))

    def widget(self, has: str, has_text: str | None = None, timeout: float = 60, has_not_text: str | None = None) -> 'WidgetView':
        "The (last) output area holding a rendered widget that contains the CSS selector `has` (and the text `has_text`, not `has_not_text`)."
        out = self.page.locator(f'{PANEL} .jp-OutputArea-output').filter(has=self.page.locator(has))
        if has_text is not None: out = out.filter(has_text=has_text)
        if has_not_text is not None: out = out.filter(has_not_text=has_not_text)
        out = out.last
        out.wait_for(state='visible', timeout=timeout * 1000)
        out.locator(has).first.wait_for(state='visible', timeout=timeout * 1000)
        return WidgetView(self, out)

    def screenshot(self, step: str, locator=None) -> Path:
        "Write tests/_artifacts/browser/<notebook>-<step>.png (the whole page, or only `locator`)."
        path = self.artifacts / f'{self.stem}-{step}.png'
        if locator is not None: self.page.mouse.move(0, 0)   # plotly shows its mode bar under the mouse: not in the picture
        (locator or self.page).screenshot(path=str(path), animations='disabled')   # transitions (the bar fading) finished
        return path

    def close(self):
        "Close the page and shut the notebook's kernel down (it would hold its memory until the server stops)."
        (self.artifacts / f'{self.stem}-timings.json').write_text(json.dumps(self.timings, indent=1))
        self.page.close()
        self.server.shutdown_kernels(self.name)


# ---------------------------------------------------------------------------------------------------- one widget
PLOT_DIGEST_JS = """(el) => {
    const gd = el.classList.contains('js-plotly-plot') ? el : el.querySelector('.js-plotly-plot');
    if (!gd || !gd.data) return null;
    let h = 2166136261 >>> 0;
    const feed = (s) => { for (let i = 0; i < s.length; i++) { h ^= s.charCodeAt(i); h = Math.imul(h, 16777619) >>> 0; } };
    const walk = (v) => {
        if (v === null || v === undefined) { feed('~'); return; }
        if (ArrayBuffer.isView(v)) { feed('<'); for (const x of v) feed(x + ','); feed('>'); return; }
        if (Array.isArray(v)) { feed('['); v.forEach(walk); feed(']'); return; }
        if (typeof v === 'object') { for (const k of Object.keys(v).sort()) if (!k.startsWith('_')) { feed(k + ':'); walk(v[k]); } return; }
        feed(String(v) + ';');
    };
    walk(gd.data);
    return {digest: h.toString(16), traces: gd.data.length,
            drawn: gd.querySelectorAll('.imagelayer image, .heatmaplayer image, .hm image, image').length};
}"""


DECODE_JS = """
    const DT = {int8: Int8Array, uint8: Uint8Array, int16: Int16Array, uint16: Uint16Array, int32: Int32Array,
                uint32: Uint32Array, float32: Float32Array, float64: Float64Array};
    const decode = (v) => {   // plotly's {dtype, bdata: base64, shape} arrays, if not decoded yet
        const raw = atob(v.bdata), bytes = new Uint8Array(raw.length);
        for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
        return new DT[v.dtype](bytes.buffer);
    };"""


TRACE_VALUES_JS = """(el, [index, key]) => {""" + DECODE_JS + """
    let count = 0, sum = 0, min = Infinity, max = -Infinity;
    const walk = (v) => {
        if (v === null || v === undefined) return;
        if (typeof v === 'number' || typeof v === 'boolean') { const x = +v; count++; sum += x; min = Math.min(min, x); max = Math.max(max, x); return; }
        if (ArrayBuffer.isView(v) || Array.isArray(v)) { for (const x of v) walk(x); return; }
        if (typeof v === 'object' && v.bdata !== undefined) { walk(decode(v)); return; }
    };
    walk(el.data[index][key]);
    return {count, sum, min, max};
}"""


TRACE_DATA_JS = """(el, [index, key]) => {""" + DECODE_JS + """
    const plain = (v) => {
        if (v === null || v === undefined) return null;
        if (ArrayBuffer.isView(v)) return Array.from(v);
        if (Array.isArray(v)) return v.map(plain);
        if (typeof v === 'object' && v.bdata !== undefined) return Array.from(decode(v));
        return v;
    };
    return plain(el.data[index][key]);
}"""


@dataclass
class WidgetView:
    "A rendered widget inside one output area; every method acts through the browser, like a user."
    nb: LabNotebook
    root: object                     # playwright Locator of the output area
    shots: list = field(default_factory=list)

    @property
    def page(self): return self.nb.page

    def _labelled(self, kind: str, description: str):
        label = self.page.locator('.widget-label').filter(has_text=re.compile(rf'^\s*{re.escape(description)}\s*$'))
        loc = self.root.locator(kind).filter(has=label)
        if loc.count() != 1:
            raise LookupError(f'{self.nb.name}: expected one {kind} labelled {description!r}, found {loc.count()}')
        return loc

    def slider(self, description: str):
        "The `.widget-slider` whose label is `description`."
        return self._labelled('.widget-slider', description)

    def readout(self, description: str) -> str:
        "The slider's value as displayed."
        return self.slider(description).locator('.widget-readout').inner_text().strip()

    def move_slider(self, description: str, steps: int) -> tuple[str, str]:
        "Press ArrowRight (steps > 0) or ArrowLeft on the slider handle; mouse drag if the keys did nothing."
        s = self.slider(description)
        before = self.readout(description)
        handle = s.locator('.noUi-handle').first
        handle.focus()
        for _ in range(abs(steps)):
            handle.press('ArrowRight' if steps > 0 else 'ArrowLeft')
            self.page.wait_for_timeout(50)
        if self.readout(description) == before:   # fallback: drag the handle a quarter of the track
            box, track = handle.bounding_box(), s.locator('.noUi-target').bounding_box()
            x, y = box['x'] + box['width'] / 2, box['y'] + box['height'] / 2
            self.page.mouse.move(x, y); self.page.mouse.down()
            self.page.mouse.move(x + (1 if steps > 0 else -1) * track['width'] / 4, y, steps=8); self.page.mouse.up()
        after = self.readout(description)
        assert after != before, f'{self.nb.name}: slider {description!r} did not move (readout stayed {before})'
        return before, after

    def dropdown(self, description: str):
        "The `<select>` of the dropdown labelled `description`."
        return self._labelled('.widget-dropdown', description).locator('select')

    def select(self, description: str, label: str) -> str:
        "Pick the option shown as `label` in the dropdown `description`; return the previous option."
        sel = self.dropdown(description)
        texts = [t.replace('\xa0', ' ') for t in sel.evaluate('s => [...s.options].map(o => o.text)')]  # ipywidgets: nbsp
        if label not in texts: raise LookupError(f'{self.nb.name}: dropdown {description!r} has no option {label!r} ({texts})')
        before = sel.evaluate('s => s.selectedIndex')
        sel.select_option(index=texts.index(label))
        return texts[before] if before >= 0 else ''

    def click(self, description: str):
        "Click the button whose text is `description`."
        self.root.locator('button.widget-button', has_text=re.compile(rf'^\s*{re.escape(description)}\s*$')).click()

    def toggle(self, description: str) -> bool:
        "Click the checkbox whose description is `description`; return its new state."
        box = self.root.locator('.widget-checkbox', has_text=description).locator('input[type=checkbox]')
        if box.count() != 1: raise LookupError(f'{self.nb.name}: expected one checkbox {description!r}, found {box.count()}')
        box.click()
        return box.is_checked()

    def fill(self, description: str, text: str):
        "Type `text` into the text field labelled `description` (replacing what it held)."
        self._labelled('.widget-text', description).locator('input').fill(text)

    def upload(self, description: str, name: str, content: bytes, mime: str = 'application/octet-stream'):
        "Click the upload button `description` and pick a file `name` holding `content` in the file chooser."
        button = self.root.locator('button.widget-upload', has_text=description)
        with self.page.expect_file_chooser() as chooser:
            button.click()
        chooser.value.set_files(files=[{'name': name, 'mimeType': mime, 'buffer': content}])

    def wait_text(self, contains: str, what: str, timeout: float = UPDATE_TIMEOUT) -> str:
        "Wait until one of the widget's HTML outputs shows `contains`; return that text."
        deadline = time.monotonic() + timeout
        while not (text := self.html_text(contains)):
            if time.monotonic() > deadline:
                self.screenshot('no-text-' + re.sub(r'\W+', '-', what).strip('-'))
                raise AssertionError(f'{self.nb.name}: no {contains!r} in the widget within {timeout:.0f} s after {what} '
                                     f'(texts {self.root.locator(".widget-html").all_inner_texts()})')
            self.page.wait_for_timeout(200)
        return text

    def selected(self, description: str) -> str:
        "The option the dropdown `description` shows ('' when it shows none)."
        return self.dropdown(description).evaluate("s => s.selectedIndex < 0 ? '' : s.options[s.selectedIndex].text").replace('\xa0', ' ')

    def html_text(self, contains: str) -> str:
        "Text of the `.widget-html` output that contains `contains` ('' when none)."
        loc = self.root.locator('.widget-html', has_text=contains)
        return loc.first.inner_text().strip() if loc.count() else ''

    def plot(self):
        "Locator of the (first) plotly graph inside the widget."
        return self.root.locator('.js-plotly-plot').first

    def plot_state(self) -> dict:
        "{'digest': hash of the plotly `data` (all traces), 'traces': count, 'drawn': <image> elements drawn}."
        state = self.plot().evaluate(PLOT_DIGEST_JS)
        assert state is not None, f'{self.nb.name}: no plotly data on the .js-plotly-plot element'
        return state

    def trace_values(self, index: int, key: str = 'z') -> dict:
        "{'count', 'sum', 'min', 'max'} of the numbers in `data[index][key]` of the plotly graph, as the browser holds them."
        return self.plot().evaluate(TRACE_VALUES_JS, [index, key])

    def trace_data(self, index: int, key: str):
        "`data[index][key]` of the plotly graph as the browser holds it: arrays as (nested) lists, else the raw value."
        return self.plot().evaluate(TRACE_DATA_JS, [index, key])

    def plot_pixels(self) -> bytes:
        "A PNG of the plot as drawn now."
        return self.plot().screenshot()

    def snapshot(self) -> dict:
        "Everything the tests compare: plotly data digest, plot pixels, all HTML texts."
        return dict(state=self.plot_state(), pixels=self.plot_pixels(),
                    texts=self.root.locator('.widget-html').all_inner_texts())

    def wait_changed(self, before: dict, what: str, text: str | None = None, text_changed: bool = False,
                     timeout: float = UPDATE_TIMEOUT) -> dict:
        "Wait until the plotly data differs from `before` (and the HTML texts contain `text` / differ); new snapshot."
        def done():
            if self.plot_state()['digest'] == before['state']['digest']: return False
            texts = self.root.locator('.widget-html').all_inner_texts()
            if text is not None and not any(text in t for t in texts): return False
            return not text_changed or texts != before['texts']
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                self.screenshot('unchanged-' + re.sub(r'\W+', '-', what).strip('-'))
                raise AssertionError(f'{self.nb.name}: the widget did not change within {timeout:.0f} s after {what} '
                                     f'(plot digest {self.plot_state()["digest"]}, texts {self.root.locator(".widget-html").all_inner_texts()})')
            self.page.wait_for_timeout(200)
        return self.settle()

    def settle(self, quiet: float = SETTLE_QUIET, timeout: float = UPDATE_TIMEOUT) -> dict:
        "Wait until plot data and texts stay unchanged for `quiet` seconds (a moved slider sends several updates)."
        state = lambda: (self.plot_state()['digest'], self.root.locator('.widget-html').all_inner_texts())
        deadline, last, since = time.monotonic() + timeout, state(), time.monotonic()
        while time.monotonic() - since < quiet:
            if time.monotonic() > deadline:
                raise AssertionError(f'{self.nb.name}: the widget kept changing for {timeout:.0f} s')
            self.page.wait_for_timeout(200)
            if (now := state()) != last: last, since = now, time.monotonic()
        return self.snapshot()

    def screenshot(self, step: str) -> Path:
        "Screenshot of this widget's output area into the artifacts folder."
        path = self.nb.screenshot(step, locator=self.root)
        self.shots.append(path)
        return path
