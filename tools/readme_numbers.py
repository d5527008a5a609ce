"""The README's measured numbers, regenerated from committed results files (pfc/docs_numbers.py).

    python tools/readme_numbers.py demo [--run-dir runs/demo] [-- MAKE ARGS…]
        runs ``make demo MAKE ARGS`` (the Makefile's own recipe), times its steps, records the
        run's evaluations in docs/results/demo.json and rewrites the README blocks made from it
        (``make readme-numbers`` is this command)
    python tools/readme_numbers.py write     every README block from its committed results file
    python tools/readme_numbers.py check     exit 1 naming each block that differs from what
                                             ``write`` would put there, and each stale results file

Blocks: ``demo`` (the held-out table of Quick start) and ``demo-time`` (its time and machine),
both from docs/results/demo.json. A results file records a digest of what defines its run (for
the demo: the Makefile's ``demo`` rule and configs/synthetic_cpu.py); ``check`` calls it stale
when that digest changed. A change to the code the demo runs (sampler, loader, head) is not
detected there: rerun ``make readme-numbers`` after one, and commit what changed.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pfc.docs_numbers import block_names, read_block, replace_block  # noqa: E402
from pfc.errors import DataError  # noqa: E402
from pfc.evaluation.report import read_results  # noqa: E402
from pfc.evaluation.roc import format_rate  # noqa: E402
from pfc.files import write_atomic  # noqa: E402
from tools._cli import one_line_errors  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RESULTS_DIR = os.path.join(ROOT, "docs", "results")
DEMO_CONFIG = "configs/synthetic_cpu.py"

# a step of the demo, by what its command runs (anything else, e.g. rm -rf, counts in the total only)
DEMO_STEPS = (("venv", ("-m venv", "pip install", ".pfc-installed")),
              ("images", ("tools/make_synthetic.py",)),
              ("packing", ("tools/pack_shards.py",)),
              ("training", ("launch/train.py",)),
              ("evaluation", ("tools/evaluate.py", "tools/compare_eval.py")))


# ---------------------------------------------------------------------------------------------
# the demo's results file

def demo_definition_digest(root: str = ROOT) -> str:
    """sha256 over what defines the demo's numbers: the Makefile's ``demo`` rule (its line and
    recipe) and the recipe config's code (its comments, docstring and layout do not count)."""
    with open(os.path.join(root, "Makefile"), encoding="utf-8") as handle:
        makefile = handle.read()
    rule = re.search(r"^demo:.*\n(?:\t.*\n?)*", makefile, re.MULTILINE)
    if rule is None:
        raise DataError("Makefile has no 'demo:' rule")
    with open(os.path.join(root, DEMO_CONFIG), encoding="utf-8") as handle:
        config = ast.parse(handle.read())
    if ast.get_docstring(config) is not None:
        config.body = config.body[1:]
    return hashlib.sha256((rule.group(0) + ast.dump(config)).encode()).hexdigest()


def make_commands(make_argv: list[str]) -> list[tuple[str, str]]:
    """(first line, whole command) of every command ``make`` would run (``make -n``), in order:
    the first line is what make echoes when it starts the command."""
    listing = subprocess.run(make_argv[:1] + ["-n"] + make_argv[1:], cwd=ROOT, capture_output=True,
                             text=True, check=False)
    if listing.returncode != 0:
        raise DataError(f"{' '.join(make_argv)} -n failed: {listing.stderr.strip()}")
    commands, continued = [], False
    for line in listing.stdout.splitlines():
        if continued:
            commands[-1] = (commands[-1][0], commands[-1][1] + "\n" + line)
        elif line.strip():
            commands.append((line, line))
        continued = line.endswith("\\")
    return commands


def demo_step(command: str) -> str | None:
    """The DEMO_STEPS name of a command, by what it runs; None for anything else."""
    return next((name for name, marks in DEMO_STEPS if any(mark in command for mark in marks)), None)


