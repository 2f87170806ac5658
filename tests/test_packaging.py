"""The wheel carries the script, pages and schemas: installed alone in a clean venv outside the
repository, it serves them (static/ travels in the wheel as collector/static)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import urllib.request
import venv
import zipfile
from pathlib import Path

from serve_process import ServeProcess

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_in_a_clean_venv_serves_the_script(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--wheel-dir", str(wheels), str(ROOT)),
        ],
        check=True,
        timeout=300,
    )
    [wheel] = wheels.glob("outbound_collector-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for packaged in (
        "collector/static/s.js",
        "collector/static/s.min.js",
        "collector/static/demo.html",
        "collector/static/live.js",
        "collector/schemas/envelope.json",
        "collector/schemas/outbound_track.json",
        "collector/schemas/outbound_identify.json",
        "collector/py.typed",
    ):
        assert packaged in names

    clean = tmp_path / "clean"
    venv.create(clean, with_pip=False)
    python = clean / "bin" / "python"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"),
            *("--no-deps", "--no-index", str(wheel)),
        ],
        check=True,
        timeout=300,
    )
    # The dependencies come from this environment's site-packages (no network here); the
    # collector itself must come from the wheel, not from the source tree (which `python -c`
    # would put first on the path from the repository's directory).
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": os.environ["PATH"]}
    where = subprocess.run(
        [str(python), "-c", "import collector; print(collector.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(clean)), where

    server = ServeProcess(
        ["--data-dir", str(tmp_path / "data")],
        env=env,
        log=tmp_path / "log",
        command=[str(clean / "bin" / "outbound-collector")],
    )
    try:
        with urllib.request.urlopen(server.base_url + "/s.js", timeout=10) as response:  # noqa: S310
            assert response.status == 200
            served = response.read()
        with urllib.request.urlopen(server.base_url + "/demo", timeout=10) as response:  # noqa: S310
            assert response.status == 200
            demo = response.read()
        with urllib.request.urlopen(  # noqa: S310
            server.base_url + "/_collector/live.js", timeout=10
        ) as response:
            assert response.read() == (ROOT / "static" / "live.js").read_bytes()
    finally:
        assert server.stop() == 0
    source = (ROOT / "static" / "s.min.js").read_bytes()
    assert b"<title>outbound-collector demo</title>" in demo
    assert served == source.replace(b"{{EVENT_PATH}}", b"/e").replace(b"{{SCRIPT_PATH}}", b"/s.js")
