"""Round 17: README.md and experiments/README.md as a newcomer reads them.

What test_round10_docs, test_repository and test_cli already check (the Python blocks run, the
method swaps, the logging block, the commands' experiments and settings, the cost tables) is not
repeated here. Checked here: the drop-in example keeps its validation images out of training;
every path, ``hg.`` name, Layout entry and ``hypergrad`` subcommand the READMEs mention exists;
the prose numbers quoted from the committed experiment reports are those reports'; what the
READMEs say about the committed plots, the other scripts and their ``--out`` defaults, the
slowest runs, ``hg.hparams.summary`` and Neumann's ``alpha="lr"`` warning holds.
"""

from __future__ import annotations

import configparser
import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hypergrad as hg

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXP_README = ROOT / "experiments" / "README.md"
REPORTS = ROOT / "experiments" / "reports"


def _text(path: Path) -> str:
    """The file with its whitespace collapsed (prose wraps anywhere)."""
    return " ".join(path.read_text().split())


def _blocks(path: Path, lang: str = "python") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)


def _metrics(name: str) -> dict[str, Any]:
    return json.loads((REPORTS / name / "results.json").read_text())["metrics"]


# ---------------------------------------------------------------- the drop-in example's data


def test_readme_drop_in_example_validates_on_images_it_does_not_train_on() -> None:
    """The drop-in example's batches: the training slices and the validation slice of the digits
    are disjoint (they shared 36 images, 1500-1535, when the last training batch ran to 1536),
    and together they cover every image."""
    pytest.importorskip("sklearn")
    block = _blocks(README)[0]
    start = block.index("from sklearn.datasets import load_digits")
    end = block.index("\n", block.index("batches = "))
    ns: dict[str, Any] = {"torch": torch}
    exec(compile(block[start:end], "README-drop-in-data", "exec"), ns)  # noqa: S102 - the README's own lines
    x, batches = ns["x"], ns["batches"]

    def rows(t: torch.Tensor) -> set[int]:
        assert t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # a view of x
        first = t.storage_offset() // x.stride(0)
        return set(range(first, first + t.shape[0]))

    train = {r for tb, _ in batches for r in rows(tb[0])}
    val = {r for _, vb in batches for r in rows(vb[0])}
    assert len(val) == len(rows(batches[0][1][0]))  # one validation set throughout
    assert not train & val, sorted(train & val)[:5]
    assert train | val == set(range(len(x)))


# ------------------------------------------------------------------ what the READMEs name exists


def _paths(text: str) -> set[str]:
    found = set(re.findall(r"(?<![\w/.])((?:experiments|benchmarks|tests|hypergrad|\.ci)/[\w./*-]*\w)", text))
    # run outputs (results/, experiments/results/) are written by the commands, and NAME / RUN_ID
    # are placeholders
    return {p for p in found if not p.startswith("experiments/results") and "NAME" not in p}


def test_every_path_the_readmes_mention_exists() -> None:
    """Every repository path in README.md and experiments/README.md (globs included) exists in
    the checkout."""
    missing = []
    for path in (README, EXP_README):
        found = _paths(path.read_text())
        assert len(found) >= 5, (path.name, found)
        missing += [f"{path.name}: {p}" for p in sorted(found) if not list(ROOT.glob(p))]
    assert not missing, missing


def test_every_hg_name_the_readmes_mention_exists() -> None:
    """Every ``hg.name`` / ``hg.module.name`` in the two READMEs resolves."""
    text = README.read_text() + EXP_README.read_text()
    names = set(re.findall(r"\bhg\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", text))
    assert {"hg.Implicit", "hg.hparams.summary", "hg.log.Logger", "hg.data.WithIndex"} <= names
    missing = []
    for name in sorted(names):
        obj: Any = hg
        for part in name.split(".")[1:]:
            if not hasattr(obj, part):
                missing.append(name)
                break
            obj = getattr(obj, part)
    assert not missing, missing


def test_readme_layout_files_exist_and_define_the_names_listed() -> None:
    """The Layout block: every ``hypergrad/`` file it lists exists, and every public name it puts
    in a file is defined there (``class`` or ``def``)."""
    layout = README.read_text().split("## Layout", 1)[1]
    (block,) = re.findall(r"```\n(.*?)```", layout, re.S)[:1]
    public = set()
    for mod in (hg, hg.hparams, hg.nn, hg.optim, hg.log, hg.data):
        objs = {n: getattr(mod, n) for n in mod.__all__}
        public |= {n for n, o in objs.items() if inspect.isclass(o) or inspect.isfunction(o)}
    checked = 0
    for line in block.splitlines():
        m = re.match(r"  (\w+\.py)\s+(.*)", line)
        if not m:
            continue
        source = (ROOT / "hypergrad" / m.group(1)).read_text()
        words = set(re.findall(r"[A-Za-z_]\w*", m.group(2).replace("StnConv1d/2d", "StnConv1d StnConv2d")))
        for name in sorted(words & public):
            assert re.search(rf"^(?:class|def) {name}\b", source, re.M), (m.group(1), name)
            checked += 1
    assert checked >= 20, checked


