"""``python -m pipelines.review EXPORT_DIR`` (the page) or ``--summarise EXPORT_DIR`` (grades to MLflow)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.review",
        description="Review exported saliency overlays in the browser, or summarise the readers' grades.",
    )
    p.add_argument("export_dir", help="an export folder (holding index.csv) of the bundles' 'export' run")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--summarise", action="store_true", help="summarise the grades and log them to MLflow")
    p.add_argument("--run-id", default=None, help="MLflow run to log the summary into (default: the export's)")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: sqlite mlflow.db here)")
    p.add_argument("--experiment", default="review", help="experiment of a new run (default 'review')")
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p.parse_args(argv)


def _summarise(args: argparse.Namespace) -> int:
    from ppi_med.tracking import default_tracking_uri

    from .agreement import summarise_export

    uri = args.tracking_uri or default_tracking_uri()
    summary, run_id, how = summarise_export(
        args.export_dir, tracking_uri=uri, run_id=args.run_id, experiment=args.experiment
    )
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    where = {"given": "the given run", "export": "the export's run", "new": "a new run"}[how]
    print(f"\nlogged to {where} {run_id} in {uri}", flush=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .server import make_server

    try:
        server = make_server(args.export_dir, host=args.host, port=args.port, quiet=not args.verbose)
    except OSError as err:  # the port is taken, or the address is not this machine's
        print(f"error: cannot serve on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    n_cases = len(server.cases)
    problems = [f"  {c.case_id}: {p}" for c in server.cases for p in c.problems]
    if problems:
        print("some files of the index are not in the export folder:\n" + "\n".join(problems), file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: other machines can reach the page and its grades", file=sys.stderr)
    print(f"review page for {server.root} ({n_cases} cases): {server.url}", flush=True)
    print(f"grades are saved to {server.root / 'review'}/<reader>.csv; stop with Ctrl-C", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with the reason on bad input).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    from .cases import ReviewInputError
    from .server import ReviewSetupError

    args = _parse(argv)
    try:
        return _summarise(args) if args.summarise else _serve(args)
    except (ReviewInputError, ReviewSetupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
