"""OHIF time to first image (issue 13): a 300-slice CT opened in the same OHIF build on ours and on Orthanc.

    python -m bench.ohif [--slices 300] [--size 512] [--runs 3] [--links loopback,throttled]
                         [--rate-mbit 10] [--latency-ms 50] [--no-warm] [--skip-orthanc] [--keep]

- **Study**: ``bench.generate_ct`` (300 slices of 512×512, 16-bit, explicit VR little endian), generated once under
  bench/out/ and sent with DCMTK's storescu (2 associations) to both systems, then checked on DICOMweb.
- **Ours**: ``pacs serve`` embedded (SQLite, file storage, workers in-process) with ``PACS_OHIF_DIR`` pointing at
  the OHIF build the project installs (``pacs viewer install-ohif``, tests/support/ohif.py's cached install). It
  serves OHIF itself under /ohif/; the browser carries an API token (``pacs token create``, role radiologist) in
  sessionStorage, where the sign-in page leaves it, so the sign-in page is not part of the measurement.
- **Orthanc**: Debian's 1.10.1 with its DICOMweb plugin (1.7), started by the bench on free ports. The *same* OHIF
  files — the same app-config.js byte for byte, so the same OHIF options — are served by a small front server of
  this module (a child process: Starlette + uvicorn, the same static-file code and security headers as ours,
  precompressed assets and cache headers included), which proxies /dicom-web/ to Orthanc's /dicom-web/ on the same
  origin (no CORS; the bench's placeholder token is stripped before Orthanc; Orthanc's own answers, gzip included,
  pass through unchanged). The plugin (1.7) has no ``/thumbnail``: the front answers OHIF's thumbnail requests
  with Orthanc's ``/rendered`` of the same instance and viewport.
- **Browser**: Debian's Chromium via Playwright, headless, 1280×800, a fresh browser context per run (cold cache:
  no HTTP cache, no service worker). *Cold* is the first load in that context; *warm* closes that page (cutting
  off OHIF's prefetch of the other slices), waits 1.5 s for the link to drain and opens the same viewer URL in a
  new page of the same context (its HTTP cache holds the immutable assets; index.html and app-config.js are
  revalidated).
- **Time to first image**: from navigation start (the page's ``performance.timeOrigin``) to the first poll (every
  25 ms, in the page) at which a viewport canvas (``canvas.cornerstone-canvas``, the readiness signal of
  tests/test_ohif.py) shows non-blank pixels: grey-level variance over 200 on a 64×64 downscale (a black canvas is
  ~0; the phantom at W400/L40 is in the thousands). After it, a screenshot of the viewport is checked the way the
  test checks it. Bytes and requests are the page's Resource Timing entries finished by then (transferSize:
  headers and encoded body; 0 for a cache hit), plus the HTML document.
- **Links**: *loopback* (direct) and *throttled*: both systems behind ``bench.throttle`` (10 Mbit/s shared by every
  connection in both directions, 50 ms added one way per direction, i.e. ~100 ms round trip; see its docstring).
- **Runs**: per link, one untimed warm-up load per system (the servers' first-touch work: Orthanc reading its
  files, our first metadata read), then ``--runs`` rounds with the systems alternated (ours first in even rounds);
  the table shows the median and min–max.

The exit status is 1 only when the software failed: no image shown within 120 s, an HTTP error status on a
request of the page, a server that did not start or did not store every instance. Times are reported, never judged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httpx
from rich.table import Table

from bench.environment import environment_table
from bench.ingest import _wait_idle, err, out, send, study_files
from bench.throttle import ThrottleProcess

if TYPE_CHECKING:
    from playwright.sync_api import Browser
    from starlette.applications import Starlette

OURS, ORTHANC = "ours", "Orthanc"
ROW_LABEL = "OHIF, 300-slice CT, time to first image (headless Chromium)"
MIN_VARIANCE = 200.0  # as tests/test_ohif.py
FIRST_IMAGE_TIMEOUT_MS = 120_000
WARM_PAUSE_S = 1.5  # between closing the cold page and opening the warm one
PLACEHOLDER_TOKEN = "bench-placeholder-token"  # lets our app-config.js start on the Orthanc front; stripped there

# Runs in every page before its own scripts: the Resource Timing buffer large enough for every request, and a
# 25 ms poll of the viewport canvases that records the first non-blank one (time, requests and bytes by then).
DETECT_JS = """
(() => {
  try { performance.setResourceTimingBufferSize(100000); } catch (e) { /* older browsers */ }
  const small = document.createElement('canvas');
  small.width = 64; small.height = 64;
  const ctx = small.getContext('2d', { willReadFrequently: true });
  const timer = setInterval(() => {
    for (const canvas of document.querySelectorAll('canvas.cornerstone-canvas')) {
      if (!canvas.width || !canvas.height) { continue; }
      ctx.clearRect(0, 0, 64, 64);
      ctx.drawImage(canvas, 0, 0, 64, 64);
      const data = ctx.getImageData(0, 0, 64, 64).data;
      let n = 0, sum = 0, sum2 = 0;
      for (let i = 0; i < data.length; i += 4) {
        const grey = (data[i] + data[i + 1] + data[i + 2]) / 3;
        sum += grey; sum2 += grey * grey; n += 1;
      }
      const variance = sum2 / n - (sum / n) * (sum / n);
      if (variance > __MIN_VARIANCE__) {
        const t = performance.now();
        clearInterval(timer);
        const done = performance.getEntriesByType('resource').filter((e) => e.responseEnd <= t);
        const nav = performance.getEntriesByType('navigation')[0];
        window.__ttfi = {
          ms: t, variance: variance, requests: done.length + 1,
          bytes: done.reduce((a, e) => a + (e.transferSize || 0), 0) + (nav ? nav.transferSize || 0 : 0),
        };
        return;
      }
    }
  }, 25);
})();
""".replace("__MIN_VARIANCE__", str(MIN_VARIANCE))

# Every request of the page so far (the first round's, kept with --keep for a look at what the time went to).
TRACE_JS = """
[...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')].map((e) => ({
  name: e.name, type: e.initiatorType, start: Math.round(e.startTime), end: Math.round(e.responseEnd),
  ttfb: Math.round(e.responseStart - e.requestStart), size: e.transferSize, body: e.decodedBodySize,
  first_image: window.__ttfi ? window.__ttfi.ms : null,
}))
"""


class Failure(Exception):
    """The software under test failed (not a slow result): exit status 1."""


@dataclass
class Sample:
    ms: float
    bytes: int
    requests: int


@dataclass
class Cell:
    cold: list[Sample] = field(default_factory=list)
    warm: list[Sample] = field(default_factory=list)


@dataclass
class Target:
    name: str
    url: str  # what the browser opens (direct, or the throttling proxy in front of it)
    token: str


# -- the systems ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def ours(run_dir: Path, ohif_dir: Path, files: list[Path], keep: bool) -> Iterator[tuple[str, str, str]]:
    """`pacs serve` embedded with the CT stored; yields (base URL, API token, StudyInstanceUID)."""
    from tests.support.http_api import wait_http
    from tests.support.pacs_process import PacsProcess, run_pacs
    from tests.support.stack import embedded_env

    env = {**embedded_env(run_dir / "data"), "PACS_OHIF_DIR": str(ohif_dir)}
    port = int(env["PACS_DICOM_PORT"])
    url = f"http://127.0.0.1:{env['PACS_HTTP_PORT']}"
    serve = PacsProcess(["serve"], env, run_dir / "serve.log").start()
    try:
        serve.wait_dicom(port, timeout=120)
        wait_http(url, timeout=120)
        _store(OURS, port, "PACS", files, run_dir / "storescu")
        done = run_pacs(["token", "create", "bench-ohif", "--role", "radiologist", "--days", "1", "--json"], env)
        if done.returncode != 0:
            raise Failure(f"pacs token create failed:\n{done.stdout}{done.stderr}")
        token = str(json.loads(done.stdout)["token"])
        study = _check_stored(OURS, url, {"Authorization": f"Bearer {token}"}, files)
        assert serve.proc is not None
        _wait_idle({"serve": serve.proc.pid})  # derived work (thumbnails, series metadata) done
        yield url, token, study
    finally:
        serve.stop()
        if not keep:
            shutil.rmtree(run_dir / "data", ignore_errors=True)


@contextlib.contextmanager
def orthanc(run_dir: Path, ohif_dir: Path, files: list[Path], keep: bool) -> Iterator[tuple[str, str, str]]:
    """Orthanc with its DICOMweb plugin and the CT stored, behind the front server that serves OHIF."""
    from bench.dicomweb import DicomwebOrthanc, find_dicomweb_plugin
    from bench.orthanc import AE_TITLE
    from tests.support.http_api import wait_http
    from tests.support.net import free_port

    plugin = find_dicomweb_plugin()
    if plugin is None:
        raise Failure("the orthanc-dicomweb plugin is not installed (apt-get install orthanc-dicomweb)")
    server = DicomwebOrthanc(run_dir / "orthanc", plugin).start()
    port = free_port()
    front: subprocess.Popen[bytes] | None = None
    try:
        _store(ORTHANC, server.dicom_port, AE_TITLE, files, run_dir / "storescu-orthanc")
        log = (run_dir / "front.log").open("ab")
        front = subprocess.Popen([sys.executable, "-m", "bench.ohif", "--front", str(port), "--front-ohif-dir",
                                  str(ohif_dir), "--front-upstream", server.base_url], stdout=log,
                                 stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent)
        log.close()
        url = f"http://127.0.0.1:{port}"
        wait_http(url, timeout=60)
        study = _check_stored(ORTHANC, url, {}, files)
        yield url, PLACEHOLDER_TOKEN, study
    finally:
        if front is not None:
            front.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                front.wait(10)
            if front.poll() is None:
                front.kill()
        server.stop()
        if not keep:
            shutil.rmtree(run_dir / "orthanc" / "storage", ignore_errors=True)


def _store(name: str, port: int, aec: str, files: list[Path], log_dir: Path) -> None:
    sent = send(port, aec, files, 2, log_dir)
    if any(rc != 0 for rc in sent.returncodes) or sent.successes != len(files):
        raise Failure(f"{name}: storescu stored {sent.successes}/{len(files)}:\n{sent.output_tail}")
    err.print(f"{name}: stored {len(files)} instances in {sent.elapsed_s:.1f} s")


def _check_stored(name: str, url: str, headers: dict[str, str], files: list[Path]) -> str:
    """The study's UID, once its series metadata on DICOMweb lists every instance."""
    from pydicom import dcmread

    first = dcmread(files[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    deadline = time.monotonic() + 300
    with httpx.Client(base_url=url, headers={**headers, "Accept": "application/dicom+json"}, timeout=120) as client:
        while True:
            response = client.get(f"/dicom-web/studies/{study}/series/{series}/metadata")
            if response.status_code == 200 and len(response.json()) == len(files):
                return study
            if time.monotonic() > deadline:
                raise Failure(f"{name}: series metadata not complete after 300 s (HTTP {response.status_code})")
            time.sleep(0.5)


# -- the front server for Orthanc (a child process: python -m bench.ohif --front PORT ...) -----------------------


def front_app(ohif_dir: Path, upstream: str) -> Starlette:
    """OHIF's files as viewer_api.ohif serves them, and /dicom-web/ proxied to ``upstream`` (Orthanc)."""
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
    from starlette.routing import Route

    from pacs.viewer.site import ViewerSite, accepts_gzip
    from viewer_api.hardening import SecurityHeaders
    from viewer_api.ohif import file_response

    site = ViewerSite(ohif_dir)
    pool = httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=0.5)
    client = httpx.AsyncClient(timeout=600, limits=pool)
    hop = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
           "proxy-authenticate", "authorization"}

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def root(request: Request) -> Response:
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"/ohif/{query}", status_code=308)

    async def static(request: Request) -> Response:
        found = site.resolve(request.path_params["path"], accepts_gzip(request.headers.get("accept-encoding", "")))
        if found is None:
            return JSONResponse({"code": "not_found"}, status_code=404)
        return file_response(found)  # as ours serves the viewer

    async def dicomweb(request: Request) -> Response:
        path, query = request.url.path, request.url.query
        if path.endswith("/thumbnail"):  # plugin 1.7 has no /thumbnail: the same size from its /rendered
            path = path.removesuffix("/thumbnail") + "/rendered"
            query = unquote(query)  # it does not percent-decode arguments (viewport=256%2C256 is a 400)
        target = upstream + path + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in hop]
        for attempt in range(3):  # a keep-alive connection Orthanc closed meanwhile: try again on a new one
            try:
                answer = await client.send(client.build_request(request.method, target, headers=headers),
                                           stream=True)
                break
            except (httpx.RemoteProtocolError, httpx.ConnectError):
                if attempt == 2:
                    raise
        return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code,
                                 headers={k: v for k, v in answer.headers.items() if k.lower() not in hop},
                                 background=BackgroundTask(answer.aclose))

    app = Starlette(routes=[Route("/health", health), Route("/ohif", root),
                            Route("/ohif/{path:path}", static, methods=["GET", "HEAD"]),
                            Route("/dicom-web/{path:path}", dicomweb, methods=["GET", "HEAD"])])
    app.add_middleware(SecurityHeaders)
    return app


