"""What the access log line may show of a request's path."""

from __future__ import annotations

from cogview_api.api.errors import loggable_path


def test_an_images_capability_token_is_not_logged() -> None:
    assert loggable_path("/images/q2Vx8hRkX0oYw3bP.png") == "/images/<token>"


def test_control_characters_are_escaped_so_no_line_can_be_forged() -> None:
    shown = loggable_path("/api/v1/tasks/x\nINFO forged line\r")
    assert "\n" not in shown and "\r" not in shown
    assert shown == "/api/v1/tasks/x\\x0aINFO forged line\\x0d"


def test_a_long_path_is_cut_and_says_so() -> None:
    shown = loggable_path("/api/v1/tasks/" + "a" * 5000)
    assert len(shown) == 203 and shown.endswith("...")


def test_an_ordinary_path_is_shown_as_it_is() -> None:
    assert loggable_path("/api/v1/tasks/task_1") == "/api/v1/tasks/task_1"
