"""``python -m transfer_learning.results.predict``: the command line's entry point (read in
:mod:`transfer_learning.cli.predict` before torch loads, so ``--help`` answers at once)."""

if __name__ == "__main__":
    from transfer_learning.cli.predict import main

    raise SystemExit(main())
