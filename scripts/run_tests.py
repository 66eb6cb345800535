"""Run the test suite one test file per pytest process, then print one total line.

Why: on 2026-11-30 the whole suite in one process died with a segmentation fault (no Python traceback) about a
third of the way through, in a test that passes alone and after any one of the earlier files; only the
accumulated state of ~180 earlier tests (threads and native libraries: torch, ONNX Runtime, OpenVINO,
TensorBoard) triggered it. One process per file keeps every file as isolated as it is when run alone, at the
cost of a few seconds of start-up per file. Extra arguments go to every pytest run (e.g. ``-x`` or ``-k name``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

COUNTS = ("passed", "failed", "skipped", "errors")


def main(argv: list[str]) -> int:
    files = sorted(Path(__file__).resolve().parents[1].glob("tests/test_*.py"))
    totals = dict.fromkeys(COUNTS, 0)
    bad = []
    for path in files:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", str(path), *argv], capture_output=True,
                                text=True)
        sys.stdout.write(result.stdout[-20000:])
        sys.stderr.write(result.stderr[-5000:])
        tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        for key in COUNTS:
            match = re.search(rf"(\d+) {key if key != 'errors' else 'error'}", tail)
            totals[key] += int(match.group(1)) if match else 0
        if result.returncode not in (0, 5):  # 5: no test collected (e.g. everything deselected by -k)
            bad.append(f"{path.name} (exit {result.returncode})")
            totals["failed"] += 0 if re.search(r"\d+ (failed|error)", tail) else 1
            if "-x" in argv:
                break
    if bad:
        print("failed files: " + ", ".join(bad))
    print(f"{totals['passed']} passed, {totals['failed'] + totals['errors']} failed, {totals['skipped']} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
