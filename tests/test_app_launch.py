"""launch.py's command line: every flag documented, bad values refused before any model is loaded."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

import launch

ROOT = Path(__file__).resolve().parent.parent
FLAGS = (
    "--model", "--head", "--no-head", "--load-in-4bit", "--load-in-8bit", "--device", "--dtype", "--host",
    "--port", "--share", "--auth", "--no-browser", "--max-new-tokens", "--lookup", "--tree", "--sampling-tree",
    "--adaptive", "--backend", "--method",
)


def test_help_explains_every_flag():
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    for flag in FLAGS:
        assert flag in out
    assert "speculative decoding" in out


def test_defaults():
    args = launch.parse_args([])
    assert (args.model, args.head, args.device, args.dtype) == (None, None, "auto", "auto")
    assert (args.host, args.port, args.share, args.auth, args.no_browser) == ("127.0.0.1", 7860, False, None, False)
    assert (args.lookup, args.adaptive) == (5, False) and launch.parse_args(["--adaptive"]).adaptive


def test_quantization_flags_exclude_each_other():
    with pytest.raises(SystemExit):
        launch.parse_args(["--load-in-4bit", "--load-in-8bit"])


def test_auth_must_be_user_colon_password():
    assert launch.parse_auth("me:se:cret") == ("me", "se:cret")
    assert launch.parse_auth(None) is None
    for bad in ("me", ":pw", "me:"):
        with pytest.raises(ValueError, match="user:password"):
            launch.parse_auth(bad)


def test_bad_arguments_fail_fast_with_a_message(capsys):
    assert launch.main(["--auth", "nopassword"]) == 2
    assert "--auth must look like user:password" in capsys.readouterr().err
    assert launch.main(["--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    assert launch.main(["--lookup", "65"]) == 2
    assert "--lookup must be between 0 (off) and 64" in capsys.readouterr().err
    assert launch.main(["--tree", "8,4"]) == 2
    err = capsys.readouterr().err
    assert "--tree '8,4' is not auto, paper or TOTAL,DEPTH,TOPK (three whole numbers, e.g. 4,2,4)" in err
    assert launch.main(["--sampling-tree", "4,2,99"]) == 2
    err = capsys.readouterr().err
    assert "--sampling-tree '4,2,99'" in err and "top_k must be between 1 and 64" in err


def test_tree_arguments():
    assert launch.parse_tree_arg("auto", "--tree", ("auto", "paper")) == "auto"
    assert launch.parse_tree_arg("same", "--sampling-tree", ("auto", "same")) == "same"
    assert launch.parse_tree_arg("4,2,4", "--sampling-tree", ("auto", "same")) == launch.TreeConfig(4, 2, 4)
    with pytest.raises(ValueError, match="top_k must be between 1 and 64"):
        launch.parse_tree_arg("4,2,99", "--sampling-tree", ("auto", "same"))
    with pytest.raises(ValueError, match="--sampling-tree 'paper' is not auto, same"):
        launch.parse_tree_arg("paper", "--sampling-tree", ("auto", "same"))


def test_a_busy_port_is_refused_before_the_model_loads(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert launch.main(["--port", str(port), "--no-browser"]) == 2
    out, err = capsys.readouterr()
    assert f"cannot serve on 127.0.0.1:{port}" in err and "pick another --port" in err
    assert "Loading" not in out  # refused before the libraries, let alone the model
    assert launch.port_problem("127.0.0.1", port) is None  # free again once closed


def test_sampling_runs_vanilla_where_the_tuned_sampling_tree_does_not_pay():
    from types import SimpleNamespace

    from engine.backend import SAMPLED_MARGIN

    method, note = launch.sampled_method(SimpleNamespace(speedup=SAMPLED_MARGIN - 0.05))
    assert method == "vanilla" and f"{SAMPLED_MARGIN - 0.05:.2f}x vanilla" in note
    assert launch.sampled_method(SimpleNamespace(speedup=SAMPLED_MARGIN)) == (None, "")
