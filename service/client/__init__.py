"""The pip-installed client (`pip install trainctl-ray`, no torch, no Ray): the HTTP client (`http`), where to
connect and with which token (`config`), and the `trainctl` command (`cli/`).

Scripts and notebooks use it like the CLI does:

    from service.client import TrainctlClient, resolve_token, resolve_url
    api = TrainctlClient(resolve_url(), resolve_token())
    job = api.submit({"preset": "debug", "overrides": {"data.train": "/data/train.parquet"}})
    print(api.job(job["id"])["state"])
"""

from service.client.config import (
    DEFAULT_URL,
    configured_url,
    resolve_token,
    resolve_url,
    served_url,
    token_source,
    url_source,
)
from service.client.http import ClientError, TrainctlClient

__all__ = [
    "DEFAULT_URL",
    "ClientError",
    "TrainctlClient",
    "configured_url",
    "resolve_token",
    "resolve_url",
    "served_url",
    "token_source",
    "url_source",
]
