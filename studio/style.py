"""The studio's look: a theme and a small stylesheet (both go to launch() in Gradio 6)."""
from __future__ import annotations

import gradio as gr


def theme():
    # system fonts only: no web-font download (offline machines, privacy)
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate", neutral_hue="slate",
                          font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


CSS = """
.gradio-container { max-width: 1380px !important; margin: 0 auto; }
.studio-header { display: flex; align-items: baseline; gap: 14px; padding: 6px 2px 2px; flex-wrap: wrap; }
.studio-header h1 { font-size: 1.6rem; margin: 0; font-weight: 700; letter-spacing: -0.01em; }
.studio-header .tagline { color: var(--body-text-color-subdued); }
.studio-header .pill { font-size: 0.78rem; padding: 2px 10px; border-radius: 999px;
  background: var(--color-accent-soft); color: var(--color-accent); border: 1px solid var(--border-color-accent); }
.identity { display: flex; gap: 8px; align-items: center; justify-content: flex-end; font-size: 0.85rem; }
.identity .pill { padding: 2px 10px; border-radius: 999px; border: 1px solid var(--border-color-primary); }
.identity .admin { background: #4f46e5; color: #fff; border-color: #4f46e5; }
.studio-header h1 { display: flex; align-items: center; gap: 10px; }
.dot { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 4px; vertical-align: 0; }
.dot.available { background: #10b981; } .dot.download { background: #f59e0b; } .dot.missing { background: #ef4444; }
.badge { display: inline-block; font-size: 0.75rem; font-weight: 700; text-transform: uppercase; letter-spacing: .05em;
  padding: 2px 8px; border-radius: 6px; margin-right: 6px; color: #fff; background: #6366f1; vertical-align: 1px; }
.badge.stopping, .badge.stopped { background: #d97706; } .badge.finished { background: #059669; }
.badge.failed { background: #dc2626; }
.tab-intro h2 { margin-bottom: 2px; }
.tab-intro p { color: var(--body-text-color-subdued); margin-top: 0; }
.help, .muted { color: var(--body-text-color-subdued); font-size: 0.86rem; }
.warn { color: #b45309; }

/* data: statistics and token view */
.stats .stat-row { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 8px; }
.stats .stat { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 8px 12px;
  background: var(--background-fill-secondary); }
.stats .stat-v { font-size: 1.25rem; font-weight: 700; }
.stats .stat-k { font-size: 0.78rem; color: var(--body-text-color-subdued); text-transform: uppercase;
  letter-spacing: .04em; }
.stats .stat-src, .stats .stat-top { margin-top: 8px; font-size: 0.88rem; }
.stats .stat-note { margin-top: 6px; font-size: 0.88rem; color: #b45309; }
.stats .top-tok { display: inline-block; margin: 2px 6px 2px 0; }
.stats.empty, .samples.empty, .token-view.empty { color: var(--body-text-color-subdued); padding: 10px 2px; }
.token-caption { font-size: 0.82rem; color: var(--body-text-color-subdued); margin-bottom: 4px; }
.token-view { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.88rem; line-height: 1.9;
  white-space: pre-wrap; word-break: break-word; max-height: 300px; overflow-y: auto; padding: 10px 12px;
  border: 1px solid var(--border-color-primary); border-radius: 10px; background: var(--background-fill-primary); }
.token-view .tok { border-radius: 3px; padding: 1px 0; position: relative; }
.token-view .tok:hover { outline: 2px solid #4f46e5; }
.token-view .tok:hover::after { content: "id " attr(data-id); position: absolute; left: 0; top: -1.7em; z-index: 5;
  background: #111827; color: #fff; font-size: 0.72rem; padding: 0 6px; border-radius: 4px; white-space: nowrap; }
.tok-c0 { background: rgba(99, 102, 241, .20); } .tok-c1 { background: rgba(16, 185, 129, .22); }
.tok-c2 { background: rgba(245, 158, 11, .24); } .tok-c3 { background: rgba(236, 72, 153, .18); }
.tok-c4 { background: rgba(14, 165, 233, .22); } .tok-c5 { background: rgba(132, 204, 22, .24); }
.tok-masked { background: rgba(148, 163, 184, .16); color: var(--body-text-color-subdued); }

/* train: job banner, progress bar, samples */
.job { border: 1px solid var(--border-color-primary); border-radius: 12px; padding: 12px 14px;
  background: var(--background-fill-secondary); }
.job.running, .job.starting { border-color: #818cf8; }
.job.failed { border-color: #f87171; }
.job .job-head { font-size: 1.02rem; margin-bottom: 8px; }
.job .bar { height: 12px; border-radius: 999px; background: var(--border-color-primary); overflow: hidden; }
.job .bar .fill { height: 100%; background: linear-gradient(90deg, #6366f1, #8b5cf6); transition: width .6s ease; }
.job .bar.finished .fill { background: #10b981; } .job .bar.failed .fill { background: #ef4444; }
.job .bar.stopped .fill { background: #f59e0b; }
.job .job-metrics { margin-top: 8px; font-size: 0.9rem; font-variant-numeric: tabular-nums; }
.job .job-note { margin-top: 6px; font-size: 0.84rem; color: var(--body-text-color-subdued); }
.samples { max-height: 260px; overflow-y: auto; }
.sample { display: flex; gap: 10px; padding: 6px 0; border-bottom: 1px dashed var(--border-color-primary); }
.sample-step { flex: 0 0 72px; font-size: 0.8rem; color: var(--body-text-color-subdued); }
.sample-text { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85rem; white-space: pre-wrap;
  word-break: break-word; }

/* library + compare */
.kv { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 4px 2px; font-size: 0.92rem; }
.kv dt { color: var(--body-text-color-subdued); } .kv dd { margin: 0; word-break: break-word; }
.refresh-btn { align-self: flex-end; margin-bottom: 10px; max-height: 40px; }
.button-column { justify-content: flex-end; padding-top: 28px; }
.confirm { border: 1px solid #f87171; border-radius: 10px; padding: 6px 10px; background: rgba(248, 113, 113, .08); }
/* tables fit 1280 px (their column_widths): a header wraps between words, never mid-word ("ra/nk"); long values
   (names, targets) wrap anywhere instead of pushing columns out of view */
#lib-table th, #lib-table th *, #train-jobs th, #train-jobs th * { white-space: normal !important;
  word-break: keep-all !important; overflow-wrap: normal !important; }
#lib-table td, #lib-table td *, #train-jobs td, #train-jobs td * { overflow-wrap: anywhere; }
.outputs .cmp-out textarea { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.88rem; }
"""
