"""`aurora serve` flags: safe defaults, drafter choice, learner fallback (no model loaded)."""

from __future__ import annotations

import sys

import pytest

from aurora_spec.cli import UsageError, build_parser
from aurora_spec.flywheel.api import NullLearner
from aurora_spec.server.cli import default_drafter, make_learner, server_settings


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_defaults_bind_loopback_and_learn_with_eagle3() -> None:
    a = parse()
    assert (a.host, a.port, a.no_learn, a.api_key, a.admin_key) == ("127.0.0.1", 8000, False,
                                                                      None, None)
    assert default_drafter(a) == "eagle3"


def test_no_learn_without_weights_defaults_to_ngram() -> None:
    assert default_drafter(parse("--no-learn")) == "ngram"
    assert default_drafter(parse("--no-learn", "--draft-weights", "/w")) == "eagle3"
    assert default_drafter(parse("--no-learn", "--drafter", "none")) == "none"


def test_keys_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("AURORA_API_KEY", "k1")
    monkeypatch.setenv("AURORA_ADMIN_KEY", "k2")
    s = server_settings(parse())
    assert (s.api_key, s.admin_key) == ("k1", "k2")


@pytest.mark.parametrize("argv", [("--port", "0"), ("--max-batch", "0"), ("--max-queue", "-1"),
                                  ("--trainer-threads", "0"),
                                  ("--api-key", "same", "--admin-key", "same")])
def test_bad_flags_are_usage_errors(argv) -> None:
    with pytest.raises(UsageError):
        server_settings(parse(*argv))


def test_learner_choice(monkeypatch) -> None:
    a = parse("--no-learn")
    a.drafter = default_drafter(a)
    assert isinstance(make_learner(a, runtime=None), NullLearner)
    a = parse("--drafter", "ngram")
    a.drafter = default_drafter(a)
    assert isinstance(make_learner(a, runtime=None), NullLearner)  # only eagle3 learns
    # The online learner's module missing: serve a fixed draft instead of failing.
    monkeypatch.setitem(sys.modules, "aurora_spec.flywheel.learner", None)
    a = parse()
    a.drafter = default_drafter(a)
    assert isinstance(make_learner(a, runtime=None), NullLearner)


def test_trainer_priority_is_auto_unless_a_flag_says() -> None:
    """No flag: the learner picks (idle-class trainer for a trained head, sharing at day 0)."""
    assert parse().trainer_idle is None
    assert parse("--trainer-idle").trainer_idle is True
    assert parse("--no-trainer-idle").trainer_idle is False
    assert parse().trainer_threads is None  # auto: the learner picks by the trainer's class
    assert parse("--trainer-threads", "2").trainer_threads == 2
    assert parse().trainer_rests is None  # auto: an idle-class trainer does not rest
    assert parse("--no-trainer-rests").trainer_rests is False
    assert parse().rollback_paired and not parse("--no-rollback-paired").rollback_paired


def test_lookup_tree_flag_sets_narrowing() -> None:
    """``--lookup-tree``: auto (measured at load) unless narrow or wide is asked for."""
    from aurora_spec.cli import drafter_config

    got = [drafter_config(parse("--drafter", "eagle3", *extra)).lookup_narrow
           for extra in ((), ("--lookup-tree", "narrow"), ("--lookup-tree", "wide"))]
    assert got == [None, True, False]
    with pytest.raises(SystemExit):
        parse("--lookup-tree", "sideways")
