"""The blind arena's rules (core.arena): anonymous pairs, one vote per voter per pair, no vote on one's own
model, names revealed with the vote, a Bradley-Terry leaderboard, and rounds that survive a restart."""
from __future__ import annotations

import csv
import io
import json

import pytest

from core.arena import BASE, Arena, ArenaError, Sampling, bradley_terry

MODELS = [BASE, "alice-pirate", "bob-bard"]
OWNERS = {"alice-pirate": "alice", "bob-bard": "bob"}


def fake_generate(calls):
    def generate(rnd, prompt, models):
        calls.append((prompt, tuple(models)))
        return [f"{m} continues {rnd.prompts[prompt]!r}" for m in models]
    return generate


@pytest.fixture
def arena(tmp_path):
    return Arena(tmp_path / "arena")


def open_round(arena, prompts="Once upon a time\nAhoy", models=MODELS):
    return arena.open_round("Pirates vs bards", "tiny", prompts, models, OWNERS, Sampling(), opened_by="teacher")


def test_a_voter_never_sees_a_pair_holding_their_own_model_and_votes_once_per_pair(arena):
    rnd = open_round(arena)
    seen = []
    while (pair := arena.next_pair(rnd.id, "alice", fake_generate([]))) is not None:
        seen.append(arena.vote(rnd.id, "alice", "a"))
    # 2 prompts x the one pair without alice's adapter
    assert len(seen) == 2 and all({s["a"], s["b"]} == {BASE, "bob-bard"} for s in seen)
    assert arena.next_pair(rnd.id, "alice", fake_generate([])) is None
    carol = []
    while arena.next_pair(rnd.id, "carol", fake_generate([])) is not None:
        carol.append(arena.vote(rnd.id, "carol", "tie"))
    assert len(carol) == 6  # 2 prompts x 3 pairs, each once


def test_the_texts_are_anonymous_until_the_vote_and_generated_once_per_prompt_and_model(arena):
    rnd = open_round(arena)
    calls = []
    pair = arena.next_pair(rnd.id, "carol", fake_generate(calls))
    assert pair.text_a != pair.text_b
    assert not any(name in repr(pair.__dict__.keys()) for name in MODELS)  # the pair carries texts, no names
    again = arena.next_pair(rnd.id, "carol", fake_generate(calls))
    assert again == pair  # asked twice before voting: the same pair, nothing generated again
    reveal = arena.vote(rnd.id, "carol", "b")
    assert pair.text_a.startswith(reveal["a"]) and pair.text_b.startswith(reveal["b"])
    assert len(calls) == 1
    for voter in ("dave", "erin", "frank", "gina"):
        while arena.next_pair(rnd.id, voter, fake_generate(calls)) is not None:
            arena.vote(rnd.id, voter, "a")
    generated = [(p, m) for p, models in calls for m in models]
    assert len(generated) == len(set(generated)) == 2 * 3  # each (prompt, model) text made once


def test_a_vote_without_a_pair_shown_or_with_a_bad_choice_changes_nothing(arena):
    rnd = open_round(arena)
    with pytest.raises(ArenaError, match="no pair to vote on"):
        arena.vote(rnd.id, "carol", "a")
    arena.next_pair(rnd.id, "carol", fake_generate([]))
    with pytest.raises(ArenaError, match="a vote is one of"):
        arena.vote(rnd.id, "carol", "A is best")
    with pytest.raises(ArenaError, match="no such arena round"):
        arena.vote("r00000000", "carol", "a")
    assert arena.get(rnd.id).votes == []


def test_a_closed_round_takes_no_votes_and_keeps_its_leaderboard(arena):
    rnd = open_round(arena)
    arena.next_pair(rnd.id, "carol", fake_generate([]))
    arena.vote(rnd.id, "carol", "a")
    arena.next_pair(rnd.id, "carol", fake_generate([]))
    arena.close_round(rnd.id)
    with pytest.raises(ArenaError, match="closed"):
        arena.vote(rnd.id, "carol", "a")
    with pytest.raises(ArenaError, match="closed"):
        arena.next_pair(rnd.id, "dave", fake_generate([]))
    assert sum(r["votes"] for r in arena.leaderboard(rnd.id)) == 2


def test_the_leaderboard_ranks_the_model_that_wins_first_with_intervals_and_counts(arena):
    rnd = open_round(arena, prompts="\n".join(f"prompt {i}" for i in range(6)))
    for voter in ("carol", "dave", "erin"):
        while (pair := arena.next_pair(rnd.id, voter, fake_generate([]))) is not None:
            winner = "a" if pair.text_a.startswith("alice-pirate") else "b" if pair.text_b.startswith(
                "alice-pirate") else "tie"
            arena.vote(rnd.id, voter, winner)
    board = arena.leaderboard(rnd.id)
    assert [r["model"] for r in board][0] == "alice-pirate"
    top = board[0]
    assert top["low"] <= top["rating"] <= top["high"] and top["wins"] == top["votes"] == 36 and top["losses"] == 0
    tied = {r["model"]: r for r in board[1:]}
    assert tied[BASE]["ties"] == tied["bob-bard"]["ties"] == 18
    assert tied[BASE]["rating"] == pytest.approx(tied["bob-bard"]["rating"], abs=0.01)


def test_bradley_terry_gives_equal_ratings_to_equal_records_and_orders_by_strength():
    votes = [{"a": "x", "b": "y", "winner": "a"}] * 3 + [{"a": "y", "b": "x", "winner": "a"}] * 3
    r = bradley_terry(["x", "y"], votes)
    assert r["x"] == pytest.approx(r["y"]) == pytest.approx(1000)
    votes = [{"a": "x", "b": "y", "winner": "a"}] * 9 + [{"a": "x", "b": "y", "winner": "b"}] * 1
    r = bradley_terry(["x", "y"], votes)
    # 9 wins (+0.05 prior) to 1 (+0.05): odds 8.6 -> 400 * log10(8.6) ~ 374 points apart
    assert r["x"] - r["y"] == pytest.approx(400 * __import__("math").log10(9.05 / 1.05), abs=0.5)


def test_rounds_and_votes_survive_a_restart_and_export_as_csv_and_json(tmp_path):
    arena = Arena(tmp_path / "arena")
    rnd = open_round(arena)
    arena.next_pair(rnd.id, "carol", fake_generate([]))
    arena.vote(rnd.id, "carol", "bad")
    (tmp_path / "arena" / "r12345678.json").write_text("{broken")  # one bad file never breaks the arena
    again = Arena(tmp_path / "arena")
    assert [r.id for r in again.rounds()] == [rnd.id]
    assert again.get(rnd.id).votes == arena.get(rnd.id).votes
    rows = list(csv.DictReader(io.StringIO(again.export_csv(rnd.id))))
    assert len(rows) == 1 and rows[0]["winner"] == "bad" and rows[0]["voter"] == "carol"
    data = json.loads(again.export_json(rnd.id))
    assert data["votes"][0]["winner"] == "bad" and len(data["leaderboard"]) == 3


def test_a_round_needs_two_models_and_a_prompt_and_refuses_bad_text(arena):
    with pytest.raises(ArenaError, match="at least two models"):
        open_round(arena, models=[BASE])
    with pytest.raises(ArenaError, match="at least one prompt"):
        open_round(arena, prompts=" \n ")
    with pytest.raises(ValueError, match="invalid Unicode"):
        open_round(arena, prompts="bad \ud800")
    assert arena.rounds() == []
