"""Instructions from exec to the first served hit of ``imagecache serve`` (not a test).

    .venv/bin/python bench/startup_ir.py [--entries 1000] [--out DIR]

Wall-clock start-up follows the machine's load (bench/startup.py); the count
of instructions a start executes does not, so this is the number to compare
two versions by on a shared machine. Under ``valgrind --tool=callgrind``
(about 50 times slower; a few minutes in all) it counts the instructions
(``Ir``) of:

- ``interpreter``: ``python -c pass``;
- ``dependencies``: ``python -c "import aiohttp.web, pydantic_settings, click,
  prometheus_client"``, the floor the chosen libraries set;
- ``imports``: ``python -c "import imagecache.cli, imagecache.server.run"``,
  everything ``imagecache serve`` imports before it reads its settings (with
  the collector on: ``serve`` pauses it for these imports, so they cost it less);
- ``first hit``: ``imagecache serve`` (sqlite driver, 1 worker, a cache of
  ENTRIES committed 4 KiB images built as bench/startup.py builds it) from
  its exec to the first ``GET /v2/images/<id>/file`` answered in full: the
  count is dumped then (``callgrind_control --dump``), before the stop.

Bytecode is cached (``PYTHONPYCACHEPREFIX`` under the work directory, one
unmeasured start first). With ``--out`` the callgrind files are kept there for
``callgrind_annotate``; otherwise they go with the work directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import startup

IMPORTS = "import imagecache.cli, imagecache.server.run"
DEPENDENCIES = "import aiohttp.web, pydantic_settings, click, prometheus_client"


def _env(root: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "IMAGECACHE_LOG_LEVEL": os.environ.get("IMAGECACHE_LOG_LEVEL", "WARNING"),
        "PYTHONPYCACHEPREFIX": str(root / "pycache"),
    }
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("NOTIFY_SOCKET", None)
    return env


def _valgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]


def total_ir(path: Path) -> int:
    """The total ``Ir`` a callgrind file records (its ``totals:`` or ``summary:`` line)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"{path}: no totals line")


def count(code: str, out: Path, env: dict[str, str]) -> int:
    subprocess.run(
        [*_valgrind(out), sys.executable, "-c", code],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return total_ir(out)


def first_hit(variant: startup.Variant, port: int, out: Path, env: dict[str, str]) -> int:
    """Instructions of ``imagecache serve`` until its first hit is answered."""
    argv = [*_valgrind(out), *startup.serve_argv(variant, port, 1)]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        start = time.perf_counter()
        deadline = start + 600  # valgrind on a loaded machine: minutes, but bounded
        image_id = variant.image_ids[0]
        startup._first_ok(port, f"/v2/images/{image_id}/file", start, deadline, startup.IMAGE_SIZE)
        subprocess.run(
            ["callgrind_control", "--dump=first-hit", str(process.pid)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )
        dumps = sorted(out.parent.glob(out.name + ".*"))
        if not dumps:
            raise RuntimeError("callgrind wrote no dump")
        return total_ir(dumps[-1])
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="keep the callgrind files here")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (with callgrind_control) is not installed", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="imagecache-startup-ir-"))
    out = args.out or root / "callgrind"
    out.mkdir(parents=True, exist_ok=True)
    env = _env(root)
    port = startup._free_port()
    print(f"instructions (callgrind Ir), {args.entries} cached entries, sqlite, 1 worker")
    try:
        origin = root / "origin"
        startup.make_origin(origin, args.entries)
        variant = startup.build(root, origin, "sqlite", args.entries, port, None)
        # Unmeasured: writes the bytecode cache, as an install would have.
        startup.run_once(variant, 1, port, root, 60.0, variant.image_ids[0])
        rows = {
            "interpreter": count("pass", out / "interpreter.out", env),
            "dependencies": count(DEPENDENCIES, out / "dependencies.out", env),
            "imports": count(IMPORTS, out / "imports.out", env),
            "first hit": first_hit(variant, port, out / "serve.out", env),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name, value in rows.items():
        print(f"  {name:>12}: {value / 1e6:8.1f} M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
