"""Scaling sweeps and fits: the sweep against a fake trainer; the Chinchilla fit recovered from noisy
synthetic losses; IsoFLOP; CLI."""

import csv
import json
import shlex
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from megallama import cli
from tools import sweep
from tools.scaling import CHINCHILLA, ScalingLaw, SweepResults, bootstrap, fit_isoflop, fit_parametric

TRUE = ScalingLaw(**CHINCHILLA)


def synthetic(seed: int, sigma: float = 0.002) -> SweepResults:
    """A 10 x 10 grid of model sizes x token counts, losses with multiplicative noise."""
    n, d = np.meshgrid(np.logspace(7, 10, 10), np.logspace(8, 12, 10))
    n, d = n.ravel(), d.ravel()
    loss = TRUE.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0, sigma, n.size))
    return SweepResults(n, d, 6 * n * d, loss)


def megallama(*args):
    return subprocess.run([sys.executable, "-m", "megallama", *args], capture_output=True, text=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_chinchilla_within_5_percent(seed):
    fit = fit_parametric(synthetic(seed))
    for key, value in CHINCHILLA.items():
        assert getattr(fit, key) == pytest.approx(value, rel=0.05), key


def test_warnings_flag_an_unconstrained_fit():
    from tools.scaling import fit_warnings

    assert fit_warnings(TRUE) == []
    bad = fit_warnings(ScalingLaw(E=1e-20, A=1e7, B=20, alpha=1.4, beta=0.02))
    assert len(bad) == 2 and bad[0].startswith("E = 1e-20") and bad[1].startswith("beta = 0.02")


def test_bootstrap_intervals_cover_the_truth():
    res = synthetic(3)
    ci = bootstrap(res, fit_parametric(res), samples=12, seed=0)
    for key in ("E", "alpha", "beta"):
        lo, hi = ci[key]
        assert lo < hi
        assert lo * 0.97 <= CHINCHILLA[key] <= hi * 1.03, key


def test_compute_optimal_matches_brute_force():
    """N*(C) from the closed form equals the minimum of L along 6ND = C found numerically."""
    for c in (1e20, 5.76e23):
        n_grid = np.logspace(6, 13, 200001)
        brute = n_grid[np.argmin(TRUE.loss(n_grid, c / 6 / n_grid))]
        n_star, d_star = TRUE.optimal(c)
        assert n_star == pytest.approx(brute, rel=1e-3)
        assert 6 * n_star * d_star == pytest.approx(c)


def test_isoflop_exponent():
    rows = [(n, c / 6 / n, c) for c in np.logspace(18, 21, 4) for n in np.logspace(7.5, 10, 9)]
    n, d, c = (np.array(x) for x in zip(*rows))
    iso = fit_isoflop(SweepResults(n, d, c, TRUE.loss(n, d)))
    assert len(iso.minima) == 4
    assert iso.n_exponent == pytest.approx(0.28 / (0.34 + 0.28), rel=0.05)
    assert iso.n_exponent + iso.d_exponent == pytest.approx(1)


def test_learning_rate_grid_fits_the_best_learning_rate(tmp_path):
    """A sweep with lr: [...] writes one row per learning rate at each (N, D); the law is the best one's."""
    from tools.scaling import read_results

    res = synthetic(0)
    worse = SweepResults(res.n, res.d, res.c, res.loss * 1.08)  # a too-high learning rate, 8% worse
    path = tmp_path / "results.csv"
    both = SweepResults(*(np.concatenate([getattr(worse, k), getattr(res, k)]) for k in ("n", "d", "c", "loss")))
    write_csv(path, both)
    read = read_results(str(path))
    assert len(read.n) == len(res.n)
    np.testing.assert_allclose(np.sort(read.loss), np.sort(res.loss))
    fit = fit_parametric(read)
    for key, value in CHINCHILLA.items():
        assert getattr(fit, key) == pytest.approx(value, rel=0.05), key
    # a learning rate that diverged (NaN) at some points is one of the grid's runs, not a bad file
    worse.loss[:7] = float("nan")
    write_csv(path, SweepResults(*(np.concatenate([getattr(worse, k), getattr(res, k)]) for k in ("n", "d", "c", "loss"))))
    np.testing.assert_allclose(np.sort(read_results(str(path)).loss), np.sort(res.loss))


def test_cli_svg_plot(tmp_path):
    import xml.etree.ElementTree as ET

    path = tmp_path / "results.csv"
    res = synthetic(0)
    write_csv(path, res)
    r = megallama("scaling-fit", str(path), "--bootstrap", "0", "--plot", str(tmp_path / "fit.svg"))
    assert r.returncode == 0, r.stderr
    root = ET.parse(tmp_path / "fit.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    assert len([c for c in root.iter(ns + "circle") if c.get("class") == "run"]) == len(res.n)
    (frontier,) = [p for p in root.iter(ns + "polyline") if p.get("class") == "frontier"]
    assert len(frontier.get("points").split()) == 100
    assert not list(tmp_path.glob("*.tmp*"))


def write_csv(path, res: SweepResults, drop=()):
    cols = [c for c in ("name", "params", "tokens", "flops", "final_train_loss", "final_valid_loss") if c not in drop]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for i in range(len(res.n)):
            row = dict(name=f"r{i}", params=int(res.n[i]), tokens=int(res.d[i]), flops=res.c[i],
                       final_train_loss=res.loss[i], final_valid_loss=res.loss[i])
            w.writerow({k: row[k] for k in cols})


def test_cli_json(tmp_path):
    path = tmp_path / "results.csv"
    write_csv(path, synthetic(0))
    r = megallama("scaling-fit", str(path), "--json", "--bootstrap", "3", "--budget", "5.76e23")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["runs"] == 100 and out["warnings"] == []
    assert out["law"]["alpha"] == pytest.approx(0.34, rel=0.05)
    assert set(out["intervals"]) >= {"E", "A", "B", "alpha", "beta"}
    (opt,) = out["optimal"]
    assert opt["params"] == pytest.approx(TRUE.optimal(5.76e23)[0], rel=0.25)


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("no_valid", "lacks column(s) final_valid_loss"),
    ("few", "at least 5"),
    ("nan", "must be positive and finite"),
    ("plot", "pip install matplotlib"),
    ("not_utf8", "is not a readable CSV file"),
    ("plot_folder", "does not exist; give a file path"),
    ("blank", "must be positive and finite and no other run"),  # the trainer's null loss, blank in results.csv
    ("repeated", "6 runs at 1 distinct (params, tokens) points"),
    ("flat", "no compute-optimal allocation"),
    ("rising", "no compute-optimal allocation"),
])
def test_cli_errors_exit_2(tmp_path, case, needle):
    path = tmp_path / "results.csv"
    res = synthetic(0)
    extra = []
    if case == "no_valid":
        write_csv(path, res, drop=("final_valid_loss",))
    elif case == "few":
        write_csv(path, SweepResults(res.n[:3], res.d[:3], res.c[:3], res.loss[:3]))
    elif case == "nan":
        res.loss[4] = float("nan")
        write_csv(path, res)
    elif case == "plot":
        try:
            import matplotlib  # noqa: F401
            pytest.skip("matplotlib is installed")
        except ImportError:
            pass
        write_csv(path, res)
        extra = ["--plot", str(tmp_path / "p.png")]  # .svg would work without matplotlib
    elif case == "repeated":  # one point six times is not five points
        write_csv(path, SweepResults(*(np.repeat(getattr(res, k)[:1], 6) for k in ("n", "d", "c", "loss"))))
    elif case in ("flat", "rising"):  # losses that do not fall with N: alpha comes out 0 or negative
        loss = np.full_like(res.n, 3.0) if case == "flat" else 2 + 0.01 * np.log(res.n)
        write_csv(path, SweepResults(res.n, res.d, res.c, loss))
        extra = ["--bootstrap", "0", "--json", "--plot", str(tmp_path / "fit.svg")]
    elif case == "not_utf8":
        path.write_bytes(b"\x00\xff\xfe not a csv\n")
    elif case == "blank":
        res.loss[4] = float("nan")
        write_csv(path, res)
        path.write_text(path.read_text().replace(",nan,nan", ",,"))
    elif case == "plot_folder":
        write_csv(path, res)
        extra = ["--bootstrap", "0", "--plot", str(tmp_path / "missing" / "fit.svg")]
    r = megallama("scaling-fit", str(path), *extra)
    assert r.returncode == 2, r.stdout
    assert needle in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "fit.svg").exists()