def test_hypergrad_subcommands_the_readmes_use_exist() -> None:
    """Every ``hypergrad SUBCOMMAND`` the READMEs show (in code spans, bash lines or after
    ``python -m``) is one the CLI defines, and the four it defines are all shown."""
    text = README.read_text() + EXP_README.read_text()
    used = set(re.findall(r"(?:`|^|python -m )hypergrad (\w+)", text, re.M))
    known = set(re.findall(r'add_parser\(\s*"(\w+)"', (ROOT / "hypergrad" / "cli.py").read_text()))
    assert used == known == {"list", "run", "show", "report"}, (used, known)


# ------------------------------------------------- prose numbers quoted from the committed runs


def test_readme_selftuning_numbers_are_the_committed_reports() -> None:
    """README.md's self-tuning paragraphs: the mnist1d means (STN vs best fixed dropout, retrained
    vs final), seed 1's validation losses, and the Delta-STN run's numbers are those of
    experiments/reports/stn_mnist1d{,_delta}/results.json, rounded as printed."""
    text = _text(README)
    m, d = _metrics("stn_mnist1d"), _metrics("stn_mnist1d_delta")

    def pair(r: dict[str, Any], a: str, b: str, f: str = ".3f") -> str:
        return f"{r[a + '.val_loss']:{f}} / {r[a + '.test_loss']:{f}} against {r[b + '.val_loss']:{f}} / " + (
            f"{r[b + '.test_loss']:{f}}"
        )

    # "reached validation / test loss 0.883 / 0.877 (mean) against 1.185 / 1.162"
    assert (
        f"{m['stn.val_loss']:.3f} / {m['stn.test_loss']:.3f} (mean) against "
        f"{m['best_fixed.val_loss']:.3f} / {m['best_fixed.test_loss']:.3f}" in text
    )
    assert pair(m, "retrain", "final_fixed") in text
    seed1 = m["seed1.retrain.val_loss"], m["seed1.final_fixed.val_loss"]
    assert f"(seed 1: {seed1[0]:.4f} against {seed1[1]:.4f})" in text
    won_val = int(m["retrain_minus_final.val_loss.seeds_won"])
    won_test = int(m["retrain_minus_final.test_loss.seeds_won"])
    assert f"on {won_test} of 3 seeds in test loss, {won_val} of 3 in validation loss" in text
    assert pair(d, "stn", "best_fixed") in text
    assert f"({pair(d, 'retrain', 'final_fixed')})" in text
    assert f"the plain STN's {m['seed0.stn.val_loss']:.3f} / {m['seed0.stn.test_loss']:.3f}" in text


def test_readme_marginal_likelihood_numbers_are_the_committed_reports() -> None:
    """README.md's marginal-likelihood paragraph: the mean test accuracies (online, and with the
    validation images trained on), that the bound at M >= 100 picks the exact evidence's
    precision, and the learned translation range and accuracies of marglik_invariance."""
    text = _text(README)
    p, inv = _metrics("marglik_precision"), _metrics("marglik_invariance")
    assert p["best.M=100"] == p["best.M=250"] == p["best.exact"] != p["best.M=50"]
    online, grid = p["mean.ml.global.M=100.test_acc"], p["mean.chosen_on_val.test_acc"]
    assert f"reached {online:.2%} test accuracy, equal on every seed" in text and online == grid
    assert f"({p['mean.ml.global.M=100.trainval.test_acc']:.2%} when the online run" in text
    assert (
        f"grew it from 0.2 to {inv['range.x']:.1f} px horizontally ({inv['range.y']:.1f} vertically) "
        f"and lifted test accuracy from {inv['plain.test_acc']:.1%} to {inv['augmented.test_acc']:.1%}"
    ) in text


