"""`python -m sparsebert.train`: stages teacher, upstream, downstream, evaluate and pipeline; see cli.py."""


def main(argv=None) -> int:
    from .cli import main as cli_main
    return cli_main(argv)
