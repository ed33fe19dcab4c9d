"""The `swav` command's subcommands, one module per resource of the API (as `api/routes/`
has); `options` holds what they all share. `swav_client/cli.py` assembles them."""