def test_experiments_readme_notes_numbers_are_the_committed_reports() -> None:
    """A sample of "Notes on the results": identity's error, overfit_val's fitted validation set,
    the schedule's wins on stn_mnist1d, the learned precisions per seed."""
    text = _text(EXP_README)
    acc = json.loads((REPORTS / "accuracy" / "results.json").read_text())["table"]
    identity = next(r for r in acc if r["problem"] == "ridge" and r["method"] == "identity")
    assert f"identity's error ({identity['rel error']:.2f})" in text
    ov = _metrics("overfit_val")
    assert f"({ov['val_acc']:.0%}, loss {ov['val_loss']:.3f})" in text
    assert f"({ov['test_acc']:.1%} vs {ov['baseline.test_acc']:.1%} without decay)" in text
    m = _metrics("stn_mnist1d")
    assert (
        f"the schedule wins by {-m['retrain_minus_final.val_loss']:.3f} / "
        f"{-m['retrain_minus_final.test_loss']:.3f} val / test loss on the mean" in text
    )
    assert (
        f"(at the mean values only: {-m['retrain_mean_minus_final_mean.val_loss']:.3f} / "
        f"{-m['retrain_mean_minus_final_mean.test_loss']:.3f}" in text
    )
    rows = json.loads((REPORTS / "marglik_precision" / "results.json").read_text())["table"]
    learned = [
        float(r["precision"])
        for r in rows
        if r["method"] == "marginal likelihood, global, M=100 (training images only)"
    ]
    assert len(learned) == 3
    assert "learned global precisions " + " / ".join(f"{v:.2f}" for v in learned) in text


def test_experiments_readme_names_the_slowest_runs() -> None:
    """The notes name the two slowest committed runs and their times (``lstm_lm`` was called
    the slowest; ``marglik_precision``, 372 s, is)."""
    times = {f.parent.name: json.loads(f.read_text())["wall_seconds"] for f in REPORTS.glob("*/results.json")}
    (a, ta), (b, tb) = sorted(times.items(), key=lambda kv: -kv[1])[:2]
    assert f"(the slowest, `{a}` and `{b}`, took {ta:.0f} s and {tb:.0f} s here)" in _text(EXP_README)


# ------------------------------------------------------------- files, scripts and their outputs


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_committed_report_plots_exist_and_are_not_ignored() -> None:
    """experiments/README.md: the committed runs come "with their plots": every plot a report's
    results.json lists is in its folder and not git-ignored, while PNGs of other runs are."""

    def ignored(rel: str) -> bool:
        out = subprocess.run(["git", "check-ignore", "-q", rel], cwd=ROOT, check=False)
        assert out.returncode in (0, 1), out
        return out.returncode == 0

    assert "committed with their plots, `experiments/reports/NAME/*.png`" in _text(EXP_README)
    n = 0
    for f in sorted(REPORTS.glob("*/results.json")):
        for plot in json.loads(f.read_text())["plots"]:
            rel = f"experiments/reports/{f.parent.name}/{plot}"
            assert (ROOT / rel).is_file() and not ignored(rel), rel
            n += 1
    assert n >= len(list(REPORTS.glob("*/results.json")))
    for rel in ("results/overfit_val/overfit_val.png", "experiments/results/x/x.png", "x.png"):
        assert ignored(rel), rel


def test_experiments_readme_lists_every_script() -> None:
    """The "Other scripts" table names every script in experiments/ (ddp_digits.py and
    reproduce.py were missing)."""
    table = EXP_README.read_text().split("## Other scripts", 1)[1]
    listed = set(re.findall(r"`(\w+\.py)`", table))
    scripts = {p.name for p in (ROOT / "experiments").glob("*.py")}
    assert scripts <= listed, scripts - listed


def test_wrapper_scripts_default_out_is_results_and_their_name() -> None:
    """The table: the wrappers' ``--out`` defaults to ``results/`` and the script's name (so
    ``marglik_prior_precision.py`` writes results/marglik_prior_precision/, not the experiment's
    name)."""
    assert "default `results/` and the script's name, e.g. `results/marglik_prior_precision/`" in _text(
        EXP_README
    )
    for stem in ("stn_ridge", "stn_mnist1d", "marglik_prior_precision", "marglik_invariance"):
        src = (ROOT / "experiments" / f"{stem}.py").read_text()
        assert f'Path("results") / "{stem}"' in src or f'f"results/{stem}' in src, stem


def test_readme_torch_spec_is_the_makefiles() -> None:
    """README.md states the Makefile's TORCH_SPEC default, and (the Makefile naming no package
    index) does not call it the CPU build; the CPU-only recipe it gives uses ``TORCH_SPEC=``."""
    make = (ROOT / "Makefile").read_text()
    spec = re.search(r"^TORCH_SPEC \?= (\S+)$", make, re.M)
    assert spec is not None
    text = _text(README)
    assert f"`TORCH_SPEC={spec.group(1)}` by default" in text
    if "index-url" not in make:
        assert "by default, the CPU build" not in text
        assert "PyPI's CUDA build" in text
    recipe = re.search(r"`python3 -m venv \.venv && (.*?)`", text)
    assert recipe is not None and "--index-url https://download.pytorch.org/whl/cpu" in recipe.group(1)
    assert f"pip install {spec.group(1)} " in recipe.group(1) and "make TORCH_SPEC= " in recipe.group(1)


