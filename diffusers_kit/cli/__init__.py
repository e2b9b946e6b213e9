"""`dkit` command line (placeholder until the CLI module lands in this commit series)."""


def main(argv: list[str] | None = None) -> int:
    from diffusers_kit.cli.main import main as real_main

    return real_main(argv)
