"""`perfml serve` usage errors, answered before any model or port is opened."""

from __future__ import annotations

import sys

import pytest

from perfml import cli


def test_variant_spec_is_checked(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "run", "--variant", "nodir"])
    assert exc.value.code == 2
    assert "NAME=DIR:WEIGHT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "run", "--variant", "b=dir:0"])
    assert "must be > 0" in capsys.readouterr().err


def test_spec_parsing():
    from perfml.cli.serve import variant_spec

    assert variant_spec("b=runs/x:2.5") == ("b", "runs/x", 2.5)
    assert variant_spec("b=runs/x") == ("b", "runs/x", 1.0)


def test_missing_extra_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ImportError
    assert cli.main(["serve", "run"]) == 2
    err = capsys.readouterr().err
    assert "uvicorn" in err and "pip install 'perfml[serve]'" in err


def test_bad_paths_and_names(tmp_path, capsys, serve_run):
    assert cli.main(["serve", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "no such directory" in capsys.readouterr().err
    argv = ["serve", str(serve_run), "--variant", f"base={serve_run}:1"]
    assert cli.main(argv) == 2
    assert "variant names must differ" in capsys.readouterr().err
    argv = ["serve", str(serve_run), "--max-context", "1000", "--device", "cpu"]
    assert cli.main(argv) == 2
    assert "1000" in capsys.readouterr().err


def test_a_port_in_use_is_a_usage_error(serve_run, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", str(serve_run), "--port", str(port), "--device", "cpu"]
        assert cli.main(argv) == 2
    assert f"could not listen on 127.0.0.1:{port}" in capsys.readouterr().err
