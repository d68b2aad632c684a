"""A non-editable install (a wheel, as `pip install .`, Docker and Ray nodes do it) finds its default
configuration inside the package and starts the server from a directory with no configs/ in it."""

import subprocess
import sys
import sysconfig
import venv

import httpx
import pytest

from tests.conftest import ROOT, ServerProcess, free_port, stop_process

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel installed into a fresh venv; its dependencies come from this venv (a .pth: no downloads)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, timeout=240, cwd=tmp)
    wheel = next((tmp / "dist").glob("loraserve-*.whl"))
    venv.EnvBuilder(with_pip=False).create(tmp / "venv")
    python = tmp / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(f"{site}/deps.pth", "w") as f:  # a plain path: this venv's own .pth (the editable install) stay unread
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    # this venv's pip, run by the new interpreter: it installs there (scripts too); --ignore-installed so that
    # it never touches the editable loraserve it can also see through deps.pth
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, timeout=120, cwd=tmp)
    return tmp, python


def test_the_installed_package_carries_its_default_config(installed):
    tmp, python = installed
    probe = ("import server, server.config as c; "
             "print(server.__file__); print(c.DEFAULT_CONFIG_PATH.is_symlink()); print(c.load_settings().limits)")
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp, check=True).stdout
    where, linked, limits = out.splitlines()
    assert where.startswith(str(tmp / "venv")) and linked == "False" and "max_batch_size=32" in limits


def test_the_installed_server_starts_and_answers(installed):
    tmp, python = installed
    port = free_port()
    proc = subprocess.Popen([str(tmp / "venv" / "bin" / "loraserve"), "serve", "--port", str(port), "--threads", "1",
                             "--kv-cache-memory-mb", "64"], cwd=tmp, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        server = ServerProcess.__new__(ServerProcess)
        server.url, server.proc = f"http://127.0.0.1:{port}", proc
        server.wait_ready(timeout=180)
        r = httpx.post(server.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=60)
        assert r.status_code == 200
    finally:
        stop_process(proc)