# ----------------------------------------------------------------------------- sweep

FAKE_TRAINER = textwrap.dedent('''
    import json, os, sys, yaml
    assert sys.argv[1:3] == ["train", "--config"], sys.argv
    cfg = yaml.safe_load(open(sys.argv[3]))
    run_dir = cfg["train"]["run_dir"]
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        sys.exit("run_dir already holds a run")
    os.makedirs(run_dir, exist_ok=True)
    open(os.path.join(run_dir, "config.yaml"), "w").write("partial")
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(os.path.basename(run_dir) + "\\n")
    if os.environ.get("FAKE_FAIL") == os.path.basename(run_dir):
        sys.exit(3)
    from megallama.config import config_from_dict, preset_config, _deep_update
    c = config_from_dict(_deep_update(preset_config(cfg.pop("preset")).to_dict(), cfg))
    n, d = c.model.num_parameters(), c.train.tokens
    loss = 1.69 + 406.4 / n ** 0.34 + 410.7 / d ** 0.28 + c.optim.lr
    json.dump(dict(params=n, tokens=d, flops=c.model.flops_per_token(c.train.seq_len) * d,
                   steps=c.train.steps, final_train_loss=loss, final_valid_loss=loss + 0.01),
              open(os.path.join(run_dir, "summary.json"), "w"))
''')

