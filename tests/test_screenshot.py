"""The leaderboard page in a real browser: headless Chromium renders it to a PNG (slow; needs the system's
chromium package, skipped without it)."""

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
                    reason="no chromium on PATH (apt-get install chromium)")
def test_the_leaderboard_page_renders_in_chromium(tmp_path):
    out = tmp_path / "page.png"
    subprocess.run(["bash", str(ROOT / "scripts" / "screenshot_leaderboard.sh"), str(ROOT / "leaderboard" / "index.html"),
                    str(out)], check=True, timeout=120)
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert (width, height) == (1600, 2600)
    assert out.stat().st_size > 100_000, "a blank page compresses to a few kB; the tables and figures do not"
