"""`make bench`: every benchmark that writes BENCHMARKS.md, in one run (CPU unless a GPU is present).

The coverage sweep over all torchvision models is separate (`make coverage`, ~1 h on 2 cores)."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
STEPS = [
    ["bench_surgery.py"],
    ["bench_method.py", "compare"],
    ["bench_method.py", "robustness"],
    ["bench_method.py", "cost"],
    ["bench_method.py", "overhead"],
    *[["bench_budget.py", "run", "--model", m] for m in ("lenet300_100", "lenet5", "resnet20", "resnet56", "vgg16")],
    ["bench_budget.py", "report"],
    ["defaults_sweep.py", "--write"],
]


def main() -> int:
    for step in STEPS:
        print(f"== {' '.join(step)}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / step[0]), *step[1:]])
        if code:
            print(f"{' '.join(step)} failed with exit code {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
