"""Prints a set-up command from README.md, so CI runs exactly what the README tells users.

    python tools/readme_command.py train|test

The command is the first ```bash block after the line `<!-- command: NAME -->`.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_command(name, text=None):
    if text is None:
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            text = f.read()
    m = re.search(rf"<!-- command: {re.escape(name)} -->\s*```bash\n(.*?)```", text, re.S)
    if not m:
        raise SystemExit(f"README.md has no `<!-- command: {name} -->` block")
    return " ".join(line.rstrip("\\").strip() for line in m.group(1).strip().splitlines())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(readme_command(sys.argv[1]))
