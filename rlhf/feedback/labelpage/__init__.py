"""The labelling page: people rank candidate responses in a browser (``rlhf label serve``).

- ``index.html``, ``app.js``, ``app.css``: the page (no network assets)
- ``server.py``: the HTTP server and the application behind it
- ``store.py``: the durable rankings file (locked appends) and annotator agreement
"""
