"""The studio's number, slider and checkbox-group inputs: Gradio's, except for what an API client sends wrong.

Gradio converts these inputs before the handler runs: for None or text in a slider, text in a number, or None
in a checkbox group, that conversion raises inside Gradio and the client sees a blank "Error". These inputs hand
such a value to the handler unchanged instead, where `number`, `whole` (studio.context) and the form checks
explain it in one sentence. A value of the right kind goes through Gradio's own checks (bounds, choices), whose
messages are shown. `is_template`: the page draws them as the Gradio components they extend.

Gradio writes a typing stub (inputs.pyi) beside any module that defines components; it is git-ignored.
"""
from __future__ import annotations

import gradio as gr

from core.api import is_real


class Number(gr.Number):
    """gr.Number; a value that is not a finite number (None aside) reaches the handler as it was sent."""
    is_template = True

    def preprocess(self, payload):
        return super().preprocess(payload) if payload is None or is_real(payload) else payload


class Slider(gr.Slider):
    """gr.Slider; a value that is not a finite number reaches the handler as it was sent."""
    is_template = True

    def preprocess(self, payload):
        return super().preprocess(payload) if is_real(payload) else payload


class CheckboxGroup(gr.CheckboxGroup):
    """gr.CheckboxGroup; a value that is not a list reaches the handler as it was sent."""
    is_template = True

    def preprocess(self, payload):
        return super().preprocess(payload) if isinstance(payload, list) else payload
