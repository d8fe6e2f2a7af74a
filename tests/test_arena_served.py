"""The arena through the served studio's API, as a class uses it: the teacher (an admin) opens a round, two
students vote on anonymous pairs, nobody judges their own adapter, and the leaderboard counts the votes."""
from __future__ import annotations

import pytest
from gradio_client import Client

from core.arena import BASE
from core.lora.config import LoraConfig
from core.model.weights import load_base
from studio_server import served_studio
from adapter_helpers import make_adapter

USERS = [("teacher", "pw-teacher"), ("alice", "pw-alice"), ("bob", "pw-bob")]


def two_students_adapters(studio):
    """The teacher is the admin; alice and bob each own one adapter that changes the output."""
    studio.admins = frozenset({"teacher"})
    model = load_base("tiny", "cpu")
    for seed, (name, owner) in enumerate([("alice-pirate", "alice"), ("bob-bard", "bob")]):
        make_adapter(model, name, LoraConfig(r=4, alpha=8.0), seed=seed, std=0.5)
        studio.library.save(model, name, name, LoraConfig(r=4, alpha=8.0), "tiny", meta={"user": owner})


@pytest.fixture(scope="module")
def classroom(tmp_path_factory):
    with served_studio(tmp_path_factory.mktemp("arena"), auth=USERS, before_build=two_students_adapters) as served:
        yield served


def _pairs(client, round_id):
    """Vote 'a' on every pair the server hands this client; the reveals."""
    reveals = []
    for _ in range(20):
        prompt, a, b, status = client.predict(round_id, api_name="/arena_next")
        if not a:
            return reveals, status
        assert a != b and "alice-pirate" not in a + b and "bob-bard" not in a + b  # anonymous texts
        reveals.append(client.predict(round_id, "a", api_name="/arena_vote"))
    raise AssertionError("the server kept handing out pairs")


def test_a_round_in_class_students_vote_blind_and_never_on_their_own_adapter(classroom):
    url, studio = classroom
    teacher, alice, bob = (Client(url, auth=u, verbose=False) for u in USERS)
    models = [BASE, "alice-pirate", "bob-bard"]
    # a student cannot open a round: refused, nothing made
    alice.predict("mine", "tiny", "Once upon a time", models, 12, 0.8, 7, api_name="/arena_open")
    assert studio.arena.rounds() == []
    teacher.predict("Pirates or bards", "tiny", "Once upon a time\nAhoy", models, 12, 0.8, 7, api_name="/arena_open")
    (rnd,) = studio.arena.rounds()
    alice_votes, done = _pairs(alice, rnd.id)
    assert "every pair" in done
    assert len(alice_votes) == 2 and all("alice-pirate" not in r for r in alice_votes)
    bob_votes, _ = _pairs(bob, rnd.id)
    assert len(bob_votes) == 2 and all("bob-bard" not in r for r in bob_votes)
    assert all(("A was" in r and "B was" in r) for r in alice_votes + bob_votes)  # the names, after the vote
    # the texts the class saw are the engine's own for that seed, one per (prompt, model)
    assert len(studio.arena.get(rnd.id).texts) == 2 * 3
    board = {r["model"]: r for r in studio.arena.leaderboard(rnd.id)}
    assert sum(r["votes"] for r in board.values()) == 2 * 4 and board["alice-pirate"]["votes"] == 2
    # a vote without a pair shown is refused
    with pytest.raises(Exception, match="no pair to vote on"):
        bob.predict(rnd.id, "b", api_name="/arena_vote")
    # exports are the teacher's
    assert bob.predict(rnd.id, "csv", api_name="/arena_export") == {"__type__": "update"}  # skipped: a warning
    csv_path = teacher.predict(rnd.id, "csv", api_name="/arena_export")
    assert open(csv_path).read().count("\n") == 1 + 4
    for c in (teacher, alice, bob):
        c.close()
