"""The web dashboard: an ASGI app (Starlette, Jinja2) over :mod:`sqlalchemy_q4m.ops`.

``pip install 'sqlalchemy-q4m[web]'``, then ``q4m web --url ...`` (Uvicorn, 127.0.0.1 by
default), or mount it into a Starlette/FastAPI app::

    from sqlalchemy_q4m.web import dashboard
    app.mount("/queues", dashboard(engine, token=os.environ["Q4M_WEB_TOKEN"]))

Server-rendered pages, autoescaped templates, a CSRF token on every form; retry, purge and
enqueue need authentication (a token, HTTP basic credentials, or the host app's own check).
"""

from __future__ import annotations

from .app import Auth
from .app import dashboard
from .app import serve

__all__ = ["Auth", "dashboard", "serve"]
