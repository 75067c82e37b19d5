"""Registration of the gsm8k plugin with nanorl (entry point `nanorl` -> `gsm8k`).

It registers nothing yet: the plugin's features land with their own issue, and until then it offers
nothing that would pretend to work.
"""
