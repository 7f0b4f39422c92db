"""`sapo-lite ui`: a local web dashboard over a folder of runs (an optional extra: `pip install "sapo-lite[ui]"`).

As thin as the CLI: each page (`pages/`) reads runs through `RunDir` and calls what the CLI calls (the metrics
reader and plot's panels, buffer_view's pair texts, open_run and generate_answers, the CLI itself in a process
for train, resume and merge). `server.py` builds the app; `safety.py` guards it; `jobs.py` runs the commands;
`run_state.py` says what state each run is in. Nothing here imports starlette until `server` is imported, so
`sapo-lite ui` can say which extra to install.
"""
