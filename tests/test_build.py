"""The wheel: built without a GPU, tagged for its platform, complete, importable in a fresh venv."""

import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from gdn_nvrtc.specs import PREBUILT_SPECS

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True, capture_output=True,
    )
    (path,) = out.glob("*.whl")
    return path


def test_wheel_is_tagged_for_its_platform(wheel):
    assert wheel.name.endswith("-py3-none-manylinux_2_28_x86_64.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/WHEEL"))
        assert "Root-Is-Purelib: false" in archive.read(metadata).decode()


def test_wheel_holds_every_prebuilt_cubin(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for spec in PREBUILT_SPECS:
        assert f"gdn_nvrtc/cubins/{spec.name}.cubin" in names
    assert {"gdn_nvrtc/cubins/manifest.json", "gdn_nvrtc/templates/gdn_mtp.cu.j2", "gdn_nvrtc/__main__.py"} <= names


def test_wheel_imports_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    (venv_site,) = (env_dir / "lib").glob("python*/site-packages")
    # This interpreter's packages (torch, cuda-bindings, jinja2) come after the venv's own;
    # gdn_nvrtc itself comes only from the wheel.
    (venv_site / "outer.pth").write_text("\n".join(p for p in site.getsitepackages() if p != str(ROOT)) + "\n")
    # Without PYTHONPATH: a source checkout on it would satisfy pip and shadow the wheel.
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True, env=clean_env,
    )
    probe = (
        "import sys; sys.modules['cuda.bindings.nvrtc'] = None\n"
        "import gdn_nvrtc, gdn_nvrtc.cubins as c\n"
        "from gdn_nvrtc.specs import PREBUILT_SPECS\n"
        f"assert gdn_nvrtc.__file__.startswith({str(env_dir)!r}), gdn_nvrtc.__file__\n"
        "assert all(c.is_prebuilt(s) and c.load_cubin(s)[:4] == b'\\x7fELF' for s in PREBUILT_SPECS)\n"
        "print('ok')\n"
    )
    result = subprocess.run([python, "-c", probe], cwd=tmp_path, env=clean_env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    info = subprocess.run(
        [python, "-m", "gdn_nvrtc", "info"], cwd=tmp_path, env=clean_env, capture_output=True, text=True, check=True
    )
    assert f"{len(PREBUILT_SPECS)} prebuilt sm_90a cubins" in info.stdout
