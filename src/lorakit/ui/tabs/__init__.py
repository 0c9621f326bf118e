"""The page's tabs, one module each: train, models, chat, compare, evaluate.

Each module has ``build(shared) -> gr.Tab``: it lays out its tab's components, wires their
events, and hands what other tabs need to ``shared`` (a Shared, in common.py): components by
name (``shared["models.base"]``) and the lists to refresh (``shared.refreshes(dropdown, fn)``).
A tab only reads components of tabs built before it. ui/app.py builds them in order; a new tab
is one more module here and one more entry in app.TABS.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page never calls home
