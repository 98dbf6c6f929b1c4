"""README.md's code runs as written: every ```python block is executed, every ```yaml config
block loads and finds its data, and every `python -m fastunet.X ...` line of a ```bash block
parses with that command's own argument parser.

The blocks run one after another in a scratch folder that holds what the README says a user
brings: ``photo.jpg`` (a colour fundus photograph; here a synthetic one) and the checkpoint the
README's first command writes, ``work_dirs/synthetic/latest.pth`` (here untrained weights of the
same config). A python block that needs anything else (a data set or a checkpoint the user must
provide) is skipped only when the line before it says so, visibly::

    <!-- readme-test: skip (needs ...) -->
"""
import importlib
import os
import re
import shlex

import pytest
import torch

import fastunet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = "<!-- readme-test: skip"
# commands whose arguments are checked, and where their parsers are
PARSERS = {"fastunet.train": "fastunet.train", "fastunet.test": "fastunet.test",
           "fastunet.predict": "fastunet.predict", "fastunet.convert": "fastunet.convert"}


def readme_blocks(language):
    """[(line number, code, skipped)] of the README's ```language blocks (top-level ones)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}" and not lines[i].startswith(" "):
            end = lines.index("```", i + 1)
            skipped = i > 0 and lines[i - 1].strip().startswith(SKIP)
            blocks.append((i + 1, "\n".join(lines[i + 1:end]) + "\n", skipped))
            i = end
        i += 1
    return blocks


PYTHON = readme_blocks("python")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """The folder the blocks run in, with photo.jpg and work_dirs/synthetic/latest.pth."""
    from fastunet.data import build_dataset

    folder = tmp_path_factory.mktemp("readme")
    item = build_dataset("synthetic", str(folder / ".cache"), "validation", num_images=1,
                         size=(300, 280), progress=False)[0]
    from PIL import Image

    Image.fromarray(item["img"]).save(folder / "photo.jpg", quality=95)
    torch.manual_seed(0)
    cfg = fastunet.get_config("synthetic")
    os.makedirs(folder / "work_dirs" / "synthetic")
    fastunet.models.save_checkpoint(folder / "work_dirs" / "synthetic" / "latest.pth",
                                    fastunet.build_segmentor(cfg), {"config": cfg})
    return folder


@pytest.fixture(autouse=True)
def _in_scratch(scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    monkeypatch.setenv("FASTUNET_CACHE", str(scratch / ".cache"))


def test_the_readme_has_python_blocks_and_skips_few():
    assert len(PYTHON) >= 4
    assert sum(skipped for _, _, skipped in PYTHON) <= 1


@pytest.mark.parametrize("line, code, skipped", PYTHON, ids=[f"line{b[0]}" for b in PYTHON])
def test_python_block_runs_as_written(line, code, skipped, capsys):
    if skipped:
        pytest.skip(f"README.md:{line} is marked as needing the user's own data or checkpoint")
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def _make_data_folders():
    """Run the README's python blocks that create the folders its YAML configs name."""
    for line, code, skipped in PYTHON:
        if "os.makedirs" in code and not skipped:
            exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def test_yaml_config_blocks_load_and_find_their_data():
    pytest.importorskip("yaml")
    from fastunet.training.data import build_split

    configs = readme_blocks("yaml")
    assert configs, "the README shows a YAML config"
    for line, text, _ in configs:
        name = re.match(r"# (\S+\.ya?ml)\n", text)
        assert name, f"README.md:{line}: a YAML block starts with '# FILE.yaml'"
        with open(name[1], "w") as f:
            f.write(text)
        cfg = fastunet.get_config(name[1])
        assert cfg["name"] == name[1].rsplit(".", 1)[0]
        root = cfg["data"].get("data_root")
        if root and not os.path.isdir(root):
            _make_data_folders()
        for split in ("training", "validation"):
            assert len(build_split(cfg["data"], split)) > 0
        fastunet.build_segmentor(cfg)


def _commands():
    """(line, module, argv) of each `python -m fastunet.X ...` in the README's bash blocks."""
    out = []
    for line, text, _ in readme_blocks("bash"):
        for command in text.replace("\\\n", " ").splitlines():
            command = command.split(" # ")[0].strip()
            match = re.match(r"python -m (fastunet\.\w+)\s*(.*)", command)
            if not match or match[1] not in PARSERS:
                continue
            argv = re.sub(r"<[^>]*>", "PLACEHOLDER", match[2]).replace("[", "").replace("]", "")
            out.append((line, match[1], shlex.split(argv)))
    return out


COMMANDS = _commands()


def test_the_readme_shows_each_command():
    assert {module for _, module, _ in COMMANDS} == set(PARSERS)


@pytest.mark.parametrize("line, module, argv", COMMANDS,
                         ids=[f"line{c[0]}-{c[1]}" for c in COMMANDS])
def test_command_lines_parse(line, module, argv, capsys):
    parser = importlib.import_module(PARSERS[module]).build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"README.md:{line}: python -m {module} {' '.join(argv)}: "
                    f"{capsys.readouterr().err.strip()} (exit {e.code})")
