"""The ``longattn`` command: ``bench [GROUP]``, ``doctor``, ``simulate lean|parallel``,
``calibrate duo|double-sparsity``.

Each subcommand is a :class:`Command` (its arguments and its run function);
adding one (``simulate``, ``calibrate``) is one more entry in ``COMMANDS``.
Bad arguments that argparse cannot check (an unknown group, bad sizes) are
:class:`~longattn.errors.LongAttnError` raised by the library itself, so the
same message reaches Python callers; here they become ``error: ...`` on
stderr and exit status 2, like argparse's own errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from longattn.errors import LongAttnError

USAGE_ERROR = 2


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --- bench ------------------------------------------------------------------

def _configure_bench(parser: argparse.ArgumentParser) -> None:
    from longattn.bench.scenarios import group_names

    groups = [*group_names(), "parallel", "offload"]
    parser.add_argument(
        "group", nargs="?", default="dense", metavar="GROUP",
        help=f"benchmark group, one of: {', '.join(groups)} (default: dense); parallel launches its own gloo "
             "ranks (also: torchrun --nproc-per-node N -m longattn.parallel.bench)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, skip slow compiles (a smoke run)")
    parser.add_argument(
        "--repeats", type=int, default=None, metavar="N",
        help="timed rounds per case, all run (default: the group's, 5 for dense, fewer for a method "
             "whose rounds would pass 5 s in a case)",
    )
    parser.add_argument("--sizes", default=None, metavar="N,N,...", help="sizes to run instead of the group's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated inputs (default: 0)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="results folder (default: ./longattn-results/<group>-<timestamp>/)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar; one line per finished case")
    parser.add_argument("--methods", default=None, metavar="TEXT,...",
                        help="run only the methods whose names contain one of these (e.g. 'decode' in the model "
                             "group); the others are listed as not selected")
    parser.add_argument("--world", default=None, metavar="N,N,...",
                        help="parallel: world sizes to launch (default: 2,4)")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="parallel: a profile from `longattn simulate parallel --fit`; predicted step times "
                             "are shown next to the measured ones")


def _run_bench(args: argparse.Namespace) -> int:
    from longattn.bench.report import format_table
    from longattn.bench.runner import run_group
    from longattn.bench.scenarios import get_group, parse_sizes

    if args.group == "parallel":
        return _run_bench_parallel(args)
    if args.group == "offload":
        return _run_bench_offload(args)
    for option in ("world", "profile"):
        if getattr(args, option) is not None:
            raise LongAttnError(f"--{option} applies to the parallel group only, not {args.group!r}")
    get_group(args.group)  # fail on a bad name before anything slow
    sizes = None if args.sizes is None else parse_sizes(args.sizes, "--sizes")
    results = run_group(
        args.group, sizes=sizes, repeats=args.repeats, quick=args.quick,
        seed=args.seed, out_dir=args.out, quiet=args.quiet,
        methods=None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()],
    )
    print(format_table(results))
    return 0


def _run_bench_parallel(args: argparse.Namespace) -> int:
    from longattn.bench.parallel import DEFAULT_WORLDS, run
    from longattn.bench.scenarios import parse_sizes

    sizes = None if args.sizes is None else parse_sizes(args.sizes, "--sizes")
    if sizes is not None and len(sizes) != 1:
        raise LongAttnError(f"--sizes: the parallel group takes one sequence length, got {args.sizes!r}")
    worlds = DEFAULT_WORLDS if args.world is None else parse_sizes(args.world, "--world")
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    print(run(worlds=worlds, tokens=None if sizes is None else sizes[0], quick=args.quick, repeats=args.repeats,
              methods=methods, seed=args.seed, out_dir=args.out, profile=args.profile))
    return 0


def _run_bench_offload(args: argparse.Namespace) -> int:
    from longattn.bench.offload import run
    from longattn.bench.scenarios import parse_sizes

    for option in ("world", "profile", "methods"):
        if getattr(args, option) is not None:
            raise LongAttnError(f"--{option} does not apply to the offload group")
    sizes = None if args.sizes is None else parse_sizes(args.sizes, "--sizes")
    if sizes is not None and len(sizes) != 1:
        raise LongAttnError(f"--sizes: the offload group takes one context length, got {args.sizes!r}")
    print(run(tokens=None if sizes is None else sizes[0], quick=args.quick, repeats=args.repeats, seed=args.seed,
              out_dir=args.out))
    return 0


# --- doctor -----------------------------------------------------------------

def _configure_doctor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_doctor(args: argparse.Namespace) -> int:
    from longattn.doctor import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


# --- simulate ---------------------------------------------------------------

def _configure_simulate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="what to simulate; one of: lean (stream-K decode), parallel (sequence-parallel "
                             "ring/zigzag/Ulysses/TokenRing/APB step times)")
    parser.add_argument("--gpu", default="h100", help="lean: GPU preset: h100 or h200 (default: h100)")
    parser.add_argument("--sms", type=int, default=None, metavar="N", help="SM count (default: the preset's, 132)")
    parser.add_argument("--workers-per-sm", type=int, default=None, metavar="N",
                        help="stream-K workers per SM (default: 2, as Microsoft's CUDA LeanAttention)")
    parser.add_argument("--bandwidth", type=float, default=None, metavar="GB/s",
                        help="HBM bandwidth of the whole GPU (default: the preset's)")
    parser.add_argument("--separate-merge", action="store_true",
                        help="merge stream-K partials in a second kernel (as the Triton twin) instead of in-kernel")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller sweep (lean: batch 1/4/16/64, context 1k/16k/256k/1M; parallel: N 2-16, "
                             "T 128k/1M, and a short --fit)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ragged batches' lengths (default: 0)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="results folder (default: ./longattn-results/simulate-<MODEL>-<timestamp>/)")
    parser.add_argument("--quiet", action="store_true", help="no per-shape table; assumptions and summary only")
    par = parser.add_argument_group("parallel", "options of MODEL parallel")
    source = par.add_mutually_exclusive_group()
    source.add_argument("--fit", action="store_true",
                        help="measure this machine first (gloo ping-pong between 2 spawned ranks, one-thread "
                             "attention fit; under a minute) and write OUT/profile.json")
    source.add_argument("--profile", default=None, metavar="FILE", help="a profile JSON written by --fit")
    source.add_argument("--preset", default=None, metavar="NAME",
                        help="a GPU profile from published figures: h100-nvlink or h100-ib (the default)")
    par.add_argument("--nheads", type=int, default=32, help="query heads (default: 32)")
    par.add_argument("--nheads-k", type=int, default=8, help="kv heads (default: 8)")
    par.add_argument("--headdim", type=int, default=128, help="head size (default: 128)")
    par.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="element type of the messages (default: the profile's)")
    par.add_argument("--ranks-per-host", type=int, default=None, metavar="N",
                     help="ranks sharing one host's cores in the sweep (default: the profile's cores)")


def _run_simulate(args: argparse.Namespace) -> int:
    from longattn.decode.simulate import get_gpu, run_sweep
    from longattn.bench.simulate_report import default_out_dir, format_report, write_outputs
    from longattn.errors import ArgumentError

    if args.model == "parallel":
        return _run_simulate_parallel(args)
    if args.model != "lean":
        raise ArgumentError(f"MODEL must be one of ['lean', 'parallel'], got {args.model!r}")
    for option, value in (("--sms", args.sms), ("--workers-per-sm", args.workers_per_sm)):
        if value is not None and value < 1:
            raise ArgumentError(f"{option} must be a positive integer, got {value}")
    if args.bandwidth is not None and not args.bandwidth > 0:
        raise ArgumentError(f"--bandwidth must be > 0 GB/s, got {args.bandwidth}")
    gpu = get_gpu(args.gpu, num_sms=args.sms, workers_per_sm=args.workers_per_sm, hbm_bandwidth_gbs=args.bandwidth)
    results = run_sweep(gpu, quick=args.quick, seed=args.seed, separate_merge=args.separate_merge)
    write_outputs(results, args.out if args.out is not None else default_out_dir())
    print(format_report(results, table=not args.quiet))
    return 0


def _run_simulate_parallel(args: argparse.Namespace) -> int:
    from longattn.bench import report as bench_report
    from longattn.parallel import cost_model
    from longattn.parallel import simulate as parallel_simulate

    out_dir = args.out if args.out is not None else parallel_simulate.default_out_dir()
    profile_path = None
    if args.fit:
        print("fitting this machine's profile (gloo ping-pong, one-thread attention)...", file=sys.stderr, flush=True)
        profile = cost_model.fit_profile(quick=args.quick)
        os.makedirs(out_dir, exist_ok=True)
        profile_path = os.path.join(out_dir, "profile.json")
        cost_model.save_profile(profile, profile_path)
    elif args.profile is not None:
        profile = cost_model.load_profile(args.profile)
    else:
        profile = cost_model.get_preset(args.preset or "h100-ib")
    results = parallel_simulate.run_sweep(
        profile, quick=args.quick, nheads=args.nheads, nheads_k=args.nheads_k, headdim=args.headdim,
        dtype=args.dtype, ranks_per_host=args.ranks_per_host,
    )
    results["profile_file"] = profile_path if profile_path is not None else args.profile
    bench_report.write_outputs(results, out_dir, plot=parallel_simulate.write_plot,
                               plot_name=parallel_simulate.PLOT_NAME)
    print(parallel_simulate.format_report(results, table=not args.quiet))
    return 0


# --- calibrate --------------------------------------------------------------

def _configure_calibrate(parser: argparse.ArgumentParser) -> None:
    # One sub-parser per method: each method's options (and --help) are its own.
    methods = parser.add_subparsers(dest="target", metavar="METHOD", help="the method to calibrate (each has --help)")
    duo = methods.add_parser("duo", help="find DuoAttention's retrieval heads; write a HeadPattern file",
                             description="find DuoAttention's retrieval heads; write a HeadPattern file")
    _add_model_options(duo)
    duo.add_argument("--how", choices=("scores", "optimise"), default="scores",
                     help="scores: training-free echo/induction scores (default); optimise: DuoAttention's "
                          "gate optimisation")
    duo.add_argument("--sparsity", type=float, default=0.5, help="fraction of kv heads made streaming heads")
    duo.add_argument("--sink-size", type=int, default=64)
    duo.add_argument("--recent-size", "--window-size", dest="recent_size", type=int, default=256,
                     help="tokens a streaming head sees, itself included (default: 256; --window-size is its old name)")
    duo.add_argument("--seqlen", type=int, default=256, help="calibration sequence length (default: 256)")
    duo.add_argument("--steps", type=int, default=100, help="optimisation steps (optimise only; default: 100)")
    duo.add_argument("--seed", type=int, default=0)
    duo.add_argument("--out", required=True, metavar="FILE", help="where to write the HeadPattern JSON")

    ds_help = ("rank each kv head's channels by mean |q*k| (or |q|, |k|) over the queries and keys of the model's "
               "longattn.attention calls on random tokens; write a ChannelConfig file")
    ds = methods.add_parser("double-sparsity", help=ds_help, description=ds_help)
    _add_model_options(ds)
    ds.add_argument("--r", type=int, required=True, metavar="R",
                    help="channels kept per kv head by default (the file keeps the full ranking; even with a rotary "
                         "layout); the paper uses headdim/16 to headdim/4")
    ds.add_argument("--method", dest="score", choices=("qk", "q", "k"), default="qk",
                    help="channel score: mean |q_c k_c| (qk, default), |q_c| (q) or |k_c| (k)")
    ds.add_argument("--rotary", choices=("half", "interleaved", "none"), required=True,
                    help="the model's rotary layout: half (GPT-NeoX/Llama: channel i pairs with i + headdim/2), "
                         "interleaved (GPT-J: 2i with 2i+1) or none; rotary pairs are kept whole")
    ds.add_argument("--seqlen", type=int, default=256, help="calibration sequence length (default: 256)")
    ds.add_argument("--batch", type=int, default=4, help="calibration sequences (default: 4)")
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--out", required=True, metavar="FILE", help="where to write the ChannelConfig JSON")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODULE:CALLABLE",
                        help="a callable returning the model (an nn.Module taking token ids (batch, seqlen) whose "
                             "layers call longattn.attention), e.g. mypkg.models:make_model")
    parser.add_argument("--vocab-size", type=int, required=True, help="token ids are drawn from [0, VOCAB_SIZE)")


def _load_model(spec: str):
    import importlib

    from longattn.errors import ArgumentError

    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ArgumentError(f"--model {spec!r} does not name an importable MODULE:CALLABLE ({exc})") from None
    return factory()


def _run_calibrate(args: argparse.Namespace) -> int:
    from longattn.errors import ArgumentError

    if args.target == "duo":
        return _run_calibrate_duo(args)
    if args.target == "double-sparsity":
        return _run_calibrate_double_sparsity(args)
    raise ArgumentError(f"METHOD must be one of ['duo', 'double-sparsity'], got {args.target!r}")


def _check_out_file(path: str) -> None:
    """Fail before a long calibration run, not after, if ``--out`` cannot be written."""
    import os

    from longattn.errors import ArgumentError

    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ArgumentError(f"--out {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ArgumentError(f"--out {path}: the directory {parent} is not writable")


def _run_calibrate_duo(args: argparse.Namespace) -> int:
    from longattn.bench.progress import Progress
    from longattn.sparse.calibrate import calibrate_duo

    _check_out_file(args.out)
    model = _load_model(args.model)
    kwargs = {"seqlen": args.seqlen}
    if args.how == "optimise":
        progress = Progress(1, quiet=False)
        progress.start_case("gate optimisation", steps=args.steps)
        kwargs.update(steps=args.steps, progress=lambda step, loss: progress.step(f"step {step + 1}: loss {loss:.4g}"))
    pattern = calibrate_duo(model, vocab_size=args.vocab_size, method=args.how, sparsity=args.sparsity,
                            sink_size=args.sink_size, recent_size=args.recent_size, seed=args.seed, **kwargs)
    pattern.save(args.out)
    rows = ["layer " + str(i) + ": " + " ".join("R" if r else "s" for r in row)
            for i, row in enumerate(pattern.retrieval)]
    print("\n".join([f"{pattern.num_layers} layers x {pattern.nheads_k} kv heads, "
                      f"{pattern.retrieval_fraction:.0%} retrieval (R) / streaming (s):", *rows,
                      f"pattern: {args.out}"]))
    return 0


def _run_calibrate_double_sparsity(args: argparse.Namespace) -> int:
    from longattn.sparse.channels import calibrate_double_sparsity

    _check_out_file(args.out)
    model = _load_model(args.model)
    config = calibrate_double_sparsity(model, vocab_size=args.vocab_size, r=args.r, method=args.score,
                                       rotary=args.rotary, seqlen=args.seqlen, batch=args.batch, seed=args.seed)
    config.save(args.out)
    top = [f"layer {i}: " + " | ".join(" ".join(str(c) for c in row[:config.r]) for row in layer)
           for i, layer in enumerate(config.ranking)]
    print("\n".join([f"{config.num_layers} layers x {config.nheads_k} kv heads x headdim {config.headdim}, "
                      f"top {config.r} channels per kv head (method {config.method}, rotary {config.rotary}):",
                      *top, f"config: {args.out}"]))
    return 0


COMMANDS = (
    Command("bench", "time attention methods against baselines; write a table, JSON and a plot",
            _configure_bench, _run_bench),
    Command("doctor", "show this machine's libraries, compilers and usable backends",
            _configure_doctor, _run_doctor),
    Command("simulate", "model decode schedules on a GPU (lean: FA2 vs split-K vs stream-K) or sequence-parallel "
                        "step times (parallel); table, JSON, plot",
            _configure_simulate, _run_simulate),
    Command("calibrate", "calibrate a sparse method on a model: duo (retrieval/streaming heads, a HeadPattern "
                         "file), double-sparsity (outlier channels, a ChannelConfig file)",
            _configure_calibrate, _run_calibrate),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longattn", description="longattn: long-context attention tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``longattn`` console script; returns the exit status."""
    parser = build_parser()
    if argv is not None:  # allow pathlib paths, e.g. main(["bench", "--out", tmp_path])
        argv = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in argv]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    try:
        return args.run(args)
    except LongAttnError as exc:
        print(f"longattn {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"longattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
