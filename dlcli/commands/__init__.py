"""CLI commands beyond train / inspect-shapes / evaluate, one group per module; each registers on `dlcli.cli.app`."""
