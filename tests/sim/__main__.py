"""Run the simulator: ``python -m tests.sim [--seed S] [--steps N] [--minutes M] [--package DIR]``.

With --seed alone it replays that one schedule (and shrinks and prints it if it fails);
otherwise it runs schedules seed, seed+1, ... until --schedules or --minutes is reached and
prints the figures, then each kind of failure found, shrunk, as readable steps.
"""

from __future__ import annotations

import argparse
import ast
import logging
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    ap.add_argument("--seed", type=int, default=None, help="replay this schedule (or start here)")
    ap.add_argument("--steps", type=int, default=60, help="steps per schedule")
    ap.add_argument("--schedules", type=int, default=None, help="how many schedules to run")
    ap.add_argument("--minutes", type=float, default=None, help="run this long")
    ap.add_argument("--package", default=None, help="import dedupe from this checkout")
    ap.add_argument("--schedule", default=None, help="replay this step list (as printed)")
    ap.add_argument("--shrink-seconds", type=float, default=20.0)
    ap.add_argument("--ignore", default="", help="invariant kinds to look past (comma-separated)")
    ap.add_argument("--without", default="", help="step kinds never to schedule (comma-separated)")
    ap.add_argument("--max-drift", type=float, default=None, help="clock-rate skew bound")
    ap.add_argument("--keep-going", action="store_true", help="do not stop at the first failure")
    ap.add_argument(
        "--cache",
        action="store_true",
        help="cache-fill flights (stale_while_revalidate, stale_if_error: Params.cache)",
    )
    ap.add_argument(
        "--batches",
        action="store_true",
        help="batch calls beside single-key ones (the batch machine: Params.batches)",
    )
    ap.add_argument(
        "--mutant",
        default=None,
        help="plant a fixed defect again (tests/sim/mutants.py; 'list' names them) and look "
        "only for the violations that find it",
    )
    args = ap.parse_args(argv)
    logging.getLogger("dedupe").setLevel(logging.CRITICAL)  # the trace says what happened
    if args.package:
        sys.path.insert(0, args.package)

    from .mutants import MUTANT_PARAMS, MUTANTS, planted
    from .world import KINDS

    if args.mutant == "list":
        for name, (plant, _) in MUTANTS.items():
            print(f"{name}: {(plant.__doc__ or '').split(chr(10))[0]}")
        return 0
    if args.mutant is not None:
        with planted(args.mutant) as kinds:
            args.world = MUTANT_PARAMS.get(args.mutant, {})
            args.mutant = None
            args.ignore = ",".join(sorted(KINDS - kinds))
            return main_with(args)
    return main_with(args)


def main_with(args: argparse.Namespace) -> int:
    from .schedule import Outcome, explore, run, shrink
    from .world import Api, Params

    api = Api()
    world = getattr(args, "world", {})  # a mutant's world (--mutant)
    params = Params(cache=args.cache or world.get("cache", False),
                    batches=args.batches or world.get("batches", False))  # fmt: skip
    for name, value in world.items():
        if name not in ("cache", "batches"):
            setattr(params, name, value)
    if args.max_drift is not None:
        params.max_drift = args.max_drift
    ignored = frozenset(k for k in args.ignore.split(",") if k)
    without = frozenset(k for k in args.without.split(",") if k)
    import dedupe

    print(f"dedupe from {dedupe.__file__}")
    print(f"clock skew bound +-{params.max_drift:.1%}")
    if args.schedule is not None:
        steps = [tuple(s) for s in ast.literal_eval(args.schedule)]
        out = run(args.seed or 0, steps, params, api, trace=True, ignored=ignored)
        print("\n".join(out.lines))
        print("FAILED: " + str(out.violation) if out.violation else "passed")
        return 1 if out.violation else 0

    single = args.seed is not None and args.schedules is None and args.minutes is None
    first = args.seed if args.seed is not None else 1
    count = 1 if single else args.schedules
    until = None if args.minutes is None else time.monotonic() + args.minutes * 60
    if count is None and until is None:
        count = 1000
    started = time.monotonic()
    n = steps_run = 0
    found: dict[str, Outcome] = {}
    counts: dict[str, int] = {}
    seed = first
    while (count is None or n < count) and (until is None or time.monotonic() < until):
        out = explore(seed, args.steps, params, api, ignored, without)
        n += 1
        steps_run += len(out.steps)
        if out.violation is not None:
            kind = out.violation.kind
            counts[kind] = counts.get(kind, 0) + 1
            found.setdefault(kind, out)
            if not args.keep_going and not single:
                break
        seed += 1
    elapsed = time.monotonic() - started
    print(
        f"{n} schedules, {steps_run} steps in {elapsed:.1f}s "
        f"({n / max(elapsed, 1e-9):.0f} schedules/s, {steps_run / max(elapsed, 1e-9):.0f} steps/s)"
    )
    if not found:
        print("no invariant failed")
        return 0
    for kind, out in found.items():
        print(f"\n=== {kind}: {counts[kind]} schedule(s); first at seed {out.seed}")
        small = shrink(out, params, api, budget=args.shrink_seconds, ignored=ignored)
        shown = run(small.seed, small.steps, params, api, trace=True, ignored=ignored)
        print(f"shrunk from {len(out.steps)} to {len(small.steps)} steps:")
        print("\n".join(shown.lines))
        where = f" --package {args.package}" if args.package else ""
        print(
            f'replay: python -m tests.sim{where} --seed {small.seed} --schedule "{small.steps!r}"'
        )
    return 1


if __name__ == "__main__":
    sys.exit(main())
