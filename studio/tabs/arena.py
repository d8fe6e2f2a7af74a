"""Arena tab: a blind vote between adapters. The teacher opens a round (prompts and models); each student is
shown pairs of anonymous texts, "A" and "B", made by the one engine with the round's seed, and votes; the
names show after the vote, and a Bradley-Terry leaderboard ranks the models (core.arena)."""
from __future__ import annotations

import functools
import html
from dataclasses import asdict

import gradio as gr

from core.api import ARENA_MAX_MODELS as MAX_MODELS, BASE, Round, Sampling, SamplingConfig

from ..context import Studio, friendly, number, requester, user_of, whole
from ..inputs import Number, Slider
from ..models import CHOICES
from .compare import compatible_adapters

BOARD_COLUMNS = ["rank", "model", "rating", "95% interval", "votes", "wins", "ties", "losses"]
VERDICTS = {"a": "A is better", "b": "B is better", "tie": "Tie", "bad": "Both are bad"}
NO_PAIR = ("<div class='muted'>Pick an open round and press <b>Next pair</b>: you will see one prompt continued by "
           "two anonymous models.</div>")


def round_labels(studio: Studio) -> list[tuple[str, str]]:
    """(label, round id) of every round, newest first."""
    return [(f"{r.title} · {'open' if r.open else 'closed'} · {len(r.votes)} votes", r.id)
            for r in studio.arena.rounds()]


def round_choices(studio: Studio, value=None):
    labels = round_labels(studio)
    ids = [i for _, i in labels]
    return gr.update(choices=labels, value=value if value in ids else (ids[0] if ids else None))


def check_teacher(studio: Studio, request: gr.Request | None) -> str | None:
    """With sign-in, only an admin (the teacher) runs rounds; without it there is no one to tell apart."""
    user = user_of(request)
    if studio.auth and user not in studio.admins:
        raise ValueError("only the teacher (an admin) can open, close or export arena rounds.")
    return user


def voter_of(request: gr.Request | None) -> str:
    """The signed-in user name (what adapters record as their owner), else the session."""
    who = user_of(request) or requester(request)
    if who is None:
        raise ValueError("this page has no session; reload it and try again.")
    return who


def open_round(studio: Studio, title, base_model, prompts, models, max_tokens, temperature, seed,
               request: gr.Request | None = None) -> Round:
    teacher = check_teacher(studio, request)
    if not isinstance(base_model, str) or base_model not in CHOICES:
        raise ValueError(f"choose the base model, one of {', '.join(CHOICES)}.")
    if not isinstance(models, (list, tuple)) or not all(isinstance(m, str) for m in models):
        raise ValueError("the models are a list of adapter names; pick them from the list.")
    allowed = {BASE, *compatible_adapters(studio, base_model, teacher)}  # an admin sees every adapter
    unknown = [m for m in models if m not in allowed]
    if unknown:
        raise ValueError(f"'{unknown[0][:64]}' is not a finished adapter for {base_model}; pick from the list.")
    sampling = Sampling(max_new_tokens=whole(max_tokens, "max new tokens"),
                        temperature=number(temperature, "temperature"), seed=whole(seed, "seed"))
    if not 1 <= sampling.max_new_tokens <= studio.engine.max_new_tokens:
        raise ValueError(f"max new tokens must be from 1 to {studio.engine.max_new_tokens}.")
    SamplingConfig(**asdict(sampling)).validate()
    owners = {m: studio.library.details(m).get("user") for m in models if m != BASE}
    return studio.arena.open_round(title, base_model, prompts, models, owners, sampling, opened_by=teacher)


def generator(studio: Studio, voter: str):
    """Texts of `models` for one prompt of a round, from the one engine (one batched pass, the round's seed)."""
    def generate(rnd: Round, prompt: int, models: list[str]) -> list[str]:
        studio.base(rnd.base_model)
        texts = None
        adapters = [None if m == BASE else m for m in models]
        for texts in studio.engine.compare(rnd.prompts[prompt], adapters, SamplingConfig(**asdict(rnd.sampling)),
                                           user=voter):
            pass
        return [rnd.prompts[prompt] + t for t in texts]
    return generate


