"""One JSON of a device call's runs, for benchmarks/device/issue18_rest.sh to return.

Usage: python summarize_runs.py run RUN_DIR            one recipe run (run.json + a manifest per
                                                       stage): each stage's seconds, metrics,
                                                       runtime, train.device and train.compile
       python summarize_runs.py merge STEPS_TSV NAME=RUN_JSON...   the steps and those runs
STEPS_TSV holds one "name<TAB>exit code<TAB>milliseconds" line per step the script timed. A run is
summarized as soon as it ends, since the next run reuses (and rewrites) its directory; a stage
without a manifest (it failed or did not run) says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_steps(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name, rc, ms = line.split("\t")
        rows.append({"step": name, "rc": int(rc), "seconds": round(int(ms) / 1000, 1)})
    return rows


def summarize_run(run_dir: Path) -> dict:
    if not (run_dir / "run.json").is_file():
        return {"missing": f"{run_dir}/run.json (the run did not start)"}
    stages = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["stages"]
    out = {}
    for stage in stages:
        path = run_dir / stage["name"] / "manifest.json"
        if not path.is_file():
            out[stage["name"]] = {"missing": "no manifest: the stage failed or did not run"}
            continue
        m = json.loads(path.read_text(encoding="utf-8"))
        out[stage["name"]] = {
            "seconds": m.get("duration_s"),
            "metrics": m.get("metrics"),
            "runtime": m.get("runtime"),
            "device": (m.get("config") or {}).get("train", {}).get("device"),
            "compile": (m.get("config") or {}).get("train", {}).get("compile"),
        }
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["run"] and len(argv) == 2:
        summary = summarize_run(Path(argv[1]))
    elif argv[:1] == ["merge"] and len(argv) >= 2:
        summary = {"steps": read_steps(Path(argv[1]))}
        for arg in argv[2:]:
            name, path = arg.split("=", 1)
            summary[name] = json.loads(Path(path).read_text(encoding="utf-8"))
    else:
        sys.exit(__doc__)
    json.dump(summary, sys.stdout, indent=1, default=str)
    print()


if __name__ == "__main__":
    main(sys.argv[1:])
