"""The minimal reference's budgets, measured (issue "A minimal reference"): lines per stage and of its
shell (from its "# --- The shell" line to the end), options that `--help` lists, and the Python outside
tests/ and experiments/. It prints the figures; nothing fails on them.

    python experiments/budget.py
"""
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["01_generate_data.py", "02_train_expert.py", "03_merge.py", "04_evaluate.py"]
BUDGET = {"stage": 250, "shell": 100, "common.py": 250, "core": 1250, "all": 2200, "options": 48, "options per stage": 15}


def options(script):
    """The options `--help` lists (positional arguments included, -h excluded)."""
    run = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
    if run.returncode:  # a stage that cannot start (no torch here, say) lists no options: never count that as 0
        raise SystemExit(f"error: {script} --help failed: {(run.stderr.strip().splitlines() or ['no output'])[-1]}")
    text = run.stdout
    sections = re.split(r"\n(?=\S[^\n]*:\n)", text.split("\n\n", 1)[1] if "\n\n" in text else text)
    listed = [line.split()[0].rstrip(",") for s in sections if s.startswith(("options:", "positional arguments:"))
              for line in s.splitlines()[1:] if re.match(r"  \S", line)]
    return [o for o in listed if o not in ("-h",)]


def main():
    lines = {f: sum(1 for _ in open(os.path.join(ROOT, f))) for f in STAGES + ["common.py"]}
    rows = []
    for f in STAGES:
        text = open(os.path.join(ROOT, f)).read().splitlines()
        shell = next((len(text) - i for i, line in enumerate(text) if line.startswith("# --- The shell")), None)
        rows.append((f, lines[f], shell, len(options(f))))
    print("| file | lines | shell | options |\n|---|---|---|---|")
    for f, n, shell, opts in rows:
        print(f"| {f} | {n} | {shell} | {opts} |")
    print(f"| common.py | {lines['common.py']} | | |")
    core = sum(lines.values())
    outside = [f for f in glob.glob(os.path.join(ROOT, "*.py"))]
    total = sum(sum(1 for _ in open(f)) for f in outside)
    print(f"\nfour stages + common.py: {core} lines (budget {BUDGET['core']}); all Python outside tests/ and "
          f"experiments/: {total} lines in {len(outside)} files (budget {BUDGET['all']}); options: "
          f"{sum(r[3] for r in rows)} (budget {BUDGET['options']}, at most {BUDGET['options per stage']} a stage); "
          f"per stage: {BUDGET['stage']} lines, shell ~{BUDGET['shell']}; common.py {BUDGET['common.py']}")


if __name__ == "__main__":
    main()