def run_front(port: int, ohif_dir: Path, upstream: str) -> None:
    import uvicorn

    uvicorn.run(front_app(ohif_dir, upstream), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- the browser ---------------------------------------------------------------------------------------------


def viewer_url(base: str, study: str) -> str:
    return f"{base}/ohif/viewer?StudyInstanceUIDs={study}"


def measure(browser: Browser, target: Target, study: str, warm: bool,
            shots: Path | None) -> tuple[Sample, Sample | None]:
    """One fresh context: the cold load, then (``warm``) a reload of the same URL. Raises Failure when no image
    shows or a request of the page got an HTTP error."""
    import numpy as np

    from tests.support.browser import PageLog

    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.add_init_script(f"sessionStorage.setItem('pacs.ohif.token', {json.dumps(target.token)});")
    context.add_init_script(DETECT_JS)
    page = context.new_page()
    page.set_default_timeout(FIRST_IMAGE_TIMEOUT_MS)
    log = PageLog()
    log.attach(page)
    samples: list[Sample] = []
    try:
        for attempt in ("cold", "warm") if warm else ("cold",):
            if attempt == "warm":  # a new page of the same context (its HTTP cache), once the cold one's
                page.close()       # prefetches are cut off and the link has drained
                time.sleep(WARM_PAUSE_S)
                page = context.new_page()
                page.set_default_timeout(FIRST_IMAGE_TIMEOUT_MS)
                log.attach(page)
            try:
                page.goto(viewer_url(target.url, study), wait_until="commit")
                page.wait_for_function("window.__ttfi !== undefined", polling=100, timeout=FIRST_IMAGE_TIMEOUT_MS)
            except Exception as exc:  # Playwright's timeout and navigation errors alike
                raise Failure(f"{target.name}: no image in the viewport ({attempt}): {exc}\n{log.summary()}") from None
            found = page.evaluate("window.__ttfi")
            samples.append(Sample(float(found["ms"]), int(found["bytes"]), int(found["requests"])))
            viewport = page.locator("canvas.cornerstone-canvas").first
            grey = _grey(viewport.screenshot(), np)
            if float(grey.var()) <= MIN_VARIANCE:
                raise Failure(f"{target.name}: the viewport's screenshot is blank after the first image "
                              f"(variance {grey.var():.0f})")
            if shots is not None:
                page.screenshot(path=str(shots / f"{target.name.lower()}-{attempt}.png"))
                (shots / f"{target.name.lower()}-{attempt}.json").write_text(json.dumps(page.evaluate(TRACE_JS)))
        if log.error_statuses:
            raise Failure(f"{target.name}: HTTP errors: {log.error_statuses[:10]}")
    finally:
        context.close()
    return samples[0], samples[1] if warm else None


def _grey(png: bytes, np: Any) -> Any:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


# -- the report ----------------------------------------------------------------------------------------------


def _stats(samples: list[Sample]) -> tuple[float, float, float, float, float]:
    ms = [s.ms for s in samples]
    return (statistics.median(ms), min(ms), max(ms), statistics.median(s.bytes for s in samples),
            statistics.median(s.requests for s in samples))


def report(cells: dict[tuple[str, str], Cell], links: list[str], names: list[str], warm: bool,
           link_note: str) -> list[str]:
    """Prints the tables; returns the markdown summary lines (for bench/README.md)."""
    table = Table(title="OHIF time to first image, 300-slice CT (headless Chromium, fresh context per run)")
    for column in ("system", "link", "cache", "TTFI median ms", "min–max ms", "bytes to first image",
                   "requests"):
        table.add_column(column, justify="left" if column in ("system", "link", "cache") else "right")
    md = ["| system | link | cache | TTFI median | min–max | bytes to first image | requests |",
          "|---|---|---|---:|---:|---:|---:|"]
    for link in links:
        for kind in ("cold", "warm") if warm else ("cold",):
            for name in names:
                samples = getattr(cells[(name, link)], kind)
                if not samples:
                    continue
                med, lo, hi, size, reqs = _stats(samples)
                row = (name, link, kind, f"{med:.0f}", f"{lo:.0f}–{hi:.0f}", f"{size / 1e6:.2f} MB", f"{reqs:.0f}")
                table.add_row(*row)
                md.append(f"| {' | '.join(row[:3])} | {med / 1000:.2f} s | {lo / 1000:.2f}–{hi / 1000:.2f} s | "
                          f"{size / 1e6:.2f} MB | {reqs:.0f} |")
    out.print(table)
    if ORTHANC in names and OURS in names:
        ratios = Table(title=ROW_LABEL)
        for column in ("link", "cache", "ours ms", "Orthanc ms", "ours ÷ Orthanc"):
            ratios.add_column(column, justify="left" if column in ("link", "cache") else "right")
        md += ["", f"| {ROW_LABEL} | link | cache | ours | Orthanc | ours ÷ Orthanc |", "|---|---|---|---:|---:|---:|"]
        for link in links:
            for kind in ("cold", "warm") if warm else ("cold",):
                a, b = getattr(cells[(OURS, link)], kind), getattr(cells[(ORTHANC, link)], kind)
                if not a or not b:
                    continue
                mine, theirs = _stats(a)[0], _stats(b)[0]
                ratios.add_row(link, kind, f"{mine:.0f}", f"{theirs:.0f}", f"{mine / theirs:.2f}")
                md.append(f"| | {link} | {kind} | {mine / 1000:.2f} s | {theirs / 1000:.2f} s | "
                          f"{mine / theirs:.2f} |")
        out.print(ratios)
    out.print(f"throttled link: {link_note}")
    return md


# -- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3, help="timed rounds per link (at least 3)")
    parser.add_argument("--links", default="loopback,throttled", help="loopback, throttled or both (default)")
    parser.add_argument("--rate-mbit", type=float, default=10.0, help="throttled link: shared Mbit/s (10)")
    parser.add_argument("--latency-ms", type=float, default=50.0,
                        help="throttled link: added one-way latency per direction, ms (50: ~100 ms round trip)")
    parser.add_argument("--no-warm", action="store_true", help="cold loads only")
    parser.add_argument("--skip-orthanc", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the servers' data and screenshots")
    parser.add_argument("--markdown", type=Path, help="also write the summary table to this file")
    # the front server's own process (started by the bench)
    parser.add_argument("--front", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--front-ohif-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--front-upstream", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.front:
        run_front(args.front, args.front_ohif_dir, args.front_upstream)
        return 0
    from bench.dicomweb import dicomweb_plugin_version
    from bench.orthanc import orthanc_version
    from tests.support.browser import chromium_browser
    from tests.support.ohif import installed_ohif

    runs = max(3, args.runs)
    links = [link.strip() for link in args.links.split(",") if link.strip()]
    link_note = (f"{args.rate_mbit:g} Mbit/s shared by every connection in both directions, {args.latency_ms:g} ms "
                 f"added one way per direction (~{2 * args.latency_ms:g} ms round trip), bench.throttle")
    env_table = environment_table()
    env_table.add_row("Orthanc / DICOMweb plugin", f"{orthanc_version()} / {dicomweb_plugin_version()}")
    env_table.add_row("browser", "Debian chromium " + _chromium_version())
    out.print(env_table)
    files = study_files(args.slices, args.size)
    ohif_dir = installed_ohif()
    names = [OURS] + ([] if args.skip_orthanc else [ORTHANC])
    cells = {(name, link): Cell() for name in names for link in links}
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="pacs-bench-ohif-"))
    shots = work / "screenshots"
    shots.mkdir()
    failures: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            bases: dict[str, tuple[str, str, str]] = {}
            bases[OURS] = stack.enter_context(ours(work / "ours", ohif_dir, files, args.keep))
            if ORTHANC in names:
                bases[ORTHANC] = stack.enter_context(orthanc(work / "orthanc", ohif_dir, files, args.keep))
            browser = stack.enter_context(chromium_browser())
            for link in links:
                targets: dict[str, Target] = {}
                for name in names:
                    url, token, _ = bases[name]
                    if link == "throttled":
                        proxy = stack.enter_context(ThrottleProcess(url.removeprefix("http://"), args.rate_mbit,
                                                                    args.latency_ms, work / f"throttle-{name}.log"))
                        url = proxy.url
                    targets[name] = Target(name, url, token)
                for name in names:  # untimed: the servers' first-touch work
                    measure(browser, targets[name], bases[name][2], False, None)
                for round_ in range(runs):
                    order = names if round_ % 2 == 0 else names[::-1]
                    for name in order:
                        cold, warm = measure(browser, targets[name], bases[name][2], not args.no_warm,
                                             shots if round_ == 0 else None)
                        cells[(name, link)].cold.append(cold)
                        if warm is not None:
                            cells[(name, link)].warm.append(warm)
                        err.print(f"{link} round {round_ + 1}: {name} cold {cold.ms:.0f} ms" +
                                  (f", warm {warm.ms:.0f} ms" if warm else ""))
    except Failure as exc:
        failures.append(str(exc))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            err.print(f"kept {work}")
    md = report(cells, links, names, not args.no_warm, link_note)
    if args.markdown:
        args.markdown.write_text(f"{datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {os.cpu_count()} CPUs, "
                                 f"{time.monotonic() - started:.0f} s\n\n" + "\n".join(md) + "\n")
    for failure in failures:
        out.print(f"FAILED: {failure}")
    return 1 if failures else 0


def _chromium_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True,
                              timeout=20).stdout.strip().removeprefix("Chromium ")
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
