"""The reports in a real browser: headless Chromium renders an audit report and the batch index.

Checks the rendered DOM (after the page's own script ran): the verdict sentence, the p-values,
the four SVG plots, the table rows, their links and the table sort; saves screenshots under
``test-artifacts/`` (gitignored; CI uploads them).

Chromium is Debian's ``chromium`` (``scripts/test.sh`` installs it when missing). Without it the
test is skipped on a workstation but FAILS in CI (``CI=true``): a report nobody opened in a
browser is not tested.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from cdi_ray.report import fmt_p
from test_report import build_results_folder

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
#: A cold start of Chromium on a busy 2-core CI box takes a few seconds; a minute is a hang.
BROWSER_TIMEOUT = 120


def _chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    msg = ("headless Chromium not found (looked for %s): install Debian's `chromium` "
           "(scripts/test.sh does so when run as root with apt-get)" % ", ".join(BROWSERS))
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


def _run(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BROWSER_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def dump_dom(browser: str, profile: Path, url: str) -> str:
    return _run(browser, profile, "--virtual-time-budget=2000", "--dump-dom", url).stdout


def screenshot(browser: str, profile: Path, url: str, dest: Path, size: str = "1200,2000") -> tuple[int, int]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest.unlink()
    _run(browser, profile, f"--screenshot={dest}", f"--window-size={size}", url)
    head = dest.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{dest} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    browser = _chromium()
    out = tmp_path_factory.mktemp("browser-report")
    return browser, out, build_results_folder(out)


def _rows(dom: str) -> list[str]:
    return re.findall(r'<tr data-audit="([^"]+)"', dom)


def test_audit_report_in_chromium(rendered, tmp_path):
    browser, out, res = rendered
    a = res["audits"][0]
    dom = dump_dom(browser, tmp_path / "profile", (out / "audits" / "strong.html").as_uri())
    # the verdict sentence, first
    assert re.search(r'<section id="verdict"[^>]*>.*Evidence that model “m1” was trained on the published '
                     r"collection of audit “strong”: <strong>strong</strong>", dom)
    assert dom.index('id="verdict"') < dom.index('id="p-raw"') < dom.index('id="plot-scores"')
    # the numbers
    assert f'<span id="p-raw">{fmt_p(a["p_value"])}' in dom
    assert f'<span id="p-adj">{fmt_p(a["p_adjusted"])}</span>' in dom
    assert '<span id="n">80 / 80</span>' in dom
    # the four plots, with content
    for pid in ("plot-scores", "plot-pcurve", "plot-weights", "plot-auc"):
        assert re.search(rf'<svg id="{pid}"', dom), pid
    assert dom.count('class="bar-p"') >= 5 and dom.count('class="bar-u"') >= 5
    assert 'class="alpha-line"' in dom and dom.count('class="pt"') >= 2
    assert dom.count('class="hbar"') == 12  # 6 features × (weights, AUC)
    # provenance, hostile strings inert
    assert 'id="model-fingerprint">' + "f" * 64 in dom
    assert "<script>alert" not in dom
    w, h = screenshot(browser, tmp_path / "profile-shot", (out / "audits" / "strong.html").as_uri(),
                      ARTIFACTS / "report-audit-strong.png")
    assert (w, h) == (1200, 2000)
    screenshot(browser, tmp_path / "profile-shot2", (out / "audits" / "broken.html").as_uri(),
               ARTIFACTS / "report-audit-failed.png", size="1200,1000")


def test_failed_audit_in_chromium(rendered, tmp_path):
    browser, out, _ = rendered
    dom = dump_dom(browser, tmp_path / "profile", (out / "audits" / "broken.html").as_uri())
    assert "<strong>inconclusive</strong>, because the audit could not be run" in dom
    assert 'id="failure"' in dom and "listing failed:" in dom and 'id="no-plots"' in dom


def test_index_in_chromium_links_sorts_and_screenshots(rendered, tmp_path):
    browser, out, res = rendered
    url = (out / "index.html").as_uri()
    dom = dump_dom(browser, tmp_path / "profile", url)
    ids = [a["audit_id"] for a in res["audits"]]
    assert _rows(dom) == ids  # manifest order
    for aid in ids:
        assert f'<a href="audits/{aid}.html">{aid}</a>' in dom
        assert (out / "audits" / f"{aid}.html").exists()
    assert 'id="summary"' in dom and "Benjamini–Hochberg at q = 0.05 over 2 tested audits" in dom
    # the table's own script sorts: by p-value ascending (absent last), then descending
    by_p = sorted((a for a in res["audits"] if a["p_value"] is not None), key=lambda a: a["p_value"])
    assert _rows(dump_dom(browser, tmp_path / "profile", url + "#sort=3")) == [a["audit_id"] for a in by_p] + ["broken"]
    assert _rows(dump_dom(browser, tmp_path / "profile", url + "#sort=3-")) == [a["audit_id"] for a in by_p[::-1]] + ["broken"]
    assert 'aria-sort="descending"' in dump_dom(browser, tmp_path / "profile", url + "#sort=3-")
    w, h = screenshot(browser, tmp_path / "profile-shot", url, ARTIFACTS / "report-index.png", size="1200,900")
    assert (w, h) == (1200, 900)