GRID = dict(
    base=dict(preset="tiny", train=dict(seq_len=32, global_batch_size=8, micro_batch_size=8)),
    models={"a": dict(dim=32, n_heads=2, n_layers=1), "b": dict(dim=64, n_heads=4, n_layers=2)},
    tokens=[2560, 5120],
    lr=[1.0e-3, 2.0e-3],
)


@pytest.fixture
def env(tmp_path, monkeypatch):
    fake = tmp_path / "fake_trainer.py"
    fake.write_text(FAKE_TRAINER)
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    log = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setitem(cli.SUBCOMMANDS, "sweep", ("megallama.commands.sweep", "scaling sweep"))
    launcher = f"{shlex.quote(sys.executable)} {shlex.quote(str(fake))}"

    def go(*extra, grid_path=grid):
        return cli.main(["sweep", "--grid", str(grid_path), "--output", str(tmp_path / "out"),
                         "--launcher", launcher, *extra])

    def calls():
        return log.read_text().split() if log.exists() else []

    return tmp_path, go, calls


def sweep_results(tmp_path):
    with open(tmp_path / "out" / "results.csv") as f:
        return list(csv.DictReader(f))


def test_sweep_runs_every_point_and_gathers_results(env):
    tmp_path, go, calls = env
    assert go() == 0
    rows = sweep_results(tmp_path)
    assert len(rows) == 8 == len(calls())
    assert list(rows[0]) == sweep.RESULT_COLUMNS
    by_name = {r["name"]: r for r in rows}
    r = by_name["a_t2.56e+03_lr0.001".replace("+", "")]
    assert (r["model"], float(r["lr"]), int(r["tokens"]), int(r["steps"])) == ("a", 0.001, 2560, 10)
    cfg = yaml.safe_load((tmp_path / "out" / "sweep" / f"{r['name']}.yaml").read_text())
    assert cfg["train"]["run_dir"] == str(tmp_path / "out" / "runs" / r["name"])
    assert cfg["model"]["dim"] == 32 and cfg["optim"]["lr"] == 0.001 and cfg["preset"] == "tiny"
    assert cfg["train"]["eval_interval"] == 10  # validation at the last step
    assert float(r["final_valid_loss"]) == pytest.approx(float(r["final_train_loss"]) + 0.01)


