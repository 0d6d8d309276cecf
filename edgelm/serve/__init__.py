"""`edgelm serve`: an OpenAI-compatible HTTP server over any artifact of any bundle.

app.py       the FastAPI routes, auth, body limits and error shapes
engine.py    the loaded artifact and its worker: one request at a time, in arrival order
requests.py  OpenAI request bodies, checked, and mapped onto edgelm's sampling settings
tools.py     tool definitions into the chat template, tool calls out of the text
metrics.py   the Prometheus metrics /metrics serves
"""
