"""Logging of hyperparameter training, to memory, CSV and (optionally) Weights & Biases.

One line in a training loop logs what a hyperstep did::

    logger = hg.log.Logger(wandb=True, project="my-project", config={"lr": 0.1})
    ...
    info = hopt.hyper_step(train_batch=tb, val_batch=vb)
    logger.hyper_step(info, hparams=hp, step=i, inner_loss=float(loss))

Each call records a flat row of floats: ``outer_loss``, ``hypergrad_norm``, ``solver_iterations``,
``solver_residual``, ``solver_status`` (as a string, and as one-hot ``solver_status/<name>``
counts on wandb), ``unrolled_steps``, ``seconds``, every extra keyword (inner losses, accuracies)
and :func:`hypergrad.hparams.summary` of ``hparams`` under ``hparams/``. With wandb on, the row goes
to ``wandb.log`` together with a histogram of every hyperparameter tensor with more than one entry
(every ``histogram_every`` calls). :meth:`Logger.to_csv` writes the rows as a CSV file.

wandb is imported only when asked for (``wandb=True``). Without an API key and with ``WANDB_MODE``
unset, runs are written offline (``wandb sync`` uploads them later): never a login prompt, a
hang or a crash for want of a key or a network (with a key but no network, wandb's own timeout,
~90 s, passes and the run goes on offline). ``WANDB_MODE=disabled`` keeps wandb out entirely.
Without wandb installed, the error says ``pip install hypergrad[wandb]``.

On wandb, every row gets a step at least the last one sent (wandb drops rows whose step goes
back): a second training run logged by the same logger from step 1 again continues after the
first, and its own step is in the row as ``step``.

>>> import torch, hypergrad as hg
>>> logger = hg.log.Logger()                       # memory only; wandb=True adds wandb
>>> hp = hg.hparams.Hparam(0.5, shape=(3,))
>>> info = hg.HyperStepInfo(0.25, 1.0, 5, 0.1, "fixed", None, 0.01, False, 1)
>>> row = logger.hyper_step(info, hparams=hp, step=10, train_loss=0.5)
>>> row["outer_loss"], row["train_loss"], row["hparams/value.mean"]
(0.25, 0.5, 0.5)
>>> len(logger.history)
1
"""

from __future__ import annotations

import csv
import dataclasses
import math
import netrc
import numbers
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .hparams import summary, values

__all__ = ["Logger", "scalar", "wandb_mode", "import_wandb", "WANDB_INSTALL_HINT"]

WANDB_INSTALL_HINT = "wandb is not installed: pip install hypergrad[wandb]  (or: pip install wandb)"


def import_wandb() -> Any:
    """Import and return the ``wandb`` module.

    Raises:
        ImportError: wandb is not installed; the message says ``pip install hypergrad[wandb]``.
    """
    try:
        import wandb
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(WANDB_INSTALL_HINT) from e
    except Exception as e:  # a broken install: e.g. a protobuf too new for it, a partial upgrade
        raise ImportError(
            f"wandb is installed but failed to import ({type(e).__name__}: {e}); "
            "reinstall it (pip install -U wandb) or run without wandb"
        ) from e
    return wandb


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(
            os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
        )
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def wandb_mode(mode: str | None = None) -> str:
    """The wandb mode a run gets: ``mode`` if given, else ``WANDB_MODE`` if set, else ``"online"``
    when an API key is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry, as ``wandb login``
    writes) and ``"offline"`` otherwise.

    >>> wandb_mode("disabled")
    'disabled'
    """
    if mode:
        return mode
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if _has_api_key() else "offline"


def scalar(key: str, value: Any) -> bool | int | float | str | None:
    """``value`` as a plain Python scalar for a log row: ``str``, ``bool``, ``int``, ``float`` and
    ``None`` stay (the caller leaves ``None`` out), a ``str`` enum becomes its string (``"converged"``
    for ``hg.SolveStatus.CONVERGED``), a NumPy scalar or a one-element tensor or array
    becomes the Python number it holds (non-finite values kept as they are).

    Raises:
        ValueError: ``value`` has several elements or is not a number (the message names ``key``).

    >>> import numpy as np, torch
    >>> scalar("a", torch.tensor([2.0])), scalar("b", np.int64(3)), scalar("c", "cg"), scalar("d", None)
    (2.0, 3, 'cg', None)
    """
    if value is None or type(value) in (str, bool, int, float):
        return value
    if isinstance(value, str):  # a str enum (hg.SolveStatus, a Constraint): its plain string
        return str.__str__(value)  # (str() would give "SolveStatus.CONVERGED", as wandb keys would)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, numbers.Integral):  # NumPy integers, IntEnums
        return int(value)
    if isinstance(value, numbers.Real):  # NumPy floats
        return float(value)
    if isinstance(value, torch.Tensor) or hasattr(value, "dtype") and hasattr(value, "size"):
        n = value.numel() if isinstance(value, torch.Tensor) else int(value.size)
        if n != 1:
            raise ValueError(
                f"Logger: {key!r} has {n} elements, not one: log a scalar (e.g. its mean) per key"
            )
        item = value.item()
        if isinstance(item, (bool, int, float)):
            return item
    raise ValueError(f"Logger: {key!r} is a {type(value).__name__}, not a number or a string")