def next_pair(studio: Studio, round_id, request: gr.Request | None = None):
    """(prompt html, text A, text B, status) for the caller's next pair."""
    voter = voter_of(request)
    pair = studio.arena.next_pair(round_id, voter, generator(studio, voter))
    if pair is None:
        return NO_PAIR, "", "", "You have voted on every pair of this round you may judge. Thank you!"
    prompt = f"<div class='arena-prompt'><b>Prompt:</b> {html.escape(pair.prompt)}</div>"
    return prompt, pair.text_a, pair.text_b, "Read both, then vote. The names show after your vote."


def vote(studio: Studio, round_id, verdict, request: gr.Request | None = None) -> str:
    reveal = studio.arena.vote(round_id, voter_of(request), verdict)
    return (f"You voted **{VERDICTS[reveal['winner']]}**. A was **{html.escape(reveal['a'])}**, B was "
            f"**{html.escape(reveal['b'])}**. Press Next pair for another.")


def board_rows(studio: Studio, round_id) -> list[list]:
    if not round_id:
        return []
    return [[i + 1, r["model"], r["rating"], f"{r['low']} – {r['high']}", r["votes"], r["wins"], r["ties"],
             r["losses"]] for i, r in enumerate(studio.arena.leaderboard(round_id))]


def export(studio: Studio, round_id, fmt, request: gr.Request | None = None) -> str:
    check_teacher(studio, request)
    rnd = studio.arena.get(round_id)  # an unknown round is refused before a download folder is made
    return str(studio.arena.export(rnd.id, fmt, studio.export_folder()))