# ------------------------------------------------------------ API behaviour the prose promises


def test_readme_summary_gives_a_plain_value_for_one_entry() -> None:
    """README.md: ``hg.hparams.summary(hp)`` gives ``name.mean/min/max/std`` for a tensor and
    ``{name: value}`` for a hyperparameter of one entry."""
    assert "(`{name: value}` for a hyperparameter of one entry)" in _text(README)
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    hp = nn.ModuleDict(
        {"wd": hg.hparams.WeightDecay(model, per="layer", init=0.01), "scale": hg.hparams.Hparam(2.0)}
    )
    s = hg.hparams.summary(hp)
    assert set(s) == {"wd.mean", "wd.min", "wd.max", "wd.std", "scale"}
    assert s["scale"] == pytest.approx(2.0) and s["wd.max"] == pytest.approx(0.01)


def _implicit_two_groups(lrs: tuple[float, ...], alpha: Any) -> tuple[Any, Any]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    groups = [{"params": m[0].parameters(), "lr": lrs[0]}, {"params": m[2].parameters(), "lr": lrs[-1]}]
    hp = hg.hparams.WeightDecay(m, init=1e-2)

    def tl(m_: nn.Module, h: Any, b: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m_(b[0]), b[1]) + h.penalty(m_)

    hopt = hg.Implicit(
        m,
        hp,
        tl,
        tl,
        inner_optimizer=torch.optim.SGD(groups),
        outer_optimizer=torch.optim.Adam(hp.parameters()),
        solver=hg.Neumann(3, alpha=alpha),
    )
    b = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    hopt.step(b)
    return hopt, b


def test_readme_neumann_lr_rule_warns_with_several_learning_rates() -> None:
    """README: ``alpha="lr"`` warns "with Adam or several learning rates": plain SGD with two
    param groups at different rates warns (once), the same rate in both does not."""
    hopt, b = _implicit_two_groups((0.1, 0.05), "lr")
    with pytest.warns(UserWarning, match="several learning rates"):
        hopt.hyper_step(train_batch=b, val_batch=b)
    hopt.step(b)
    hopt.hyper_step(train_batch=b, val_batch=b)  # warned once (filterwarnings=error)
    same, b = _implicit_two_groups((0.1, 0.1), "lr")
    info = same.hyper_step(train_batch=b, val_batch=b)
    assert info.solver_iterations == 3  # alpha = lr: no power iteration


def _extras() -> dict[str, set[str]]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {
        name: {re.split(r"[<>=!~\[; ]", line.strip())[0].lower() for line in spec.strip().splitlines()}
        for name, spec in cfg["options.extras_require"].items()
    }


#: the third-party modules the experiments import, by distribution name (wandb is optional: --wandb)
_DISTS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "mnist1d": "mnist1d", "optuna": "optuna"}


def test_readme_install_lines_cover_what_the_experiments_import() -> None:
    """The extras the READMEs tell you to install for the experiments (``pip install -e
    ".[demo,experiments]"``) hold every third-party module the experiments import, and the
    sweeps' ``pip install -e ".[wandb,experiments]"`` holds wandb and what overfit_val imports
    (it was ``.[wandb]`` alone: no scikit-learn, no matplotlib, so the agent's first run failed)."""
    extras = _extras()
    imported: dict[str, set[str]] = {}
    for f in (ROOT / "hypergrad" / "experiments").glob("*.py"):
        mods = set(re.findall(r"^\s*(?:from|import) (\w+)", f.read_text(), re.M)) & set(_DISTS)
        imported[f.stem] = {_DISTS[m] for m in mods}
    assert {"scikit-learn", "matplotlib", "mnist1d", "optuna"} <= set().union(*imported.values())

    def installed(line: str) -> set[str]:
        return set().union(*(extras[e] for e in line.split(",")))

    for text in (_text(README), _text(EXP_README)):
        (line,) = set(re.findall(r'pip install -e "\.\[((?:demo|experiments)[\w,]*)\]"', text))
        assert set().union(*imported.values()) <= installed(line), line
    (sweep,) = re.findall(r'^pip install -e "\.\[([\w,]+)\]"', EXP_README.read_text(), re.M)
    overfit_val = imported["overfit_val"] | imported["common"]
    assert {"wandb"} | overfit_val <= installed(sweep), sweep