def _scalars(row: Mapping[str, Any], *, as_float: bool = False, prefix: str = "") -> dict[str, Any]:
    """The scalars of ``row``; a nested mapping's entries are flattened under ``"outer/inner"``
    keys (wandb's panel sections), a key met twice is refused."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            inner = _scalars(v, as_float=as_float, prefix=f"{key}/")
        else:
            s = scalar(key, v)
            inner = {} if s is None else {key: float(s) if as_float and not isinstance(s, str) else s}
        for name in inner:
            if name in out:
                raise ValueError(f"Logger: key {name!r} is given twice (once nested, once flat)")
        out.update(inner)
    return out


def _step(step: Any) -> int | None:
    """``step`` as a Python ``int`` (a NumPy integer, a one-element tensor such as
    ``optimizer.state[p]["step"]``, a float with an integer value); ``None`` stays."""
    if step is None:
        return None
    try:
        s = None if isinstance(step, bool) else scalar("step", step)
    except ValueError:
        s = None
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s != int(s):
        raise ValueError(f"Logger: step must be an integer, got {step!r}")
    return int(s)


def _at_or_after(cell: str | None, step: int) -> bool:
    """Whether a CSV row's ``step`` cell holds a step at or after ``step``."""
    try:
        return cell is not None and float(cell) >= step
    except ValueError:
        return False


def _position(history: list[dict[str, Any]], row: dict[str, Any] | None, guess: int) -> int | None:
    """Where the row object ``row`` (the last one a CSV file got) is in ``history``: at
    ``guess - 1`` unless the user trimmed the history since; ``None`` when it is gone (cleared)."""
    if row is None:
        return None
    if 0 < guess <= len(history) and history[guess - 1] is row:
        return guess - 1
    return next((i for i in range(len(history) - 1, -1, -1) if history[i] is row), None)


