"""A FastAPI app tracked in Matomo, naming page views after route templates."""

from __future__ import annotations

import os

from fastapi import FastAPI

from asgi_matomo import MatomoMiddleware

app = FastAPI()
app.add_middleware(
    MatomoMiddleware,
    matomo_url="https://matomo.example.org",
    idsite=1,
    # A token with write access to the site lets Matomo record the visitor's IP.
    access_token=os.environ.get("MATOMO_TOKEN"),
    action_name_from_route=True,  # "/items/{item_id}" instead of one name per id
)


@app.get("/items/{item_id}")
async def read_item(item_id: int) -> dict[str, int]:
    return {"item_id": item_id}
