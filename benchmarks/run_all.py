"""Runs every benchmark script in this folder and prints all tables.

python benchmarks/run_all.py [--quick]
"""

import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent
SCRIPTS = [
  "norms.py",
  "optax_step.py",
  "penalty.py",
  "per_example.py",
  "dp_step.py",
  "real_models.py",
  "hot_paths.py",
]


def main() -> int:
  extra = sys.argv[1:]
  status = 0
  for name in SCRIPTS:
    path = HERE / name
    if not path.exists():
      print(f"(skipping {name}: not present)")
      continue
    print(f"\n## {name}\n", flush=True)
    status |= subprocess.call([sys.executable, str(path), *extra])
  return status


if __name__ == "__main__":
  sys.exit(main())
