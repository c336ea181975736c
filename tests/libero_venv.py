"""LIBERO's own environment for the tests (requirements-libero.txt says why it cannot be the test environment),
built once per machine and reused by every later run: ensure() returns its python, or a sentence saying exactly
why there is none, which the LIBERO tests skip with.

The test command does not build it by default: `python tests/libero_venv.py` builds it (or MIMIC_VIDEO_LIBERO=build
lets the tests build it). Building may install the Debian packages of MuJoCo's CPU renderer (as root) and downloads
about 1.3 GB of wheels from PyPI into 2.9 GB on disk. (A default test run that built it timed out in CI at 90
minutes, for a reason not reproduced on this project's machines; see README "Evaluate on LIBERO".)"""
import ctypes.util
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements-libero.txt"
SYSTEM_PACKAGES = ("libosmesa6", "libgl1")      # OSMesa: MuJoCo renders on the CPU with MUJOCO_GL=osmesa
CHECK = "import libero.libero.benchmark, libero.libero.envs, openpi_client.image_tools, torch, websockets, msgpack"


def location():
    """$MIMIC_VIDEO_LIBERO_VENV, or a folder in ~/.cache named after the requirements' hash (new pins, new venv)."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    return Path(os.environ.get("MIMIC_VIDEO_LIBERO_VENV") or Path.home() / ".cache/mimic-video" / f"libero-{digest}")


def _run(cmd, timeout):
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    env.pop("PYTHONPATH", None)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{' '.join(map(str, cmd))}` could not run: {e}"
    if proc.returncode:
        return f"`{' '.join(map(str, cmd))}` exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-2000:]}"
    return None


def _osmesa():
    """None once OSMesa is installed (installing it where this user can), else why not."""
    if ctypes.util.find_library("OSMesa"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return (f"MuJoCo's CPU renderer needs OSMesa, which is not installed, and this user cannot install it "
                f"(needs root and apt-get): apt-get install {' '.join(SYSTEM_PACKAGES)}")
    install = ["apt-get", "install", "-y", *SYSTEM_PACKAGES]
    error = _run(install, 900) and (_run(["apt-get", "update"], 900) or _run(install, 900))
    if ctypes.util.find_library("OSMesa"):
        return None
    return f"installing OSMesa for MuJoCo's CPU renderer failed: {error}"


def ensure(build=None):
    """(LIBERO's python, None), or (None, why it is not available). build: build it if it is missing (default: only
    with MIMIC_VIDEO_LIBERO=build)."""
    venv = location()
    python, done = venv / "bin/python", venv / "built.json"
    if build is None:
        build = os.environ.get("MIMIC_VIDEO_LIBERO") == "build"
    if not build and not done.exists():
        return None, (f"LIBERO's environment is not built on this machine (no {done}); build it once with "
                      f"`python tests/libero_venv.py` (or run the tests with MIMIC_VIDEO_LIBERO=build)")
    why = _osmesa()
    if why:
        return None, why
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)           # one builder at a time; the others wait, then reuse its work
        if done.exists():
            return python, None
        shutil.rmtree(venv, ignore_errors=True)    # a build cut short leaves no built.json: start again
        start = time.time()
        for cmd in ([sys.executable, "-m", "venv", str(venv)],
                    [str(python), "-m", "pip", "install", "-q", "--no-cache-dir", "-r", str(REQUIREMENTS)],
                    [str(python), "-c", CHECK]):
            error = _run(cmd, 3600)
            if error:
                return None, f"building LIBERO's environment in {venv} failed: {error}"
        size = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())
        done.write_text(json.dumps({"seconds": round(time.time() - start, 1), "bytes": size}))
    return python, None


if __name__ == "__main__":
    start = time.time()
    python, why = ensure(build=True)
    if python is None:
        raise SystemExit(why)
    print(f"LIBERO's environment: {python} (ready in {time.time() - start:.0f} s; {location() / 'built.json'}: "
          f"{(location() / 'built.json').read_text()})")
