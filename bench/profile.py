"""Where imagecache spends its CPU on a hit or a miss: py-spy over every worker process.

Starts ``imagecache serve`` (directory upstream) with one image, then repeats
the scenario (a miss: evict, then GET; a hit: GET) while ``py-spy record``
samples the master and its workers. Prints the functions that were on the CPU
most often, by their own samples ("self") and with their callees ("total"),
as fractions of the samples of the thread holding the GIL (Python's CPU time;
time spent in C with the GIL released, e.g. hashing, is not in it).

    .venv/bin/python bench/profile.py --scenario miss --size-mib 1024 --seconds 20

py-spy comes from bench/setup.sh (PyPI); it needs ptrace, so run as root.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import MIB, fetch_all
from peers import REPO, Imagecache
from run import make_image


def frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``: merge lines of one function."""
    func, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    return f"{func} ({'/'.join(path.split('/')[-2:])})"


def summarize(raw: Path, top: int) -> str:
    """Self and total fractions per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        # The first element is the process/thread; frames follow, outermost first.
        frames = [frame_name(f) for f in stack.split(";")[1:]]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    if not samples:
        return "no samples (is py-spy allowed to ptrace?)"
    lines = [f"{samples} samples on the CPU", "", "self   total  function"]
    for name, count in own.most_common(top):
        lines.append(f"{count / samples:5.1%} {total[name] / samples:6.1%}  {name}")
    lines += ["", "by total (callees included):"]
    for name, count in total.most_common(top):
        lines.append(f"{own[name] / samples:5.1%} {count / samples:6.1%}  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("hit", "miss"), default="miss")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--workdir", default="/var/tmp/imagecache-bench/profile")
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(REPO / ".venv" / "bin" / "py-spy")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    image = make_image(work / "images", args.size_mib * MIB)
    raw = work / "pyspy.txt"
    with Imagecache(
        work / "ic" / "cache", f"directory:{work / 'images'}", workers=args.workers
    ) as ic:
        url = ic.file_url(image.image_id)
        fetch_all([url], image.size)  # warm: imports, page cache
        assert ic.proc is not None
        cmd = [pyspy, "record", "--pid", str(ic.proc.pid), "--subprocesses", "--format", "raw"]
        cmd += ["--rate", "200", "--duration", str(args.seconds), "--output", str(raw)]
        # Only the thread holding the GIL: threads parked on an executor queue
        # otherwise show up as "active" in _worker and drown the picture.
        cmd += ["--gil"]
        spy = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + args.seconds
        rates = []
        while time.monotonic() < deadline and spy.poll() is None:
            if args.scenario == "miss":
                ic.evict(image.image_id)
            rates.append(fetch_all([url], image.size).mib_s)
        _, err = spy.communicate()
    print(f"{args.scenario}: {len(rates)} downloads, {[round(r) for r in rates]} MiB/s")
    if not raw.exists():
        print(err.decode(), file=sys.stderr)
        return 1
    print(summarize(raw, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