def test_resume_skips_finished_runs(env):
    tmp_path, go, calls = env
    assert go() == 0
    assert go() == 0
    assert len(calls()) == 8  # nothing re-run
    victim = sweep_results(tmp_path)[3]["name"]
    (tmp_path / "out" / "runs" / victim / "summary.json").unlink()
    assert go() == 0
    assert calls()[8:] == [victim]


def test_failed_run_is_reported_and_retried(env, monkeypatch, capsys):
    tmp_path, go, calls = env
    runs = sweep.load_grid(tmp_path / "grid.yaml")
    monkeypatch.setenv("FAKE_FAIL", runs[2].name)
    assert go() == 1
    assert len(sweep_results(tmp_path)) == 7
    assert f"failed: {runs[2].name}" in capsys.readouterr().out
    monkeypatch.delenv("FAKE_FAIL")
    assert go() == 0
    assert len(sweep_results(tmp_path)) == 8 and calls()[8:] == [runs[2].name]
    assert (tmp_path / "out" / "runs" / f"{runs[2].name}.attempt-1" / "config.yaml").is_file()  # kept


def test_shards_partition_the_grid(env):
    tmp_path, go, calls = env
    assert go("--shard", "0/3") == 0
    first = calls()
    assert go("--shard", "1/3") == 0 and go("--shard", "2/3") == 0
    assert len(first) == 3 and sorted(calls()) == sorted(r.name for r in sweep.load_grid(tmp_path / "grid.yaml"))


# a trainer that, like megallama train, checkpoints on SIGUSR1 and exits 75, and resumes from its checkpoint
FAKE_PREEMPTIBLE = textwrap.dedent("""
    import json, os, signal, sys, time, yaml
    run_dir = yaml.safe_load(open(sys.argv[3]))["train"]["run_dir"]
    name, ckpt = os.path.basename(run_dir), os.path.join(run_dir, "checkpoints", "latest")
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(f"{name}:{'resumed' if os.path.isfile(ckpt) else 'fresh'}\\n")
    if not os.path.isfile(ckpt) and name == os.environ["FAKE_WAIT"]:
        os.makedirs(os.path.dirname(ckpt))
        open(os.environ["FAKE_READY"], "w").close()
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        open(ckpt, "w").write("step_00000001")
        sys.exit(75 if got else 1)
    os.makedirs(run_dir, exist_ok=True)
    json.dump(dict(params=1, tokens=2, flops=3.0, steps=4, final_train_loss=5.0, final_valid_loss=6.0),
              open(os.path.join(run_dir, "summary.json"), "w"))
""")


