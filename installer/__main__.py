"""`python -m installer`, the same as the `installer` console script."""

from installer.cli import main

main()
