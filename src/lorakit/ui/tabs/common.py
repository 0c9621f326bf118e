"""What the tabs share: the workdir, the training run, the model session, named components and
the lists every tab keeps fresh (adapters, datasets, ...)."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from ...errors import LorakitError
from ..inference import ModelSession
from ..training import RunManager
from ..workdir import Workdir


def error_text(e: BaseException) -> str:
    """A message for the page: lorakit's own line for a user's mistake, the type otherwise."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"error: {text}" if isinstance(e, LorakitError) else f"error ({type(e).__name__}): {text}"


class Shared:
    """Built inside the page's gr.Blocks (it owns a gr.State). Every handler turns an exception
    into a line on the page through error_text; none is swallowed."""

    def __init__(self, workdir: Workdir, runs: RunManager, session: ModelSession):
        self.workdir = workdir
        self.runs = runs
        self.session = session
        self.components: dict[str, gr.components.Component] = {}
        self._lists: dict[gr.components.Component, Callable[[], object]] = {}
        # A tab that changed the workdir (a run ended) bumps this; the page then refreshes the lists.
        self.lists_changed = gr.State(0)

    def __getitem__(self, name: str):
        return self.components[name]

    def add(self, tab: str, **components) -> None:
        """Name components other tabs use: add("models", base=...) -> shared["models.base"]."""
        for name, component in components.items():
            self.components[f"{tab}.{name}"] = component

    def refreshes(self, component, fn: Callable[[], object]) -> None:
        """fn() gives the component's update (new choices, a table) whenever the page loads, a tab
        is selected or a run ends."""
        self._lists[component] = fn

    @property
    def list_outputs(self) -> list:
        return list(self._lists)

    def lists_update(self) -> dict:
        return {component: fn() for component, fn in self._lists.items()}

    def wire_lists(self, page: gr.Blocks, tabs: list[gr.Tab]) -> None:
        """Refresh the lists on load, on every tab's selection and when lists_changed changes."""
        outputs = self.list_outputs
        for tab in tabs:
            tab.select(self.lists_update, None, outputs, show_progress="hidden")
        self.lists_changed.change(self.lists_update, None, outputs, show_progress="hidden")
        page.load(self.lists_update, None, outputs)