def test_preempted_sweep_passes_the_signal_on_stops_with_75_and_resumes_the_run(tmp_path):
    """SIGUSR1 to `megallama sweep` (what slurm/sweep_array.sbatch forwards before a time limit)
    reaches the running trainer, which checkpoints and exits 75; the sweep starts no further run
    and exits 75.  The same command then resumes that run from its checkpoint (not moved aside as
    a failed attempt) and runs the rest."""
    import signal
    import time

    fake, grid, ready, log = (tmp_path / n for n in ("fake.py", "grid.yaml", "ready", "calls.log"))
    fake.write_text(FAKE_PREEMPTIBLE)
    grid.write_text(yaml.safe_dump(GRID))
    names = [r.name for r in sweep.load_grid(grid)]
    env = dict(__import__("os").environ, FAKE_LOG=str(log), FAKE_READY=str(ready), FAKE_WAIT=names[1])
    cmd = [sys.executable, "-m", "megallama", "sweep", "--grid", str(grid), "--output", str(tmp_path / "out"),
           "--launcher", f"{shlex.quote(sys.executable)} {shlex.quote(str(fake))}"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and p.poll() is None, p.communicate()[0]
            time.sleep(0.02)
        p.send_signal(signal.SIGUSR1)
        out = p.communicate(timeout=60)[0]
    finally:
        p.kill()
    assert p.returncode == 75, out
    assert log.read_text().split() == [f"{names[0]}:fresh", f"{names[1]}:fresh"], out
    assert "run the same command to resume" in out
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert log.read_text().split()[2:] == [f"{names[1]}:resumed"] + [f"{n}:fresh" for n in names[2:]]
    assert not list((tmp_path / "out" / "runs").glob("*.attempt-*"))
    assert len(sweep_results(tmp_path)) == len(names)


def test_flops_budgets_set_tokens_from_flops_per_token(tmp_path):
    grid = dict(GRID, flops=[1e9])
    del grid["tokens"], grid["lr"]
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    from megallama.config import preset_config

    for run in sweep.load_grid(path):
        m = preset_config("tiny").model
        for k, v in GRID["models"][run.model].items():
            setattr(m, k, v)
        tokens = run.config["train"]["tokens"]
        assert tokens == pytest.approx(1e9 / m.flops_per_token(32), abs=8 * 32 / 2)


def test_warmup_fraction_sets_each_runs_warmup(tmp_path):
    """Each run warms up for its share of its own steps (10 and 20 here), not the base's 2."""
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(dict(GRID, warmup_fraction="3e-1")))
    got = {(r.config["train"]["steps"], r.config["optim"]["warmup_steps"]) for r in sweep.load_grid(path)}
    assert got == {(10, 3), (20, 6)}
    path.write_text(yaml.safe_dump(GRID))  # without it: the configured warmup, left to the preset
    assert all("warmup_steps" not in r.config.get("optim", {}) for r in sweep.load_grid(path))


def test_default_grid_is_valid():
    runs = sweep.load_grid(sweep.DEFAULT_GRID)
    assert len(runs) == 12
    assert min(r.config["train"]["steps"] for r in runs) >= 5


@pytest.mark.parametrize("grid,needle", [
    (None, "does not exist"),
    (dict(GRID, flops=[1e9]), "exactly one of 'flops:'"),
    (dict(GRID, lr=[]), "'lr' must be a non-empty list"),
    (dict(GRID, models={"x": dict(dim=30, n_heads=4)}), "model 'x': model.dim (30) must be divisible"),
    (dict(GRID, epochs=3), "unknown key(s) epochs"),
    (dict(GRID, models={"a/b": dict(dim=32)}), "model name 'a/b' names a directory"),
    (dict(GRID, tokens=[float("inf")]), "'tokens' must be a non-empty list of positive numbers"),
    (dict(GRID, tokens=[2560, 2561]), "two points share the run name a_t2.56e03_lr0.001"),
    (dict(GRID, lr=[1.0e-3, 1.0e-3]), "two points share the run name a_t2.56e03_lr0.001"),
    (dict(GRID, base=dict(GRID["base"], optim=dict(warmup_steps=10))),
     "run a_t2.56e03_lr0.001 trains 10 steps, not more than its 10 warmup steps"),
    (dict(GRID, warmup_fraction=1.5), "'warmup_fraction' must be a number in [0, 1)"),
    (dict(GRID, warmup_fraction="most"), "'warmup_fraction' must be a number in [0, 1)"),
])
def test_bad_grid_exit_2(env, capsys, grid, needle):
    tmp_path, go, _ = env
    path = tmp_path / "bad.yaml"
    if grid is not None:
        path.write_text(yaml.safe_dump(grid))
    assert go(grid_path=path) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_bad_shard_exit_2(env, capsys):
    _, go, _ = env
    assert go("--shard", "3/3") == 2
    assert "--shard '3/3'" in capsys.readouterr().err
