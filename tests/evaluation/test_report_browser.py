"""The report page in a real browser: headless Chromium (Debian's `chromium`) loads
report/index.html from disk; a probe script added to a copy of the page records, once the page
has loaded, how many images there are, which failed to load and how many tables there are.
Negative control: with one figure deleted the check names it."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (setup.sh installs it)")

PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  document.body.dataset.images = images.length;
  document.body.dataset.broken = broken.join(" ");
  document.body.dataset.tables = document.querySelectorAll("table").length;
});
</script>"""


def rendered(page: Path) -> dict[str, str]:
    """What Chromium saw after loading `page` (a copy with the probe; the report has no script)."""
    probed = page.with_name("probed.html")
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--allow-file-access-from-files", "--virtual-time-budget=5000", "--dump-dom",
                           probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body, done.stdout[:500]
    found = dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(1)))
    assert "images" in found, f"the probe did not run: {body.group(0)}"
    return found


@pytest.mark.slow
def test_every_figure_loads_in_chromium_and_a_deleted_one_is_caught(tiny_project, tmp_path):
    tiny_project.write("kb.yaml", "extends: tiny\ntarget: kuiper\ncontext_length: 128\nscheme: kuiper_int8_g64\n")
    tiny_project.doit("recipe=kb")
    copy = tmp_path / "report"
    shutil.copytree(tiny_project.artifacts / "kb" / "report", copy)
    seen = rendered(copy / "index.html")
    assert int(seen["images"]) == 2 and seen["broken"] == "" and int(seen["tables"]) == 2  # quality plot + graph
    (copy / "quality.svg").unlink()
    assert rendered(copy / "index.html")["broken"] == "quality.svg"
