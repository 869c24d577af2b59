"""Entry point of ``python -m datamodules.synthetic``."""

from datamodules.synthetic.cli import main

main()
