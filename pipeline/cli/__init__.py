"""The ``kdm`` command line: ``app`` builds the parser and dispatches (``kdm --help``); one module per
command group (``images``: datasets, EDM teachers, image pair stores; ``distill``: ``kdm distill`` and image
evaluation; ``metrics``: extractor and metric reports; ``registry``: the teacher registry; ``model_info``);
``common`` holds the summary line and the option -> config steps. Every command prints a one-line summary;
bad input exits non-zero with a message that says what to fix (``pipeline.errors.KDMError``)."""


def main(argv=None) -> int:
    from pipeline.cli.app import main as run
    return run(argv)
