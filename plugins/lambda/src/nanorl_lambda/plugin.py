"""Registration of the lambda plugin with nanorl (entry point `nanorl` -> `lambda`).

Registers the `lambda` cloud backend (Lambda Cloud's public API v1), which `nanorl cloud ...` drives. Imports
only `nanorl.api` and the standard library; no API key is needed until a command talks to Lambda.
"""

from __future__ import annotations

from nanorl.api import hookimpl
from nanorl_lambda.backend import LambdaBackend


@hookimpl
def register_backends(register):
    register(LambdaBackend())
