"""Registration of the lambda plugin with nanorl (entry point `nanorl` -> `lambda`).

It registers nothing yet: the plugin's features land with their own issue, and until then it offers
nothing that would pretend to work.
"""
