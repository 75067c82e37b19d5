"""Registration of the aqua plugin with nanorl (entry point `nanorl` -> `aqua`).

It registers nothing yet: the plugin's features land with their own issue, and until then it offers
nothing that would pretend to work.
"""
