"""Repository tools, run from the repository root as modules: ``python -m scripts.NAME ...``
(the packages import from the checkout, no ``sys.path`` edits). Not part of the installed package."""
