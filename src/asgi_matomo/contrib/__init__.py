"""Adapters for frameworks that keep the matched route to themselves.

Starlette, FastAPI and Litestar put the matched route in the ASGI scope, where
the middleware finds it. Quart and Django do not: `asgi_matomo.contrib.quart`
and `asgi_matomo.contrib.django` hand it over, for `action_name_from_route=True`.
Each imports its framework; `import asgi_matomo` imports neither.
"""
