"""What a page was showing survives a reload: the tab, the Train tab's followed job, its form and dataset choice.

Kept on the server, per user: the signed-in name, else the browser's random id (the Train tab's). Nothing of it is
stored in the browser, so on a shared lab PC the student who signs in next gets their own page back, never the
last one's. A page saves a value as it changes and restores them once, after the page-load event that fills its
lists; until then it saves nothing, so the lists filling in never overwrite what it is about to restore.
Entries live in memory (a server restart forgets them), the MAX_USERS most recently saved kept.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import gradio as gr

from core.api import is_text

from .context import Studio, new_browser_id, requester, user_of
from .tabs.train import refresh_datasets

MAX_USERS = 1000  # users (or browsers) whose page is kept
MAX_CHARS = 4000  # a saved text at most (the sample prompt's limit); a longer value is not kept


def _keepable(value) -> bool:
    """Whether a value a page sent is one to keep: small, plain, and sendable back to a page."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return is_text(value, MAX_CHARS)
    if isinstance(value, (list, tuple)):
        return len(value) <= 16 and all(isinstance(v, str) and _keepable(v) for v in value)
    return False


class SavedPages:
    """Each user's last page: {'tab': id, 'follow': job id, 'form': {field: value}} (thread-safe)."""

    def __init__(self, max_users: int = MAX_USERS):
        self._pages: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()
        self.max_users = max_users

    def get(self, key: str | None) -> dict:
        with self._lock:
            page = self._pages.get(key) if key else None
            return {"tab": page.get("tab"), "follow": page.get("follow"), "form": dict(page["form"])} if page else {}

    def save(self, key: str | None, what: str, value, field: str | None = None) -> None:
        if not key or key.startswith("session:") or not _keepable(value):  # a session ends with its page
            return
        with self._lock:
            page = self._pages.pop(key, None) or {"form": {}}
            if field is None:
                page[what] = value
            else:
                page["form"][field] = value
            self._pages[key] = page
            while len(self._pages) > self.max_users:
                self._pages.popitem(last=False)


def _key(request, browser) -> str | None:
    return requester(request, browser if isinstance(browser, str) and browser else None)


def _tab_id(button) -> str | None:
    """'train' for the page's tab button 'tab-train-button' (see build_ui's elem_ids)."""
    return button.removeprefix("tab-").removesuffix("-button") if isinstance(button, str) else None


def wire(studio: Studio, loaded, tabs: gr.Tabs, tab_of: dict, train: dict) -> SavedPages:
    """Save the page's tab (tab_of: id -> gr.Tab), followed job and Train form as they change, and restore them
    after `loaded` (the page-load event that fills the lists). Call inside the Blocks."""
    pages = SavedPages()
    train["browser"].render()  # at the page's top: a tab's components get their values once the tab is shown
    ready = gr.State(False)  # set once this page restored its values: saves before that are the lists filling
    form = train["form"]  # TrainForm field -> component
    quiet = dict(show_progress="hidden", api_visibility="private", queue=False)

    def saver(what, field=None):
        def save(is_ready, browser, value, request: gr.Request):
            if is_ready:
                pages.save(_key(request, browser), what, value, field)
        return save

    for name, component in form.items():
        component.change(saver("form", name), inputs=[ready, train["me"], component], trigger_mode="always_last",
                         **quiet)
    train["follow"].change(saver("follow"), inputs=[ready, train["me"], train["follow"]], **quiet)
    # the tab shown, read from the page when a tab is selected: Gradio also selects the first tab as the page
    # mounts, an event that may come after the restore selected another
    shown = gr.Textbox(visible=False)
    shown_now = f"document.querySelector('#{tabs.elem_id} [role=tab][aria-selected=true]')?.id"

    def save_tab(is_ready, browser, button, request: gr.Request):
        if is_ready and _tab_id(button) in tab_of:
            pages.save(_key(request, browser), "tab", _tab_id(button))

    gr.on([tab.select for tab in tab_of.values()], save_tab, inputs=[ready, train["me"], shown],
          js=f"(r, m, s) => [r, m, {shown_now}]", **quiet)

    def restore(browser, known, button, request: gr.Request):
        kept = new_browser_id(browser or known)  # the browser's stored id; on a first visit the page's, stored now
        saved = pages.get(_key(request, kept))
        values = saved.get("form", {})
        out = {ready: True, train["me"]: kept, **({} if kept == browser else {train["browser"]: kept})}
        for name, component in form.items():
            if name in values and name != "dataset":
                out[component] = values[name]
        if "dataset" in values:  # still one this user may see, else their newest, as a fresh page picks
            out[form["dataset"]] = refresh_datasets(studio, values["dataset"], user=user_of(request))
        if saved.get("follow"):
            out[train["follow"]] = saved["follow"]
        first = next(iter(tab_of))  # the tab a page opens on: no switch to it, nor away from a tab chosen since
        if saved.get("tab") in tab_of and saved["tab"] != first and _tab_id(button) in (None, first):
            out[tabs] = gr.Tabs(selected=saved["tab"])  # sets off the tab's select event, as a click does
        return out

    loaded.then(restore, inputs=[train["browser"], train["me"], shown], js=f"(b, m, s) => [b, m, {shown_now}]",
                outputs=[ready, train["me"], train["browser"], *form.values(), train["follow"], tabs], **quiet)
    return pages
