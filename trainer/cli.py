"""``trainer``: train and evaluate vision transformers on token labels from the store."""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train vision transformers on token labels (training commands are not built yet)."""
