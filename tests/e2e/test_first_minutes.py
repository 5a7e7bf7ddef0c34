"""The operator's first five minutes, as a new user meets them: the command line as a subprocess."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

from cogview_api import __version__
from tests.support import CLI, server_env


def run(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_default_data_folder_does_not_follow_the_current_directory(
    tmp_path: Path, tiny_cache: Path
) -> None:
    env = server_env(tiny_cache, {"XDG_DATA_HOME": str(tmp_path / "xdg")})
    del env["COGVIEW_DATA_DIR"]  # the tests' own choice; a user has the default
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    made = run(here, env, "keys", "create", "--name", "alice", "--credits", "8", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)  # stdout stays one JSON document
    database = tmp_path / "xdg" / "cogview-api" / "cogview.db"
    assert made.stderr.splitlines() == [f"cogview-api: database sqlite:///{database}"]
    listed = run(elsewhere, env, "keys", "list", "--json")
    assert [k["id"] for k in json.loads(listed.stdout)] == [key["id"]]
    assert f"database sqlite:///{database}" in listed.stderr
    assert not list(here.iterdir()) and not list(elsewhere.iterdir())


def test_a_key_without_credits_says_how_to_grant_and_list_has_a_header(
    tmp_path: Path, tiny_cache: Path
) -> None:
    env = server_env(tiny_cache)
    made = run(tmp_path, env, "keys", "create", "--name", "bob")
    assert made.returncode == 0, made.stderr
    key_id = made.stdout.split()[1]
    assert "with 0 credits" in made.stdout
    assert f"cogview-api credits grant {key_id} 100" in made.stdout
    assert f"database sqlite:///{tmp_path}/cogview-data/cogview.db" in made.stderr
    rich = run(tmp_path, env, "keys", "create", "--name", "carol", "--credits", "4")
    assert "credits grant" not in rich.stdout + rich.stderr
    header, *rows = run(tmp_path, env, "keys", "list").stdout.splitlines()
    assert header.split() == ["ID", "PREFIX", "BALANCE", "STATE", "NAME"]
    assert [row.split()[0] for row in rows] == [key_id, rich.stdout.split()[1]]
    assert header.index("BALANCE") + len("BALANCE") == rows[0].index(" 0 ") + 2  # aligned


def test_version_and_a_bad_flag_show_the_commands_own_usage(
    tmp_path: Path, tiny_cache: Path
) -> None:
    env = server_env(tiny_cache)
    version = run(tmp_path, env, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"cogview-api {__version__}"
    bad = run(tmp_path, env, "serve", "--bad-flag")
    assert bad.returncode == 2
    assert bad.stderr.startswith("usage: cogview-api serve ")
    assert "--http-processes" in bad.stderr
    assert "cogview-api serve: error: unrecognized arguments: --bad-flag" in bad.stderr
    nested = run(tmp_path, env, "keys", "list", "--nope")
    assert nested.stderr.startswith("usage: cogview-api keys list ")


def test_serve_refuses_a_taken_port_before_loading_a_model(
    tmp_path: Path, tiny_cache: Path
) -> None:
    env = server_env(tiny_cache, {"COGVIEW_MODEL": "THUDM/CogView4-6B"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run(tmp_path, env, "serve", "--port", str(port))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    # Refused on the port, not on the GPU this machine lacks: the model was never loaded.
    assert done.stderr.strip().splitlines() == [
        f"cogview-api: port {port} on 127.0.0.1 is taken (Address already in use): stop what "
        "runs there, or choose another with --port (COGVIEW_PORT)."
    ]
    assert not (tmp_path / "cogview-data").exists()


def test_a_database_at_the_old_default_place_is_pointed_out(
    tmp_path: Path, tiny_cache: Path
) -> None:
    env = server_env(tiny_cache, {"XDG_DATA_HOME": str(tmp_path / "xdg")})
    del env["COGVIEW_DATA_DIR"]
    old = tmp_path / "cogview-data" / "cogview.db"
    old.parent.mkdir()
    old.write_bytes(b"")
    done = run(tmp_path, env, "keys", "list")
    assert done.returncode == 0, done.stderr
    assert f"note: {old} (the default place before COGVIEW_DATA_DIR)" in done.stderr
    assert f"COGVIEW_DATA_DIR={old.parent}" in done.stderr
    kept = run(tmp_path, {**env, "COGVIEW_DATA_DIR": "cogview-data"}, "migrate")
    assert kept.returncode == 0, kept.stderr
    assert "note:" not in kept.stderr
