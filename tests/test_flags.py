"""Every flag of every script explains itself in --help, and a setting lives in one place.

The parser of each script is built the way the script builds it (its own main), caught before it
parses anything: every option has help text, the shared flags are cli.SHARED's, and each flag named
after a constant defaults to it, its help being that constant's comment.
"""
from __future__ import annotations

import argparse
import importlib.util

import pytest
from conftest import ROOT

from common import cli

SCRIPTS = sorted(p.name for p in ROOT.glob("[0-9]_*.py")) + ["convert_to_safetensors.py"]


class Built(Exception):
    """Raised by parse_args with the parser the script built."""


def built_parser(script: str, monkeypatch) -> cli.Parser:
    spec = importlib.util.spec_from_file_location(script[:-3].replace(".", "_"), ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def catch(self, *a, **k):
        raise Built(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Built) as e:
        module.main([])
    return e.value.args[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help(script, monkeypatch):
    p = built_parser(script, monkeypatch)
    assert isinstance(p, cli.Parser)
    options = [a for a in p._actions if not isinstance(a, argparse._HelpAction)]
    assert options
    for a in options:
        assert a.help and a.help.strip(), f"{script}: {a.option_strings or a.dest} has no help"
        constant = a.dest.upper()
        if constant in p.comments and not any(s in ("--test-prompt", "--filter") for s in a.option_strings):
            assert a.default is p.constants[constant] or a.default == p.constants[constant], (script, a.dest)
    for name, kwargs in cli.SHARED.items():
        if name in p._option_string_actions:
            assert set(kwargs.get("aliases", ())) <= set(p._option_string_actions[name].option_strings)
    if "--out-dir" in p._option_string_actions:  # one spelling everywhere, the old one kept
        assert p._option_string_actions["--output-dir"] is p._option_string_actions["--out-dir"]


def test_help_is_the_constants_comment():
    source = ("X = 1  # one line\n# above,\n# in two lines\nY = [1,\n     2]\nZ = 3\nlower = 4  # not a constant\n")
    assert cli.constant_comments(source) == {"X": "one line", "Y": "above, in two lines"}


def test_planted_flag_without_help_is_refused(tmp_path):
    script = tmp_path / "s.py"
    script.write_text('"""doc"""\nSHOWN = 1  # shown\nSILENT = 2\n')
    p = cli.Parser({"__doc__": "doc", "__file__": str(script), "SHOWN": 1, "SILENT": 2})
    assert p.flag("--shown", type=int).help == "shown"
    with pytest.raises(TypeError, match="--silent"):
        p.flag("--silent", type=int)


def test_settings_come_from_the_parsed_arguments():
    args = argparse.Namespace(model_dir="m", out_dir=None, layers=None, atol=0.1)
    assert cli.settings(args, OUT_DIR="o") == {"MODEL_DIR": "m", "OUT_DIR": "o", "LAYERS": "all", "ATOL": 0.1}
