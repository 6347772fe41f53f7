"""What every experiment shares: the registry record, the run context, results files, data.

An experiment is a function ``run(ctx: Context) -> Outcome`` registered with :func:`register`
together with its paper, the paper's claim, and three settings dictionaries (default, ``--quick``
and ``--paper`` sizes). The command line (:mod:`hypergrad.cli`) builds the :class:`Context`, runs
the function and writes the run folder (:func:`write_run`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

import hypergrad as hg

__all__ = [
    "Context",
    "Experiment",
    "Outcome",
    "REGISTRY",
    "register",
    "Limit",
    "COMMON_LIMITS",
    "Rule",
    "fits",
    "DIGITS_FIT",
    "STANDARDISED_N_TRAIN",
    "check_settings",
    "normalise_setting",
    "parse_value",
    "machine_info",
    "versions",
    "write_run",
    "write_interrupted",
    "split_timings",
    "digits_split",
    "plt",
    "finite_metrics",
]

T = TypeVar("T")
Batch = tuple[Tensor, ...]


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What an experiment returns.

    Attributes:
        metrics: flat ``{name: float}`` final numbers (go into results.json and wandb's summary).
        table: rows for the printed result table (``list[dict]``, same keys in every row).
        headline: one line comparing ours with the paper's claim (goes into the README table).
    """

    metrics: dict[str, float]
    table: list[dict[str, Any]]
    headline: str


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A registered experiment.

    Attributes:
        name: the command-line name (``hypergrad run NAME``).
        number: the issue's experiment number (ordering in ``hypergrad list`` and the README).
        title: one line for ``hypergrad list``.
        paper: the reference.
        claim: the paper's number or claim.
        defaults: settings of the default size (≤ 5 min on 2 CPU cores); their types fix how
            ``--set key=value`` is parsed.
        quick: overrides for ``--quick`` (seconds).
        paper_size: overrides for ``--paper`` (the paper-sized setting, for a GPU).
        run: the function.
        methods: the values ``--method`` accepts (empty: the experiment has no method switch).
        limits: the allowed values of settings, beyond :data:`COMMON_LIMITS` and the type rules
            of :func:`check_settings` (``{name: Limit}``).
        rules: conditions on several settings together (:class:`Rule`), checked after each
            setting's own.
        cpu_only: the experiment computes on the CPU whatever ``--device`` says (small float64
            problems, CPU random streams): ``hypergrad run`` gives it the CPU, and says so when
            ``--device cuda`` was asked for, so that its record names the device it ran on.
    """

    name: str
    number: int
    title: str
    paper: str
    claim: str
    defaults: dict[str, Any]
    quick: dict[str, Any]
    paper_size: dict[str, Any]
    run: Callable[[Context], Outcome]
    methods: tuple[str, ...] = ()
    limits: dict[str, Limit] = dataclasses.field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    cpu_only: bool = False


@dataclasses.dataclass(frozen=True)
class Limit:
    """The allowed values of a setting: a number in ``[low, high]`` (``low_open`` / ``high_open``
    exclude the end; ``None``: unbounded), or, with ``items``, a comma-separated list of ``int``,
    ``float`` or ``str`` items, each in the bounds (or, for ``str``, one of ``choices``).

    >>> Limit(0, 1, high_open=True).describe(0.5)
    'a number in [0, 1)'
    >>> Limit(1, items=int).describe("1,2")
    'comma-separated integers >= 1'
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    items: type | None = None
    choices: tuple[str, ...] = ()

    def _bounds(self) -> str:
        lo, hi = _number_text(self.low), _number_text(self.high)
        if lo and hi:
            return f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        if lo:
            return f"{'>' if self.low_open else '>='} {lo}"
        if hi:
            return f"{'<' if self.high_open else '<='} {hi}"
        return ""

    def describe(self, like: Any) -> str:
        """What the setting accepts, in words (``like``: its default)."""
        if self.items is not None:
            if self.choices:
                return f"comma-separated items from {', '.join(self.choices)}"
            kind = {int: "integers", float: "numbers"}.get(self.items, "items")
            return f"comma-separated {kind} {self._bounds()}".rstrip()
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        kind = "an integer" if isinstance(like, int) else "a number"
        return f"{kind} {self._bounds()}".rstrip()

    def accepts(self, value: float) -> bool:
        """Whether the number ``value`` lies in the bounds (and is finite)."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))


def _number_text(x: float | None) -> str:
    """A bound as words show it: an integer with every digit (the seed's ``2147483647``, which
    ``:g`` wrote as ``2.14748e+09``, a bound 3,647 below the true one), other numbers with
    ``:g``; ``""`` for ``None``.

    >>> _number_text(2**31 - 1), _number_text(1.0), _number_text(1e-05), _number_text(None)
    ('2147483647', '1', '1e-05', '')
    """
    if x is None:
        return ""
    if isinstance(x, int) or (math.isfinite(x) and x.is_integer() and abs(x) < 1e16):
        return str(int(x))
    return f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Rule:
    """A condition on several settings together (each setting alone may be fine): ``holds``
    takes their values in the order of ``keys``; ``says`` is what it requires, in words.

    >>> r = Rule(("lam_min", "lam_max"), lambda lo, hi: lo < hi, "lam_min < lam_max")
    >>> r.holds(1e-5, 100.0)
    True
    """

    keys: tuple[str, ...]
    holds: Callable[..., bool]
    says: str


def fits(keys: tuple[str, ...], total: int, data: str, spare: int = 1) -> Rule:
    """The rule that the examples the settings ``keys`` take (their sum) leave at least ``spare``
    of the ``total`` in ``data`` (for the test set)."""
    return Rule(
        keys,
        lambda *n: sum(n) + spare <= total,
        f"{' + '.join(keys)} <= {total - spare} ({data} has {total} examples"
        + (f", and {spare} must be left for the test set)" if spare else ")"),
    )


#: the digits as :func:`digits_split` splits them: n_train + n_val, at least one left to test on
DIGITS_FIT = fits(("n_train", "n_val"), 1797, "scikit-learn's digits")

#: ``n_train`` of data standardised with the training examples' standard deviation (the digits of
#: :func:`digits_split`, breast_cancer): one example has none (NaN), and every input was NaN
STANDARDISED_N_TRAIN = Limit(2)


_COUNTS = (
    "epochs steps episodes inner_steps outer_steps warmup n_train n_val hidden emb seq_len batch_size "
    "batch val_batch hyper_every every every_m250 eval_inits max_trials subset samples seeds solver_steps"
).split()
_RATES = ("lr", "inner_lr", "hyper_lr", "hyper_lr_min", "tol", "budget_multiple")

#: limits of the settings that mean the same in every experiment (an experiment's own win):
#: counts are >= 1, learning rates and tolerances > 0, the seed a 31-bit integer >= 0
COMMON_LIMITS: dict[str, Limit] = {
    **dict.fromkeys(_COUNTS, Limit(1)),
    **dict.fromkeys(_RATES, Limit(0, low_open=True)),
    "seed": Limit(0, 2**31 - 1),
}


def _limit(exp: Experiment, key: str) -> Limit | None:
    if key in exp.limits:
        return exp.limits[key]
    lim = COMMON_LIMITS.get(key)
    if lim is None or (lim.items is None and isinstance(exp.defaults.get(key), str)):
        return None  # e.g. a comma-separated "steps" where the common "steps" is a count
    return lim


def describe_setting(exp: Experiment, key: str) -> str:
    """What ``key`` accepts in ``exp``, in words (for error messages and ``hypergrad show``)."""
    like = exp.defaults.get(key)
    if key == "method" and exp.methods:
        return f"one of {', '.join(exp.methods)}"
    lim = _limit(exp, key)
    if lim is not None:
        return lim.describe(like)
    if isinstance(like, bool):
        return "a boolean (true/false)"
    if isinstance(like, int):
        return "an integer >= 0"
    if isinstance(like, float):
        return "a number >= 0"
    return "a string"


def check_settings(exp: Experiment, config: Mapping[str, Any]) -> None:
    """Check every setting of ``config`` against its type (the default's), :data:`COMMON_LIMITS`
    and ``exp.limits``: integers and numbers without a limit must be finite and >= 0.

    Then ``exp.rules``, the conditions on several settings together.

    Raises:
        ValueError: naming the first bad setting, its value and what it accepts (or the settings
            that break a rule, and the rule).
    """
    for key, value in config.items():
        like = exp.defaults.get(key, 0 if key == "seed" else None)
        if like is None:
            continue
        allowed = describe_setting(exp, key)
        bad = ValueError(f"setting {key}={value!r} is not allowed: {exp.name}'s {key} is {allowed}")
        lim = _limit(exp, key)
        if key == "method" and exp.methods:
            if value not in exp.methods:
                raise bad
            continue
        if isinstance(like, bool):
            if not isinstance(value, bool):
                raise bad
            continue
        if isinstance(like, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad
            if isinstance(like, int) and not isinstance(value, int):
                raise bad
            if not (lim or Limit(0)).accepts(float(value)):
                raise bad
            continue
        if not isinstance(value, str):
            raise bad
        if lim is None:
            continue
        if lim.items is None:
            if lim.choices and value not in lim.choices:
                raise bad
            continue
        parts = [t.strip() for t in value.split(",") if t.strip()]
        if not parts:
            raise bad
        for t in parts:
            if lim.choices:
                if t not in lim.choices:
                    raise bad
                continue
            try:
                item = parse_value(t, lim.items())
            except ValueError:
                raise bad from None
            if lim.items in (int, float) and not lim.accepts(float(item)):
                raise bad
    for rule in exp.rules:
        if all(k in config for k in rule.keys) and not rule.holds(*(config[k] for k in rule.keys)):
            got = ", ".join(f"{k}={config[k]!r}" for k in rule.keys)
            what = (
                f"setting {got} is not allowed"
                if len(rule.keys) == 1
                else f"settings {got} are not allowed together"
            )
            raise ValueError(f"{what}: {exp.name} needs {rule.says}")


REGISTRY: dict[str, Experiment] = {}


def register(
    name: str,
    *,
    number: int,
    title: str,
    paper: str,
    claim: str,
    defaults: dict[str, Any],
    quick: dict[str, Any],
    paper_size: dict[str, Any] | None = None,
    methods: tuple[str, ...] = (),
    limits: dict[str, Limit] | None = None,
    rules: tuple[Rule, ...] = (),
    cpu_only: bool = False,
) -> Callable[[Callable[[Context], Outcome]], Callable[[Context], Outcome]]:
    """Decorator adding an experiment function to :data:`REGISTRY` (the arguments are the
    fields of :class:`Experiment`)."""

    def deco(fn: Callable[[Context], Outcome]) -> Callable[[Context], Outcome]:
        for k in (*quick, *(paper_size or {})):
            if k not in defaults:
                raise KeyError(f"experiment {name!r}: size setting {k!r} has no default")
        if methods and defaults.get("method") not in methods:
            raise ValueError(f"experiment {name!r}: default method must be one of {methods}")
        for k in limits or {}:
            if k not in defaults:
                raise KeyError(f"experiment {name!r}: limit on {k!r}, which has no default")
        for rule in rules:
            for k in rule.keys:
                if k not in defaults:
                    raise KeyError(f"experiment {name!r}: rule on {k!r}, which has no default")
        REGISTRY[name] = Experiment(
            name,
            number,
            title,
            paper,
            claim,
            dict(defaults),
            dict(quick),
            dict(paper_size or {}),
            fn,
            methods,
            dict(limits or {}),
            tuple(rules),
            cpu_only,
        )
        for size in (defaults, {**defaults, **quick}, {**defaults, **(paper_size or {})}):
            check_settings(REGISTRY[name], size)
        return fn

    return deco


def parse_value(text: str, like: Any) -> Any:
    """Parse ``text`` as the type of ``like`` (a default): bool, int, float or str.

    >>> parse_value("3", 1), parse_value("1e-3", 0.1), parse_value("false", True), parse_value("cg", "x")
    (3, 0.001, False, 'cg')
    """
    if isinstance(like, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(like, int):
        try:
            return int(text)  # exact, however many digits
        except ValueError:
            pass
        try:
            f = float(text)  # "1e3", "10.0"
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if not f.is_integer():
            raise ValueError(f"expected an integer, got {text!r}")
        return int(f)
    if isinstance(like, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    return text


def normalise_setting(exp: Experiment, key: str, value: Any) -> Any:
    """``value`` of a comma-separated list setting written one way: ``"[1, 2]"``, ``"1, 2,"``
    and ``"1,2"`` all become ``"1,2"`` (a list as a sweep agent or a shell writes it), and each
    item of a list of integers is written as one (``"1e1"`` and ``"10.0"``, which YAML makes of
    a sweep's ``[10.0]``, become ``"10"``); other settings' values are returned as they are.

    >>> from hypergrad.experiments import REGISTRY, load_all
    >>> load_all()
    >>> normalise_setting(REGISTRY["accuracy"], "steps", "[1, 5.0 ,1e1]")
    '1,5,10'
    """
    lim = _limit(exp, key)
    if lim is None or lim.items is None or not isinstance(value, str):
        return value
    text = value.strip()
    if len(text) >= 2 and text[0] + text[-1] in ("[]", "()"):
        text = text[1:-1]
    items = [t.strip().strip("'\"") for t in text.split(",") if t.strip().strip("'\"")]
    if lim.items is int:
        items = [_integer_text(t) for t in items]
    return ",".join(items)


def _integer_text(text: str) -> str:
    """``text`` written as the integer it means (``"1e1"`` -> ``"10"``), or as it is when it
    means none (:func:`check_settings` then names it)."""
    try:
        return str(parse_value(text, 0))
    except ValueError:
        return text


def _coerce(value: Any, like: Any) -> Any:
    """Coerce a value from wandb.config (already typed by YAML) to the default's type; a list
    (a sweep's list value) for a string setting becomes its comma-separated items, and so does a
    single number (``values: [1, 5, 10]`` over a list setting such as ``steps``: each point one
    item). A value that does not mean the type is returned as it is, for :func:`check_settings`
    to name: a boolean for a number (``true`` is not ``1`` steps), a number other than 0 and 1
    for a boolean, a boolean for a string.

    >>> _coerce(4.0, 1), _coerce(1, False), _coerce(0.5, False), _coerce(True, 1), _coerce(5, "1,2")
    (4, True, 0.5, True, '5')
    """
    if isinstance(value, (list, tuple)) and isinstance(like, str):
        return ",".join(str(v) for v in value)
    if isinstance(value, str):
        return parse_value(value, like)
    if isinstance(like, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # (a sweep point's one item; check_settings names one that is not)
    if isinstance(like, bool):
        return bool(value) if isinstance(value, (bool, int, float)) and value in (0, 1) else value
    if isinstance(value, bool):
        return value
    if isinstance(like, int) and isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    if isinstance(like, float) and isinstance(value, (int, float)):
        return float(value)
    return value


class Context:
    """What an experiment function gets: its settings, device, seed, output folder and logger.

    Attributes:
        experiment: the :class:`Experiment`.
        config: the settings (defaults, then size overrides, then ``--set``, then ``wandb.config``).
        device: ``torch.device``.
        seed: the seed (also ``config["seed"]``).
        out: the run folder (created).
        logger: a :class:`hypergrad.log.Logger` (wandb attached with ``--wandb``).
        progress: show tqdm bars (when stderr is a terminal).
    """

    def __init__(
        self,
        experiment: Experiment,
        config: dict[str, Any],
        *,
        device: torch.device,
        out: Path,
        logger: hg.log.Logger,
        progress: bool = True,
    ) -> None:
        self.experiment = experiment
        self.config = config
        self.device = device
        self.seed = int(config["seed"])
        self.out = out
        self.logger = logger
        self.progress = progress
        self.plots: list[Path] = []
        out.mkdir(parents=True, exist_ok=True)

    def bar(self, iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        """A tqdm progress bar over ``iterable`` on stderr (silent with ``progress=False``, and when
        stderr is not a terminal: a CI log gets no carriage-return redraws)."""
        disable = True if not self.progress else None  # None: tqdm's own test, off unless a TTY
        return iter(tqdm(iterable, desc=desc, total=total, disable=disable, mininterval=0.25, leave=False))

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU ``torch.Generator`` seeded with ``seed + offset``."""
        return torch.Generator().manual_seed(self.seed + offset)

    def savefig(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure as ``out/name.png`` (and send it to wandb); closes it."""
        path = self.out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt().close(fig)
        self.plots.append(path)
        self.logger.image(name, path)
        return path


def plt() -> Any:
    """``matplotlib.pyplot``, with the non-interactive Agg backend if pyplot is not imported yet
    (a headless run never needs a display, whatever ``MPLBACKEND`` says: one matplotlib refuses,
    such as the ``module://matplotlib_inline...`` a notebook's ``!hypergrad run`` inherits, made
    ``import matplotlib`` raise after the whole run). A pyplot the user already imported (a
    notebook's inline backend, a GUI) keeps its backend: the experiments save and close their
    figures, and the user's plotting goes on as before."""
    if "matplotlib" not in sys.modules:
        backend = os.environ.pop("MPLBACKEND", None)  # read (and checked) at import only
        try:
            import matplotlib
        finally:
            if backend is not None:
                os.environ["MPLBACKEND"] = backend
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def finite_metrics(metrics: Mapping[str, float]) -> bool:
    """All metrics are finite numbers."""
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())


def _git_commit(package: Path | None = None) -> str | None:
    """The commit of the hypergrad checkout that ``package`` (default: this package's folder)
    lies in, or ``None``: not a checkout, or no git. A hypergrad installed into a virtual
    environment inside the user's own repository (``./.venv``) is in no checkout of its own:
    that repository's commit is not hypergrad's."""
    here = (package or Path(__file__).resolve().parent.parent).resolve()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=here,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != here.parent:
        return None
    return lines[1]


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the run ran: platform, CPU count, torch threads, GPU name."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def versions() -> dict[str, str | None]:
    """Versions of python, hypergrad (and its git commit), torch, numpy, scikit-learn."""
    out: dict[str, str | None] = {
        "python": sys.version.split()[0],
        "hypergrad": hg.__version__,
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    try:
        import sklearn

        out["scikit-learn"] = sklearn.__version__
    except ImportError:  # pragma: no cover
        out["scikit-learn"] = None
    return out


#: metric names that are wall-clock times (they differ between two runs of the same command)
TIMING_SUFFIXES = ("_ms", "_seconds")


def split_timings(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``metrics`` split into (results, timings): the timings are the names ending in
    :data:`TIMING_SUFFIXES`, so that the same command with the same seed gives the same
    results.json ``metrics``.

    >>> split_timings({"val_loss": 0.5, "hyperstep_ms": 3.2})
    ({'val_loss': 0.5}, {'hyperstep_ms': 3.2})
    """
    timing = {k: v for k, v in metrics.items() if k.endswith(TIMING_SUFFIXES)}
    return {k: v for k, v in metrics.items() if k not in timing}, timing


def _json_safe(value: Any) -> Any:
    """``value`` with every number a plain finite ``float`` / ``int``, and every non-finite one
    ``None`` (JSON's ``null``: JSON has no NaN or infinity; Python's ``NaN`` literal, which
    ``json.dumps`` writes by default, stops strict readers such as jq and JavaScript's
    ``JSON.parse``). NumPy scalars and one-element tensors become the float they hold.

    >>> _json_safe({"a": [1, float("nan"), 2.5], "b": float("-inf"), "c": "x"})
    {'a': [1, None, 2.5], 'b': None, 'c': 'x'}
    """
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    number = float(value)
    return number if math.isfinite(number) else None


def _write_json(path: Path, record: Mapping[str, Any]) -> None:
    """Write ``record`` to ``path`` through a temporary file (a run stopped while writing never
    leaves half a file behind), as strict JSON: non-finite numbers as ``null``
    (:func:`_json_safe`)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(record), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_interrupted(
    ctx: Context, error: BaseException, *, wall_seconds: float, command: str, size: str
) -> dict[str, Any]:
    """Write what a run that did not finish leaves: ``interrupted.json`` (the command, the
    settings, why it stopped, after how long, the plots saved so far; ``"resumable": false``)
    and ``trajectory.csv`` with the rows logged so far. No ``results.json``: ``hypergrad report``
    never picks up a half run. Returns the record."""
    exp = ctx.experiment
    record = {
        "experiment": exp.name,
        "number": exp.number,
        "command": command,
        "size": size,
        "config": ctx.config,
        "stopped_by": "KeyboardInterrupt" if isinstance(error, KeyboardInterrupt) else type(error).__name__,
        "error": str(error),
        "rows_logged": len(ctx.logger.history),
        "after_seconds": round(wall_seconds, 2),
        "resumable": False,
        "finished_utc": None,
        "stopped_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "plots": [p.name for p in ctx.plots],
    }
    _write_json(ctx.out / "interrupted.json", record)
    if ctx.logger.history:
        ctx.logger.to_csv(ctx.out / "trajectory.csv")
    return record


def write_run(
    ctx: Context, outcome: Outcome, *, wall_seconds: float, command: str, size: str
) -> dict[str, Any]:
    """Write ``results.json`` and ``trajectory.csv`` into the run folder; returns the record.

    Wall-clock metrics (:func:`split_timings`) go under ``timings``, not ``metrics``. A
    non-finite number (a table cell with no value, such as a search with no trial) is written
    as ``null``: the file is strict JSON."""
    exp = ctx.experiment
    metrics, timings = split_timings(outcome.metrics)
    record = {
        "experiment": exp.name,
        "number": exp.number,
        "title": exp.title,
        "paper": exp.paper,
        "claim": exp.claim,
        "command": command,
        "size": size,
        "config": ctx.config,
        "metrics": metrics,
        "timings": timings,
        "table": outcome.table,
        "headline": outcome.headline,
        "machine": machine_info(ctx.device),
        "versions": versions(),
        "wall_seconds": round(wall_seconds, 2),
        "finished_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "plots": [p.name for p in ctx.plots],
    }
    ctx.logger.to_csv(ctx.out / "trajectory.csv")
    _write_json(ctx.out / "results.json", record)
    return record


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of ``rows`` (floats with 4 significant digits).

    >>> print(format_table([{"method": "a", "loss": 0.123456}, {"method": "bb", "loss": 2.0}]))
    method    loss
    a       0.1235
    bb           2
    """
    if not rows:
        return ""
    keys = list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = []
    for row in [keys, *cells]:
        parts = []
        for i, c in enumerate(row):
            left = i == 0 or (row is not keys and not _numeric(c))
            parts.append(c.ljust(widths[i]) if left else c.rjust(widths[i]))
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _numeric(s: str) -> bool:
    try:
        float(s.rstrip("%"))
    except ValueError:
        return False
    return True


class Timer:
    """Wall-clock seconds since construction (``float(timer)``)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __float__(self) -> float:
        return time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------- data


def digits_split(
    seed: int, n_train: int, n_val: int, device: torch.device, n_test: int | None = None
) -> tuple[Batch, Batch, Batch]:
    """scikit-learn's digits (1,797 8x8 images, shipped with it), shuffled by ``seed`` and split
    into train / val / test (the rest, or ``n_test``), standardised with training statistics.

    Returns:
        ``((x, y), (x, y), (x, y))`` with ``x`` float32 ``(n, 64)``, ``y`` int64 ``(n,)``.

    Raises:
        ValueError: ``n_train < 2`` (one image has no standard deviation: every input was NaN), or
            ``n_train + n_val`` leaves no test digits.
    """
    from sklearn.datasets import load_digits

    if n_train < 2:
        raise ValueError(
            f"n_train = {n_train}: the digits are standardised with the training images' "
            "standard deviation, which needs at least 2"
        )
    x_np, y_np = load_digits(return_X_y=True)
    if n_train + n_val >= len(x_np):
        raise ValueError(f"n_train + n_val = {n_train + n_val} leaves no test digits (of {len(x_np)})")
    perm = np.random.default_rng(seed).permutation(len(x_np))
    x = torch.tensor(x_np[perm] / 16.0, dtype=torch.float32)
    y = torch.tensor(y_np[perm], dtype=torch.long)
    mean, std = x[:n_train].mean(0), x[:n_train].std(0)
    x = ((x - mean) / (std + 0.1)).to(device)
    y = y.to(device)
    a, b = n_train, n_train + n_val
    c = len(x) if n_test is None else min(len(x), b + n_test)
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:c], y[b:c])


def hyperstep_cost(info: hg.HyperStepInfo) -> int:
    """A hyperstep's cost in inner-step units: one gradient of the validation loss, plus one per
    HVP (implicit) or two per replayed step (unrolled: its forward and its backward)."""
    if info.unrolled_steps is not None:
        return 1 + 2 * info.unrolled_steps
    return 1 + (info.solver_iterations or 0)


@torch.no_grad()
def accuracy(model: torch.nn.Module, batch: Batch) -> float:
    """Classification accuracy of ``model`` on ``(x, y, ...)``."""
    return float((model(batch[0]).argmax(-1) == batch[1]).float().mean())


@torch.no_grad()
def ce_loss(model: torch.nn.Module, batch: Batch) -> float:
    """Mean cross-entropy of ``model`` on ``(x, y, ...)``."""
    return float(torch.nn.functional.cross_entropy(model(batch[0]), batch[1]))
