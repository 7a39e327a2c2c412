"""CLI commands of the attribution engine (added in the engine work)."""


def add_commands(sub) -> None:
    return None
