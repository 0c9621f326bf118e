"""`lorakit ui`: train, chat, compare, evaluate and export from a web page (Gradio).

The Gradio wiring (``app.py``) is kept thin; the logic lives in plain modules that tests call
without a browser:

- ``workdir.py``: the folder the page works in (datasets, adapters, local models) and what is in it,
  and the one check of every name the page writes there (``Workdir.path_for``);
- ``security.py``: who may open the page (a --host others can reach needs a login), the upload limit;
- ``training.py``: form values -> a validated TrainConfig, the ``lorakit train`` subprocess
  (start, stop, status), its progress read from ``train_log.jsonl`` and the progress bar;
- ``inference.py``: one base model in memory with adapters loaded onto it by name, for chat
  (streamed) and side-by-side answers.
"""
