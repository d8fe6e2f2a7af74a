"""What a reloaded page gets back (studio.saved_state): each user's own last tab, followed job and Train form, kept
on the server; never another user's, nothing of a page without a user or browser id, nothing unsendable or huge.
The browser side (a real reload) is in test_browser_teacher."""
from __future__ import annotations

from studio.saved_state import MAX_CHARS, SavedPages


def test_each_user_gets_back_only_their_own_page():
    pages = SavedPages()
    pages.save("user:alice", "tab", "train")
    pages.save("user:alice", "follow", "7")
    pages.save("user:alice", "form", 321, field="steps")
    pages.save("user:alice", "form", ["attn.c_attn", "mlp.c_fc"], field="targets")
    assert pages.get("user:alice") == {"tab": "train", "follow": "7",
                                       "form": {"steps": 321, "targets": ["attn.c_attn", "mlp.c_fc"]}}
    assert pages.get("user:bob") == {} and pages.get(None) == {}  # bob, on the same browser after her: nothing
    pages.save("session:abc", "tab", "train")  # a page known only by its session: gone with it, not kept
    assert pages.get("session:abc") == {}


def test_values_a_page_could_not_be_sent_back_are_not_kept():
    pages = SavedPages()
    for bad in ("x" * (MAX_CHARS + 1), "a\ud800b", {"a": 1}, ["a"] * 17, [1, 2], b"bytes"):
        pages.save("user:alice", "form", bad, field="prompt")
    assert pages.get("user:alice") == {}


def test_the_least_recently_saved_users_go_first_past_the_bound():
    pages = SavedPages(max_users=2)
    for user in ("ann", "bob", "ann", "cy"):
        pages.save(f"user:{user}", "tab", "data")
    assert [bool(pages.get(f"user:{u}")) for u in ("ann", "bob", "cy")] == [True, False, True]
