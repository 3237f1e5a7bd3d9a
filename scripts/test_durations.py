"""Record each test's time from a `pytest --durations=0` log into tests/durations.json, which orders the
suite longest first (tests/conftest.py).

    python -m pytest -n 2 --dist worksteal --durations=0 tests | tee pytest.log
    python scripts/test_durations.py pytest.log
"""

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^([0-9.]+)s (?:setup|call|teardown)\s+(.+)$")

seconds = defaultdict(float)
for line in Path(sys.argv[1]).read_text().splitlines():
    if match := LINE.match(line.strip()):
        seconds[match[2]] += float(match[1])
kept = {test: round(s, 1) for test, s in sorted(seconds.items(), key=lambda kv: -kv[1]) if s >= 1.0}
target = Path(__file__).resolve().parent.parent / "tests" / "durations.json"
target.write_text(json.dumps(kept, indent=0) + "\n")
print(f"{len(kept)} tests of 1 s or more ({sum(kept.values()):.0f} s) written to {target}")