def run_timed(make_argv: list[str]) -> tuple[dict[str, float], list[float]]:
    """Run ``make_argv`` with its output passed through: (seconds per step of DEMO_STEPS, a step
    lasting from the echo of its command to the next echo or the end, and ``total``; the 1-minute
    load average at each command's start and at the end). DataError when make fails."""
    commands = make_commands(make_argv)
    echoes = [first for first, _ in commands]
    seconds = {name: 0.0 for name, _ in DEMO_STEPS}
    loads = [os.getloadavg()[0]]
    start = time.monotonic()
    current, since, upcoming = None, start, 0
    process = subprocess.Popen(make_argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for raw in process.stdout:
        now = time.monotonic()
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        line = raw.decode(errors="replace").rstrip("\n")
        if line in echoes[upcoming:]:
            upcoming = echoes.index(line, upcoming) + 1
            if current is not None:
                seconds[current] += now - since
            current = demo_step(commands[upcoming - 1][1])
            since = now
            loads.append(os.getloadavg()[0])
    if process.wait() != 0:
        raise DataError(f"{' '.join(make_argv)} failed (exit {process.returncode}); nothing recorded")
    end = time.monotonic()
    if current is not None:
        seconds[current] += end - since
    seconds["total"] = end - start
    return seconds, loads + [os.getloadavg()[0]]


def demo_results(run_dir: str, seconds: dict[str, float], loads: list[float]) -> dict:
    """The results file's object from a finished demo run in ``run_dir`` and its step times."""
    (_, untrained), (_, trained) = read_results([os.path.join(run_dir, "untrained.json"),
                                                 os.path.join(run_dir, "trained.json")])
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        metrics = [json.loads(line) for line in handle if line.strip()]
    keep = ("set", "num_pairs", "accuracy", "accuracy_std", "auc", "tar@far=1e-3", "tar@far=1e-4")
    return {
        "written_by": "make readme-numbers (tools/readme_numbers.py demo)",
        "definition_sha256": demo_definition_digest(),
        "measured_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpus": os.cpu_count(), "load_average": [round(min(loads), 1), round(max(loads), 1)],
                    "torch": importlib.metadata.version("torch")},
        "venv_created": seconds["venv"] > 0,
        "seconds": {name: round(value, 1) for name, value in seconds.items()},
        "training": {"network": config["backbone"]["network"], "epochs": config["schedule"]["num_epochs"],
                     "steps": metrics[-1]["step"],
                     "samples_per_s": round(statistics.median(row["samples_per_s"] for row in metrics))},
        "impostor_pairs": impostor_pairs(os.path.join(ROOT, config["eval"]["pairs"])),
        "untrained": {key: untrained[key] for key in keep if key in untrained},
        "trained": {key: trained[key] for key in keep if key in trained},
    }


def impostor_pairs(path: str) -> int:
    """The pairs labelled 0 (different identities) in a pairs list ``path1 path2 1|0``."""
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.split()[-1:] == ["0"])


# ---------------------------------------------------------------------------------------------
# renderers: results object -> the block's Markdown

def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def render_demo_table(results: dict) -> str:
    """The held-out table: untrained and trained, accuracy ± std (10-fold), TAR@FAR=1e-3, AUC;
    below it why the TAR is n/a when the pairs cannot measure it."""
    untrained, trained, training = results["untrained"], results["trained"], results["training"]

    def row(label: str, result: dict, bold: bool) -> str:
        accuracy = f"{result['accuracy']:.4f} ± {result['accuracy_std']:.4f}"
        return (f"| {label} | {f'**{accuracy}**' if bold else accuracy} | "
                f"{format_rate(result['tar@far=1e-3'])} | {result['auc']:.4f} |")

    table = "\n".join([
        f"| held-out, {trained['num_pairs']:,} pairs | accuracy (10-fold) | TAR @ FAR=1e-3 | AUC |",
        "|---|---|---|---|",
        row(f"untrained {training['network']} net", untrained, False),
        row(f"after `make demo` ({training['epochs']} epochs, {training['steps']} steps)", trained, True),
    ])
    if trained["tar@far=1e-3"] is not None:
        return table
    return table + "\n\n" + textwrap.fill(
        f"TAR @ FAR=1e-3 is n/a here: the {trained['num_pairs']:,} pairs hold {results['impostor_pairs']:,} "
        "impostor pairs, and a FAR of 1e-3 needs at least 1,000 to be measured (tools print `n/a`, JSON "
        "holds `null`, for any FAR below 1/#impostor pairs).", width=98)


def render_demo_time(results: dict) -> str:
    """The demo's wall time by step, with the machine and load it was measured under."""
    seconds, machine = results["seconds"], results["machine"]
    low, high = machine["load_average"]
    venv = (f"creating `.venv` included ({_duration(seconds['venv'])} of it)" if results["venv_created"]
            else "`.venv` already made")
    return textwrap.fill(
        f"Whole `make demo`, {venv}: {_duration(seconds['total'])} (images {_duration(seconds['images'])}, "
        f"packing {_duration(seconds['packing'])}, training {_duration(seconds['training'])} at "
        f"≈ {results['training']['samples_per_s']} samples/s, evaluations "
        f"{_duration(seconds['evaluation'])}), measured by `make readme-numbers` on "
        f"{results['measured_utc'][:10]} on {machine['cpus']} CPU cores shared with other jobs "
        f"(1-minute load average {low:g}–{high:g} during the run), torch {machine['torch']}.", width=98)


