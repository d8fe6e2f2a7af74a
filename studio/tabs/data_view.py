"""What the Data tab and its Records section both show: the token view and the list of saved datasets,
and the per-session text cap they share."""
from __future__ import annotations

import html

from core.api import is_whole, scrub, tokenizer

from ..context import Studio

TOKEN_VIEW_LIMIT = 400  # tokens shown as coloured spans
MAX_SESSION_BYTES = 32 * 2**20  # one session's text, uploads + pasted: ~8M tokens, hours of CPU training


def token_view_html(text: str, limit: int = TOKEN_VIEW_LIMIT, ids=None, mask=None) -> str:
    """The first `limit` GPT-2 tokens as coloured spans; hovering one shows its id. `ids`: the text's tokens
    when the caller has them already (the text is then not encoded again). `mask` (instruction data, one 0/1
    per id): tokens with 0 are prompt tokens, outside the loss, shown greyed out (class tok-masked)."""
    if not text:
        return "<div class='token-view empty'>Tokens appear here once there is text.</div>"
    if ids is None and len(text) < 2_000_000:
        ids = tokenizer.encode(text)
    total = len(ids) if ids is not None else None  # a huge text: only its beginning is encoded
    shown = list(ids[:limit]) if ids is not None else tokenizer.encode(text[: limit * 40])[:limit]
    spans = []
    for i, (tid, s) in enumerate(zip(shown, tokenizer.token_strings(shown))):
        escaped = html.escape(s).replace("\n", "↵\n")
        masked = mask is not None and not mask[i]
        tip = html.escape(f"id {tid}: {s!r}" + (" (prompt: no loss)" if masked else ""), quote=True)
        cls = "tok-masked" if masked else f"tok-c{i % 6}"
        spans.append(f"<span class='tok {cls}' title='{tip}' data-id='{tid}'>{escaped}</span>")
    more = f" of {total:,}" if total is not None else ""
    legend = " Grey tokens are prompt tokens: the model reads them but is not trained on them." if mask is not None \
        else ""
    return (f"<div class='token-caption'>First {len(shown):,}{more} tokens; hover a token to see its id.{legend}</div>"
            f"<div class='token-view'>{''.join(spans)}</div>")


def _n(x) -> str:
    return f"{x:,}" if is_whole(x) else "?"


def saved_datasets_md(studio: Studio, user: str | None = None) -> str:
    rows = studio.datasets(user)
    if not rows:
        return "_No datasets saved yet._"
    lines = ["| dataset | tokens | train / val | sources |", "|---|---:|---:|---|"]
    for r in rows[:20]:
        m = r["meta"] if isinstance(r.get("meta"), dict) else {}
        sources = m.get("sources") if isinstance(m.get("sources"), list) else []  # meta.json may hold anything
        srcs = ", ".join(str(s)[:80] for s in sources[:20])[:80].replace("|", "/")
        lines.append(f"| {r['name']} | {_n(m.get('tokens'))} | {_n(m.get('train_tokens'))} / "
                     f"{_n(m.get('val_tokens'))} | {html.escape(srcs)} |")
    return scrub("\n".join(lines))
