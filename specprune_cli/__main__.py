"""``python -m specprune_cli`` runs the same command line as ``specprune`` (and works under torchrun)."""
from specprune_cli.cli import main

if __name__ == "__main__":
    main(prog_name="specprune")