# block name -> (results file under docs/results, renderer)
RENDERERS = {
    "demo": ("demo.json", render_demo_table),
    "demo-time": ("demo.json", render_demo_time),
}
# blocks another command reruns and checks itself (no results file): block name -> that command
CHECKED_ELSEWHERE = {"capacity": "make check-readme-capacity (tools/capacity_table.py; tests/test_capacity_table.py)",
                     "backbones": "python tools/backbone_table.py --check README.md (tests/test_backbone_table.py)"}
# results file -> (what defines its run, as a digest function; the command that rewrites it)
DEFINITIONS = {"demo.json": (demo_definition_digest, "make readme-numbers")}


# ---------------------------------------------------------------------------------------------
# write and check

def load_results(name: str, results_dir: str = RESULTS_DIR) -> dict:
    path = os.path.join(results_dir, name)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable results file ({exc})") from exc


def render_block(block: str, results_dir: str = RESULTS_DIR) -> str:
    """Block ``block``'s text from its results file; DataError when the file lacks a field the
    renderer needs (written by an older generator)."""
    name, render = RENDERERS[block]
    try:
        return render(load_results(name, results_dir))
    except KeyError as exc:
        command = DEFINITIONS.get(name, (None, "its measurement"))[1]
        raise DataError(f"docs/results/{name} has no field {exc} that block {block!r} needs: "
                        f"rerun `{command}`") from exc


def rendered(text: str, results_dir: str = RESULTS_DIR) -> str:
    """``text`` (a README) with every registered block rewritten from its results file."""
    for block in RENDERERS:
        text = replace_block(text, block, render_block(block, results_dir))
    return text


def problems(text: str, results_dir: str = RESULTS_DIR, root: str = ROOT) -> list[str]:
    """What ``check`` reports for a README ``text``: each block that differs from its rendering
    or has no renderer, each results file measured under another definition of its run. Empty
    when all is current."""
    found = []
    for name, (digest, command) in DEFINITIONS.items():
        if load_results(name, results_dir).get("definition_sha256") != digest(root):
            found.append(f"docs/results/{name} was measured with another definition of its run "
                         f"(Makefile rule or config changed since): rerun `{command}`")
    found += [f"README block {block!r} has no renderer in tools/readme_numbers.py's RENDERERS"
              for block in block_names(text) if block not in RENDERERS and block not in CHECKED_ELSEWHERE]
    for block, (name, _) in RENDERERS.items():
        if read_block(text, block) != render_block(block, results_dir):
            found.append(f"README block {block!r} differs from what docs/results/{name} gives: "
                         "run `python tools/readme_numbers.py write` (or rerun the measurement)")
    return found


def write_readme(results_dir: str = RESULTS_DIR) -> bool:
    """Rewrite README.md's blocks; True when it changed."""
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    new = rendered(text, results_dir)
    if new != text:
        write_atomic(README, new)
    return new != text


@one_line_errors
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run make demo, record docs/results/demo.json, rewrite the README")
    demo.add_argument("--run-dir", default="runs/demo", help="the demo's output folder (the Makefile's DEMO_RUN)")
    demo.add_argument("--make", default=os.environ.get("MAKE", "make"), help="the make program")
    demo.add_argument("make_args", nargs=argparse.REMAINDER, help="-- then arguments for make (VENV=…)")
    commands.add_parser("write", help="rewrite README blocks from docs/results/*.json")
    commands.add_parser("check", help="exit 1 when a README block or a results file is stale")
    args = parser.parse_args(argv)

    if args.command == "demo":
        make_args = args.make_args[1:] if args.make_args[:1] == ["--"] else args.make_args
        seconds, loads = run_timed([args.make, "--no-print-directory", "demo", *make_args])
        results = demo_results(os.path.join(ROOT, args.run_dir), seconds, loads)
        path = os.path.join(RESULTS_DIR, "demo.json")
        previous = load_results("demo.json") if os.path.exists(path) else {}
        os.makedirs(RESULTS_DIR, exist_ok=True)
        write_atomic(path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        same = all(previous.get(key) == results[key] for key in ("untrained", "trained"))
        print(f"wrote {os.path.relpath(path, ROOT)}: evaluations "
              f"{'identical to' if same else 'changed from'} the previous file")
    if args.command in ("demo", "write"):
        print("README.md " + ("rewritten" if write_readme() else "already current"))
        return 0
    with open(README, encoding="utf-8") as handle:
        found = problems(handle.read())
    for problem in found:
        print(problem)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