def create_arena_tab(studio: Studio) -> dict:
    gr.Markdown("## 6 · Arena\nA blind vote: the same prompt continued by two anonymous models. Pick the better "
                "one; the names show after you vote, and the leaderboard ranks every model of the round. You "
                "never judge a pair that holds your own adapter.", elem_classes="tab-intro")
    with gr.Row():
        labels = round_labels(studio)
        rounds = gr.Dropdown(labels, value=labels[0][1] if labels else None, label="Round", elem_id="arena-round",
                             scale=4, allow_custom_value=True)  # rounds opened after launch, checked on use
        refresh = gr.Button("↻", scale=0, min_width=44, size="sm", elem_id="arena-refresh")
        go = gr.Button("Next pair", variant="primary", scale=1, elem_id="arena-next")
    prompt = gr.HTML(NO_PAIR, elem_id="arena-prompt")
    with gr.Row(equal_height=True):
        text_a = gr.Textbox(label="A", lines=8, interactive=False, elem_id="arena-a")
        text_b = gr.Textbox(label="B", lines=8, interactive=False, elem_id="arena-b")
    with gr.Row():
        buttons = {v: gr.Button(label, elem_id=f"arena-vote-{v}") for v, label in VERDICTS.items()}
    status = gr.Markdown("", elem_id="arena-status")
    board = gr.Dataframe(headers=BOARD_COLUMNS, value=[], interactive=False, label="Leaderboard (Bradley-Terry)",
                         elem_id="arena-board")
    with gr.Accordion("Teacher: run a round", open=False, elem_id="arena-teacher"):
        with gr.Row():
            title = gr.Textbox("Arena round", label="Title", max_length=80, elem_id="arena-title")
            base = gr.Dropdown(CHOICES, value=studio.default_model, label="Base model", elem_id="arena-base")
        models = gr.Dropdown([BASE, *compatible_adapters(studio, studio.default_model)], multiselect=True,
                             max_choices=MAX_MODELS, allow_custom_value=True, label=f"Models (2 to {MAX_MODELS}; {BASE} is the base alone)",
                             elem_id="arena-models")
        prompts = gr.Textbox(label="Prompts, one per line", lines=4, elem_id="arena-prompts")
        with gr.Row():
            max_tokens = Slider(1, studio.engine.max_new_tokens, value=min(60, studio.engine.max_new_tokens),
                                   step=1, label="Max new tokens", elem_id="arena-max")
            temperature = Slider(0, 2, value=0.8, step=0.05, label="Temperature", elem_id="arena-temp")
            seed = Number(1234, precision=0, label="Seed", elem_id="arena-seed")
        with gr.Row():
            start = gr.Button("Open the round", variant="primary", elem_id="arena-open")
            close = gr.Button("Close the selected round", elem_id="arena-close")
            fmt = gr.Radio(["csv", "json"], value="csv", label="Export", elem_id="arena-fmt")
            download = gr.Button("Download votes", elem_id="arena-export")
        file = gr.File(label="Your file", interactive=False, elem_id="arena-file")

    refresh.click(lambda r: (round_choices(studio, r), board_rows(studio, r)), inputs=rounds,
                  outputs=[rounds, board], api_visibility="private")
    rounds.change(friendly(lambda r: board_rows(studio, r)), inputs=rounds, outputs=board, api_visibility="private")
    def model_choices(b, keep=(), user=None):
        names = [BASE, *compatible_adapters(studio, b, user)] if b in CHOICES else [BASE]
        return gr.update(choices=names, value=[m for m in keep or () if m in names])

    def base_changed(b, request: gr.Request):
        return model_choices(b, user=user_of(request))

    base.change(base_changed, inputs=base, outputs=models, api_visibility="private")
    reported = functools.partial(friendly, status=status)  # the tab's one status line takes their refusals too

    @reported
    def do_next(r, request: gr.Request):
        return next_pair(studio, r, request)

    go.click(do_next, inputs=rounds, outputs=[prompt, text_a, text_b, status], api_name="arena_next",
             concurrency_limit=8, concurrency_id="generate")

    @reported
    def do_vote(r, v, request: gr.Request):
        return vote(studio, r, v, request), board_rows(studio, r)

    for verdict, button in buttons.items():
        button.click(do_vote, inputs=[rounds, gr.State(verdict)], outputs=[status, board], api_visibility="private")

    def arena_vote(round_id: str, verdict: str, request: gr.Request) -> str:
        """Vote on the pair arena_next last showed you: verdict a, b, tie or bad. Returns who A and B were."""
        try:
            return vote(studio, round_id, verdict, request)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None

    gr.api(arena_vote, api_name="arena_vote")  # the buttons' one endpoint, with the verdict as an argument

    @reported
    def do_open(t, b, p, m, mt, temp, s, request: gr.Request):
        rnd = open_round(studio, t, b, p, m, mt, temp, s, request)
        return round_choices(studio, rnd.id), board_rows(studio, rnd.id), f"Round **{html.escape(rnd.title)}** is open."

    start.click(do_open, inputs=[title, base, prompts, models, max_tokens, temperature, seed],
                outputs=[rounds, board, status], api_name="arena_open")

    @reported
    def do_close(r, request: gr.Request):
        check_teacher(studio, request)
        rnd = studio.arena.close_round(r)
        return round_choices(studio, r), f"Round **{html.escape(rnd.title)}** is closed; its votes are final."

    close.click(do_close, inputs=rounds, outputs=[rounds, status], api_name="arena_close")
    @friendly
    def do_export(r, f, request: gr.Request):
        return export(studio, r, f, request)

    download.click(do_export, inputs=[rounds, fmt], outputs=file, api_name="arena_export")
    return {"rounds": rounds, "next": go, "prompt": prompt, "a": text_a, "b": text_b, "buttons": buttons,
            "status": status, "board": board, "models": models, "base": base, "open": start, "close": close,
            "refresh_board": lambda r: board_rows(studio, r),
            "model_choices": model_choices}