def _without_redone(rows: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """``rows`` (a CSV file's, oldest first) without those a run resumed at ``step`` logs again:
    the rows at ``step`` or later after the file's last row before ``step``. Rows of an earlier
    run in the file (a logger that trains several models, each counting from step 1) at those
    step numbers were logged before the checkpoint, and stay; so do rows without a step."""
    start = len(rows)
    while start and not _before(rows[start - 1].get("step"), step):
        start -= 1
    return rows[:start] + [r for r in rows[start:] if not _at_or_after(r.get("step"), step)]


def _before(cell: str | None, step: int) -> bool:
    """Whether a CSV row's ``step`` cell holds a step before ``step``."""
    try:
        return cell is not None and float(cell) < step
    except ValueError:
        return False


def _histogram(wb: Any, v: torch.Tensor) -> Any:
    """``wandb.Histogram`` of the finite entries of ``v`` (``None`` if there are none). Entries a
    few ulps apart, or spanning more than the float range, make NumPy's 64 equal bins (and so
    ``wandb.Histogram``) raise: those get one bin from the smallest to the largest entry."""
    flat = v.detach().reshape(-1).cpu().double()
    flat = flat[torch.isfinite(flat)]  # a NaN would make wandb.Histogram raise
    if not flat.numel():
        return None
    x = flat.numpy()
    try:
        with np.errstate(all="ignore"):
            return wb.Histogram(x)
    except ValueError:  # "Too many bins for data range", or an infinite range
        return wb.Histogram(np_histogram=([len(x)], [float(x.min()), float(x.max())]))


class Logger:
    """Records hypersteps as flat rows; optionally sends them to Weights & Biases.

    Args:
        wandb: start a wandb run (lazy import; see the module docstring for the offline rule)
            (default: ``False``).
        project: wandb project (default: ``WANDB_PROJECT`` if set, else ``"hypergrad"``: wandb
            lets an argument win over its environment variable, so a fixed default would send
            every run to ``hypergrad`` whatever ``WANDB_PROJECT`` says).
        name: wandb run name (default: wandb's choice).
        config: flat settings for ``wandb.init(config=...)`` (default: none).
        dir: folder for wandb's files (default: wandb's, i.e. ``./wandb`` or ``WANDB_DIR``).
        mode: wandb mode, overriding the rule of :func:`wandb_mode` (default: ``None``).
        histogram_every: log hyperparameter histograms every this many :meth:`hyper_step` calls;
            0 turns them off (default: 1).
        prefix: prepended to the hyperparameter summary keys (default: ``"hparams/"``).
        init_kwargs: more keyword arguments for ``wandb.init`` (``entity``, ``group``, ``tags``,
            ``job_type``, ``notes``; ``id`` with ``resume="allow"`` to continue a run's wandb
            run after a restart, where wandb keeps the rows whose step is above those it holds)
            (default: none).

    Attributes:
        history: the rows logged so far (``list[dict[str, float | str]]``).
        run: the wandb run, or ``None``.

    Raises:
        ValueError: ``histogram_every`` not an int >= 0, or ``init_kwargs`` setting one of the
            arguments above (``project``, ``name``, ``config``, ``dir``, ``mode``) or ``reinit``.
        ImportError: ``wandb=True`` without wandb installed (the message says how to install it),
            or with a wandb that fails to import.
        RuntimeError: ``wandb.init`` failed in offline mode (online, a failure, e.g. no network,
            falls back to offline with a message on stderr).

    A context manager: ``with Logger(...) as logger:`` calls :meth:`finish` on exit, with
    ``exit_code=1`` when an exception leaves the block (130 for Ctrl-C), so that wandb shows
    the run as failed.

    >>> logger = Logger()
    >>> logger.log({"val_acc": 0.9}, step=3)
    {'val_acc': 0.9, 'step': 3}
    """

    def __init__(
        self,
        *,
        wandb: bool = False,
        project: str | None = None,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        dir: str | os.PathLike[str] | None = None,
        mode: str | None = None,
        histogram_every: int = 1,
        prefix: str = "hparams/",
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        own = {"project", "name", "config", "dir", "mode", "reinit"}
        clash = sorted(own & set(init_kwargs or {}))
        if clash:
            raise ValueError(
                f"init_kwargs sets {', '.join(clash)}, which Logger sets itself: pass "
                f"{'them' if len(clash) > 1 else 'it'} as Logger's own argument instead"
            )
        if isinstance(histogram_every, bool) or not isinstance(histogram_every, int) or histogram_every < 0:
            raise ValueError(f"Invalid histogram_every: {histogram_every!r} (need an int >= 0)")
        self.history: list[dict[str, Any]] = []
        self.histogram_every = histogram_every
        self.prefix = prefix
        self._calls = 0
        self._last_step: int | None = None  # the last step sent to wandb
        self._step_offset = 0
        # per CSV file: how many rows of history it holds, and the last of them (a history the
        # user cleared after a flush, to bound memory, is written whole at the next one)
        self._csv_rows: dict[str, tuple[int, dict[str, Any] | None]] = {}
        self.run: Any = None
        self._wandb: Any = None
        if wandb:
            wb = import_wandb()
            if dir is not None:
                Path(dir).mkdir(parents=True, exist_ok=True)
            self._wandb = wb
            kwargs: dict[str, Any] = {
                "project": project if project is not None else os.environ.get("WANDB_PROJECT") or "hypergrad",
                "name": name,
                "config": dict(config or {}),
                "dir": None if dir is None else str(dir),
                "reinit": "finish_previous",
                **dict(init_kwargs or {}),
            }
            chosen = wandb_mode(mode)
            try:
                self.run = wb.init(mode=chosen, **kwargs)
            except Exception as e:  # online without a network: wandb's CommError after ~90 s
                if chosen != "online":
                    raise RuntimeError(f"wandb.init failed in {chosen} mode: {type(e).__name__}: {e}") from e
                print(
                    f"hypergrad: wandb could not start an online run ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); logging offline instead: "
                    "`wandb sync` the run folder's wandb/offline-run-* later (WANDB_MODE=offline skips "
                    "the wait)",
                    file=sys.stderr,
                )
                try:
                    self.run = wb.init(mode="offline", **kwargs)
                except Exception as e2:
                    raise RuntimeError(
                        f"wandb.init failed online ({type(e).__name__}) and offline "
                        f"({type(e2).__name__}: {e2}); WANDB_MODE=disabled runs without wandb"
                    ) from e2

    def _wandb_step(self, step: int | None) -> int:
        """The step to send to wandb for a row logged at ``step``: wandb drops (with only a
        warning in its internal log) every row whose step is below one already sent, so a step
        that goes back (a second run inside the same script, counting from 1 again) continues
        after the last one; a row without a step gets the next one."""
        if step is None:
            s = 0 if self._last_step is None else self._last_step + 1
        else:
            s = int(step) + self._step_offset
            if self._last_step is not None and s < self._last_step:
                self._step_offset += self._last_step + 1 - s
                s = self._last_step + 1
        self._last_step = s
        return s

    @property
    def config(self) -> dict[str, Any]:
        """The wandb run's config as a dict (a sweep agent's choices land here); ``{}`` without wandb."""
        if self.run is None:
            return {}
        return dict(self.run.config)

    def log(
        self, row: Mapping[str, Any], step: int | np.integer[Any] | torch.Tensor | None = None
    ) -> dict[str, Any]:
        """Record a row of scalars (and send it to wandb); returns the stored row.

        Values are stored as plain Python scalars (:func:`scalar`): strings and numbers stay, NumPy
        scalars and one-element tensors become the number they hold, ``None`` values are left out;
        a tensor with several elements is refused with a ``ValueError`` naming its key. A nested
        mapping is flattened: ``{"val": {"acc": 0.9}}`` is stored as ``{"val/acc": 0.9}``. ``step``
        is stored as an ``int`` (a one-element tensor or NumPy integer becomes one); a step that is
        not an integer raises ``ValueError``.

        >>> Logger().log({"val": {"acc": 0.9, "loss": 0.3}}, step=torch.tensor(4))
        {'val/acc': 0.9, 'val/loss': 0.3, 'step': 4}
        """
        stored: dict[str, Any] = _scalars(row)
        step = _step(step)
        if step is not None:
            stored["step"] = step
        self.history.append(stored)
        if self.run is not None:
            self.run.log(dict(stored), step=self._wandb_step(step))
        return stored

    def hyper_step(
        self,
        info: Any,
        hparams: nn.Module | None = None,
        *,
        step: int | np.integer[Any] | torch.Tensor | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Log one hyperstep: the fields of ``info`` (a :class:`~hypergrad.HyperStepInfo`), the
        extra scalars given as keywords, and a summary (and histograms) of ``hparams``.

        ``info`` may also be a dict (``dataclasses.asdict(info)``, or your own fields). Values (and
        ``step``) are converted as in :meth:`log`, numbers to ``float``; ``None`` fields and keywords
        are left out. A keyword named like a field of ``info`` replaces it: ``info.train_loss`` is the
        training loss the method evaluated for the hyperstep (Implicit's, on ``train_batch``), so
        log your inner step's loss as ``inner_loss`` to keep both.

        Returns:
            The flat row as stored in :attr:`history` (``None`` fields of ``info`` left out).

        Raises:
            TypeError: ``info`` neither a dataclass instance nor a mapping.
            ValueError: a field or keyword that is not a scalar (its key is named), or a ``step``
                that is not an integer.

        Cost: one host read per tensor-valued field or keyword and per hyperparameter tensor
        summarised (and, with wandb, per histogram).
        """
        if dataclasses.is_dataclass(info) and not isinstance(info, type):
            fields = dataclasses.asdict(info)
        elif isinstance(info, Mapping):
            fields = dict(info)
        else:
            raise TypeError(
                f"Logger.hyper_step: info must be a HyperStepInfo (or a dict), got {type(info).__name__}"
            )
        step = _step(step)
        row: dict[str, Any] = _scalars(fields, as_float=True)
        row.update(_scalars(extra, as_float=True))  # (a keyword wins over the field of its name)
        if hparams is not None:
            row.update({f"{self.prefix}{k}": v for k, v in summary(hparams).items()})
        self._calls += 1
        stored = dict(row)
        if step is not None:
            stored["step"] = step
        self.history.append(stored)
        if self.run is not None:
            send = {k: v for k, v in row.items() if k != "solver_status"}
            if isinstance(row.get("solver_status"), str):
                send[f"solver_status/{row['solver_status']}"] = 1
            if hparams is not None and self.histogram_every and self._calls % self.histogram_every == 0:
                for k, v in values(hparams).items():
                    hist = _histogram(self._wandb, v) if v.numel() > 1 else None
                    if hist is not None:
                        send[f"{self.prefix}{k}.hist"] = hist
            if step is not None:
                send["step"] = step
            self.run.log(send, step=self._wandb_step(step))
        return stored

    def image(self, key: str, path: str | os.PathLike[str]) -> None:
        """Send a saved image (a plot) to wandb; no-op without wandb."""
        if self.run is not None:
            self.run.log({key: self._wandb.Image(str(path))}, step=self._wandb_step(None))

    def table(self, key: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Send a table (rows of the same keys, e.g. an experiment's result table) to wandb as a
        ``wandb.Table``, cells other than numbers and strings as text; no-op without wandb or
        rows."""
        table_type = getattr(self._wandb, "Table", None)  # None: a stand-in wandb (tests) without it
        if self.run is None or not rows or table_type is None:
            return
        columns = list(rows[0])
        for row in rows:
            columns.extend(k for k in row if k not in columns)

        def cell(v: Any) -> Any:
            return v if v is None or isinstance(v, (str, bool, int, float)) else str(v)

        data = [[cell(r.get(k)) for k in columns] for r in rows]
        tab = table_type(columns=columns, data=data, allow_mixed_types=True)
        self.run.log({key: tab}, step=self._wandb_step(None))

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Set the run's final metrics (wandb's run summary); no-op without wandb. Numbers, NumPy
        scalars and one-element tensors are stored as numbers; other values are left out."""
        if self.run is not None:
            for k, v in metrics.items():
                try:
                    value = scalar(k, v)
                except ValueError:
                    continue  # not a scalar: no summary entry
                if value is not None:
                    self.run.summary[k] = value

    def to_csv(
        self, path: str | os.PathLike[str], *, append: bool = False, resumed_at: int | None = None
    ) -> Path:
        """Write :attr:`history` as a CSV file (columns: the union of the rows' keys, ``step`` first).

        Args:
            path: the file (its folder is created).
            append: keep the rows already in ``path`` (e.g. written before a run was resumed from
                a checkpoint) and add the rows of :attr:`history` this logger has not written
                there yet: a run that flushes its CSV every few steps writes each row once, and
                two loggers appending to one file keep each other's rows. Columns are the union of
                all rows', cells a row lacks stay empty (default: ``False``: overwrite).
            resumed_at: with ``append``, the step a run resumed from a checkpoint starts at: at
                this logger's first write to ``path``, the file's rows at this step or later
                after its last row before this step (logged by the interrupted run after its
                checkpoint, and done again by the resumed run) are dropped, so that the file holds
                each step once, as an uninterrupted run's would; the rows of an earlier run in the
                file that counted its own steps from 1 stay (default: ``None``: keep them all).

        Returns:
            ``path`` as a :class:`~pathlib.Path`.

        Raises:
            ValueError: ``resumed_at`` without ``append``, or not an integer.
        """
        out = Path(path)
        if resumed_at is not None and not append:
            raise ValueError("Logger.to_csv: resumed_at needs append=True (it says which old rows to keep)")
        resumed = _step(resumed_at)
        key = str(out.resolve())
        rows: list[dict[str, Any]] = []
        keys: list[str] = []
        new = self.history
        if append and out.exists():
            with out.open(newline="") as f:
                reader = csv.DictReader(f)
                keys.extend(reader.fieldnames or [])
                rows.extend({k: v for k, v in r.items() if v != ""} for r in reader)
            written, last = self._csv_rows.get(key, (0, None))  # history[:written] is in the file
            at = _position(self.history, last, written)
            if at is not None:  # rows after the last one written (history trimmed from the front,
                new = self.history[at + 1 :]  # `del logger.history[:-k]`, included)
            elif not written and resumed is not None:
                rows = _without_redone(rows, resumed)
        rows.extend(new)
        for row in rows:
            keys.extend(k for k in row if k not in keys)
        if "step" in keys:
            keys.remove("step")
            keys.insert(0, "step")
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        self._csv_rows[key] = (len(self.history), self.history[-1] if self.history else None)
        return out

    def finish(self, exit_code: int | None = None) -> None:
        """End the wandb run (if any); the in-memory history stays. A non-zero ``exit_code``
        marks the wandb run as failed (an interrupted or crashed run) (default: ``None``: done)."""
        if self.run is not None:
            if exit_code is None:
                self.run.finish()
            else:
                self.run.finish(exit_code=exit_code)
            self.run = None

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.finish()
        else:  # a crash or Ctrl-C inside the block: the wandb run is failed, not finished
            self.finish(exit_code=130 if issubclass(exc_type, KeyboardInterrupt) else 1)
