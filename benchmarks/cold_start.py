"""Captioning one photo from a cold start, side by side with `python -c "import torch"`.

    python3 benchmarks/cold_start.py [--photo examples/street.jpg] [--rounds 5] [--baseline DIR]

Each round runs, one after another (so a busy machine slows them alike):

    python -c pass                                    the interpreter alone
    python -c "import torch"                          the floor every torch program pays
    captioner caption PHOTO                           the shipped ensemble
    captioner caption --checkpoint flickr8k PHOTO     its first member alone
    python -c PARTS ...                               the caption path again, timed part by part

and prints the median wall clock of each, its CPU time (user + system, less disturbed than the wall
clock where other work shares the CPU), its peak resident memory, and its distance from `import torch`; then the medians of the parts (import torch, the command's other imports, loading
each member, loading the neighbour index, building the CNN, the first photo through it, the beam search and the
reranking) and the heavy modules
that the caption path imported. `captioner` is the console script beside this interpreter (else
`python -m captioner`); PYTHONPATH passes through, so a checkout's code is what runs. `--baseline DIR`
adds, to every round, the two caption commands with another checkout's code (PYTHONPATH=DIR), to
compare before and after a change on the same machine at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Modules the caption path should not need; the parts line says which of them it imported. (tqdm is not
# among them: `import torch` imports it itself.)
HEAVY = ("torchvision", "torch._dynamo", "sympy", "matplotlib", "nltk", "pycocoevalcap", "pycocotools",
         "scipy", "pandas", "filelock")

PARTS = r"""
import json, sys, time
photo, names, heavy = sys.argv[1], sys.argv[2].split(",") if sys.argv[2] else [], sys.argv[3].split(",")
t = [time.perf_counter()]; parts = {}
def mark(name):
    t.append(time.perf_counter()); parts[name] = t[-1] - t[-2]
import torch; mark("import torch")
import captioner.cli, captioner.commands.caption; mark("other imports")
from captioner import checkpoint
from captioner.inference import Captioner
from captioner.precision import resolve
files = checkpoint.pretrained_paths(names)
loaded = []
for i, f in enumerate(files, start=1):
    loaded.append(checkpoint.load_model(f)); mark(f"load member {i}")
model = loaded[0] if len(loaded) == 1 else checkpoint.ensemble_of(loaded, files)
index = Captioner._index_for(model, files); mark("load the neighbour index")
cap = Captioner(model, torch.device("cpu"), resolve("auto", "cpu"), index=index); mark("make the captioner")
cap.encoder; mark("build the CNN")
[(path, result)] = cap.caption_images([photo]); mark("first photo: read, CNN, beam search, reranking")
print(json.dumps({"parts": parts, "caption": result.caption,
                  "heavy": [m for m in heavy if m in sys.modules]}))
"""


def captioner_command() -> list[str]:
    script = Path(sys.executable).parent / "captioner"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "captioner"]


def run(argv: list[str], pythonpath: str | None = None) -> tuple[float, float, str, float]:
    """(wall seconds, peak resident MB, stdout, CPU seconds) of one child process; raises if it fails."""
    env = dict(os.environ) if pythonpath is None else {**os.environ, "PYTHONPATH": pythonpath}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if child.returncode:
            raise SystemExit(f"{' '.join(argv)} failed ({child.returncode}): {err.read()[-2000:]}")
        return wall, usage.ru_maxrss / 1024, out.read(), usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photo", default="examples/street.jpg")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--baseline", metavar="DIR", help="another checkout whose caption commands run alongside")
    args = p.parse_args()
    py = sys.executable
    cap = captioner_command()
    commands = {
        "python -c pass": [py, "-c", "pass"],
        'python -c "import torch"': [py, "-c", "import torch"],
        "captioner caption (ensemble)": [*cap, "caption", args.photo],
        "captioner caption --checkpoint flickr8k": [*cap, "caption", "--checkpoint", "flickr8k", args.photo],
    }
    paths = {name: None for name in commands}
    if args.baseline:
        for name in ("captioner caption (ensemble)", "captioner caption --checkpoint flickr8k"):
            commands[f"{name}, baseline"] = commands[name]
            paths[f"{name}, baseline"] = str(Path(args.baseline).resolve())
    parts_runs = {"ensemble": "", "flickr8k": "flickr8k"}
    walls: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
    parts: dict[str, list[dict]] = {name: [] for name in parts_runs}
    captions: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, argv in commands.items():
            wall, mb, out, cpu = run(argv, paths[name])
            walls[name].append((wall, mb, cpu))
            if "caption" in name:
                captions[name] = out.strip()
        for name, models in parts_runs.items():
            _, _, out, _ = run([py, "-c", PARTS, args.photo, models, ",".join(HEAVY)])
            parts[name].append(json.loads(out))

    print(f"{sys.executable}, {shutil.which('nproc') and os.cpu_count()} CPUs, {args.photo}; medians of "
          f"{args.rounds} interleaved rounds, cold processes")
    torch_runs = walls['python -c "import torch"']
    floor = statistics.median(r[0] for r in torch_runs)
    cpu_floor = statistics.median(r[2] for r in torch_runs)
    print(f"{'command':<52} {'wall s':>7} {'vs torch':>9} {'CPU s':>7} {'vs torch':>9} {'peak MB':>8}")
    for name, runs in walls.items():
        wall, mb, cpu = (statistics.median(r[i] for r in runs) for i in range(3))
        print(f"{name:<52} {wall:>7.2f} {wall - floor:>+9.2f} {cpu:>7.2f} {cpu - cpu_floor:>+9.2f} {mb:>8.0f}")
    for name, line in captions.items():
        print(f"  {name}: {line}")
    for name, runs in parts.items():
        keys = list(runs[0]["parts"])
        print(f"parts, {name} (in one process, medians):")
        for key in keys:
            print(f"  {key:<40} {statistics.median(r['parts'][key] for r in runs):>6.2f} s")
        print(f"  heavy modules imported: {', '.join(runs[0]['heavy']) or 'none'}")


if __name__ == "__main__":
    main()
