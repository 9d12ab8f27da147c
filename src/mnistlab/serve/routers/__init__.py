"""The web app's routes, one `APIRouter` module per concern: predict, models (and health), collect, explain
(attribution maps, activations, neighbours), pages (the page, its files and the API docs). A new concern is one
module here, and its import and `include_router` line in `app.create_app`; its routes take what they need from
`deps` and answer with models from `schemas`."""
