"""Reads a ``pip install --dry-run --report`` of the wheel (with its dependencies) into a stack's environment and fails
if pip would install the package without resolving it, or would replace the stack's torch, triton or transformers.

Usage: python .ci/check_resolution.py REPORT.json
"""

import json
import sys

KEPT = ("torch", "triton", "transformers")


def main(report_path: str) -> None:
    with open(report_path) as report:
        wanted = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.load(report)["install"]}
    if "prmbench-fast" not in wanted:
        sys.exit(f"check_resolution: the dry run did not resolve prmbench-fast itself ({report_path})")
    replaced = sorted(f"{name}=={wanted[name]}" for name in KEPT if name in wanted)
    if replaced:
        sys.exit(f"check_resolution: the wheel's dependencies would install {', '.join(replaced)} over the stack's")
    others = sorted(f"{name}=={version}" for name, version in wanted.items() if name != "prmbench-fast")
    print(f"== pip keeps the stack's {', '.join(KEPT)}; it would add: {', '.join(others) or 'nothing'}")


if __name__ == "__main__":
    main(sys.argv[1])
