"""fastunet/settings.py: every FASTUNET_* variable is documented in one table, read in one
module (once, for the kernel switches), and docs/environment.md is that table."""
import os
import re
import subprocess
import sys

import pytest

from fastunet import _native, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = re.compile(r"\bFASTUNET_[A-Z0-9_]*[A-Z0-9]\b")
# compile-time macros of the native sources, not environment variables
MACROS = {"FASTUNET_CUDA_ARCHS", "FASTUNET_DEBUG", "FASTUNET_CLONES", "FASTUNET_STREAM_STORES",
          "FASTUNET_NHWC", "FASTUNET_NHWC_AVX2", "FASTUNET_WINO", "FASTUNET_WINO_X86",
          "FASTUNET_CHECK_POSITIVE", "FASTUNET_CHECK_SAME_DEVICE", "FASTUNET_CPP_SOURCES",
          "FASTUNET_CUDA_SOURCES", "FASTUNET_ALL_SOURCES"}


def _files(*tops, exts=(".py", ".cpp", ".h", ".cu", ".cuh", ".txt", ".sh")):
    for top in tops:
        path = os.path.join(ROOT, top)
        if os.path.isfile(path):
            yield path
            continue
        for folder, _, names in os.walk(path):
            for name in names:
                if name.endswith(exts) or name == "run":
                    yield os.path.join(folder, name)


def test_every_variable_in_the_code_is_in_the_table():
    documented = {v.name for v in settings.VARIABLES}
    found = {}
    for path in _files("fastunet", "csrc", "tests", "benchmarks", "tools", "setup.py",
                       "CMakeLists.txt", ".ci"):
        for name in NAME.findall(open(path, errors="replace").read()):
            if not name.startswith(("FASTUNET_CHECK",)):
                found.setdefault(name, os.path.relpath(path, ROOT))
    missing = {n: p for n, p in found.items() if n not in documented and n not in MACROS}
    assert not missing, f"undocumented FASTUNET_* variables (add them to settings.VARIABLES): {missing}"
    assert documented - set(found) == set(), "documented but never read"


def test_only_settings_reads_the_environment():
    """In the package, only settings.py touches os.environ for FASTUNET_* variables; the native
    sources read no environment at all (their switches come from _native)."""
    for path in _files("fastunet"):
        rel = os.path.relpath(path, ROOT)
        text = open(path).read()
        if rel == os.path.join("fastunet", "settings.py"):
            continue
        assert not re.search(r"environ(\.get)?[\[(]\s*[\"']FASTUNET_", text), rel
    readers = []
    for path in _files("csrc"):
        for line in open(path):
            if "getenv" in line:
                readers.append((os.path.relpath(path, ROOT), line.strip()))
    assert readers == []  # C++ takes its switches from _native (csrc/common/switches.h)


def test_docs_table_is_the_generated_one():
    doc = open(os.path.join(ROOT, "docs", "environment.md")).read()
    table = doc.split("<!-- generated: python -m fastunet.settings -->\n")[1].split(
        "\n<!-- end generated -->")[0]
    assert table == settings.markdown_table(), "regenerate: python -m fastunet.settings"


@pytest.mark.parametrize("env, expected", [
    ({}, settings.Settings()),
    ({"FASTUNET_FUSED": "0", "FASTUNET_WINOGRAD": "0"}, settings.Settings(fused=False,
                                                                          winograd=False)),
    ({"FASTUNET_FUSED": "1", "FASTUNET_CPU_ISA": "AVX2", "FASTUNET_CUDNN_FUSED_CONV": "1"},
     settings.Settings(fused=True, cpu_isa="avx2", cudnn_fused_conv=True)),
    ({"FASTUNET_FUSED": "auto", "FASTUNET_DISABLE_EXTENSION": "1"},
     settings.Settings(disable_extension=True)),
])
def test_parsing(env, expected):
    assert settings.read(env) == expected


def test_a_typo_warns_and_keeps_the_default():
    with pytest.warns(RuntimeWarning, match="FASTUNET_WINOGRAD='maybe'"):
        assert settings.read({"FASTUNET_WINOGRAD": "maybe"}).winograd is True
    with pytest.warns(RuntimeWarning, match="FASTUNET_CPU_ISA"):
        assert settings.read({"FASTUNET_CPU_ISA": "sse"}).cpu_isa == ""


def test_override_restores_and_tells_the_listeners():
    seen = []
    settings.on_change(seen.append)
    try:
        before = settings.current()
        with settings.override(winograd=not before.winograd) as inside:
            assert settings.current() is inside and inside.winograd != before.winograd
        assert settings.current() is before
        assert [s.winograd for s in seen] == [not before.winograd, before.winograd]
    finally:
        settings._LISTENERS.remove(seen.append)


def test_read_once_at_import():
    """A change of the environment after import does not change the switches."""
    code = ("import os, fastunet; from fastunet import settings\n"
            "os.environ['FASTUNET_WINOGRAD'] = '0'\n"
            "assert settings.current().winograd is True\n"
            "print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "FASTUNET_WINOGRAD"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(not _native.LOADED, reason="needs the native extension")
def test_cpu_isa_reaches_the_native_library():
    code = "from fastunet import _native; print(_native._C.winograd_fast_kernel())"
    env = dict(os.environ, FASTUNET_CPU_ISA="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTUNET_CACHE", str(tmp_path))
    assert settings.cache_dir() == str(tmp_path)
    monkeypatch.delenv("FASTUNET_CACHE")
    assert settings.cache_dir().endswith(os.path.join(".cache", "fastunet"))
