"""A bad config stops before any job runs, in one sentence naming the field and the allowed values."""

import copy
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from conftest import ROOT, snakemake, tiny_config, write_config
from echochamber import config as ec_config
from echochamber import grid
from echochamber import pretrain as ec_pretrain
from echochamber.rl import settings as rl_settings

GOOD = yaml.safe_load((ROOT / "config.yaml").read_text())
# The shipped configs as users pass them: the mini-paper and the seed sweep are overlays on config.yaml.
SHIPPED = [(ROOT / "config.yaml",), (ROOT / "configs" / "paper.yaml",), (ROOT / "configs" / "mini_paper.yaml",),
           (ROOT / "config.yaml", ROOT / "configs" / "mini_paper.yaml"), (ROOT / "configs" / "seeds.yaml",)]


def mutate(fn):
    cfg = copy.deepcopy(GOOD)
    fn(cfg)
    return cfg


BAD = {
    "typo_top_level_key": (lambda c: c.update(resutls="x"), ["resutls", "allowed keys"]),
    "typo_pretrain_key": (lambda c: c["pretrain"].update(learning_rate=1.0), ["pretrain", "learning_rate", "allowed keys"]),
    "unknown_source_in_mixture": (lambda c: c["mixtures"].update(bad={"tg": 1, "omi3": 2}), ["mixtures.bad", "omi3", "data.sources"]),
    "negative_weight": (lambda c: c["mixtures"][next(iter(c["mixtures"]))].update(tg=-1), ["tg", "must be > 0"]),
    "unknown_algorithm": (lambda c: c["grid"]["algos"].update(dpo={"kl": [0.0]}), ["grid.algos", "dpo", "ppo"]),
    "unknown_scale": (lambda c: c["grid"].update(scales=["xxl"]), ["grid.scales", "xxl", "150M"]),
    "unknown_render": (lambda c: c["data"]["sources"]["tg"].update(render="python"), ["data.sources.tg.render", "tinygsm"]),
    "negative_kl": (lambda c: c["grid"]["algos"]["ppo"].update(kl=[-0.1]), ["grid.algos.ppo.kl", ">= 0"]),
    "heads_do_not_divide": (lambda c: c["scales"]["s"].update(n_heads=c["scales"]["s"]["d_model"] + 1), ["scales.s", "divisible"]),
    "wrong_type": (lambda c: c["pretrain"].update(lr="fast"), ["pretrain.lr", "number"]),
    "unknown_rl_prompt_source": (lambda c: c["rl"]["prompts"].update(source="gsm9k"), ["rl.prompts.source", "gsm9k", "data.sources"]),
    "unknown_benchmark_source": (lambda c: c["eval"]["benchmarks"]["test"].update(source="math"), ["eval.benchmarks.test.source", "math"]),
    "unknown_precision": (lambda c: c["pretrain"].update(precision="fp8"), ["pretrain.precision", "bf16"]),
    "per_scale_unknown_scale": (lambda c: c["pretrain"].update(per_scale={"xxl": {"gpus": 2}}), ["pretrain.per_scale", "xxl"]),
    "per_scale_unknown_key": (lambda c: c["pretrain"].update(per_scale={"s": {"betas": [0.9, 0.9]}}), ["pretrain.per_scale.s", "betas", "allowed keys"]),
}


def test_shipped_configs_are_valid():
    assert {p.name for paths in SHIPPED for p in paths} >= {p.name for p in (ROOT / "configs").glob("*.yaml")}
    for paths in SHIPPED:
        ec_config.load(*paths)


def test_configs_merge_as_snakemake_merges_them(tmp_path):
    over = write_config(tmp_path / "over.yaml", {"results": "elsewhere", "pretrain": {"threads": 1},
                                                 "grid": {"seeds": [3, 4]}})
    merged = ec_config.load(ROOT / "config.yaml", over)
    assert merged["results"] == "elsewhere" and merged["grid"]["seeds"] == [3, 4]      # lists are replaced
    assert merged["pretrain"]["threads"] == 1 and merged["pretrain"]["lr"] == GOOD["pretrain"]["lr"]  # dicts merge
    assert merged["grid"]["algos"] == GOOD["grid"]["algos"]
    # an overlay alone is not a config: the sentence names the missing key and how to give the overlay
    with pytest.raises(ec_config.ConfigError, match="over.yaml.*required.*overlay.*extends.*--configfile config.yaml"):
        ec_config.load(over)
    # a whole config missing a nested key gets no overlay advice
    broken = copy.deepcopy(GOOD)
    del broken["pretrain"]["lr"], broken["scales"]["s"]["d_model"]
    with pytest.raises(ec_config.ConfigError) as e:
        ec_config.validate(broken)
    assert "d_model" in str(e.value) and "overlay" not in str(e.value)


def test_an_overlay_that_names_its_base_is_a_config_on_its_own(tmp_path):
    """configs/mini_paper.yaml says `extends: ../config.yaml`: given alone, or after config.yaml, it is the same
    config to `echochamber validate`, findings and the workflow."""
    mini = ROOT / "configs" / "mini_paper.yaml"
    assert ec_config.bases([mini]) == [(ROOT / "config.yaml").resolve()]
    assert ec_config.bases([ROOT / "config.yaml", mini]) == []        # the base is given already
    assert ec_config.load(mini) == ec_config.load(ROOT / "config.yaml", mini)
    plans = []
    for files in ([str(mini)], [str(ROOT / "config.yaml"), str(mini)]):
        out = snakemake("-n", "--configfile", *files, "--config", f"results={tmp_path / 'r'}", cwd=tmp_path)
        plans.append(re.search(r"Job stats:.*?total\s+\d+", out.stdout + out.stderr, re.S).group(0))
    assert plans[0] == plans[1] and re.search(rf"\brl\s+{len(grid.rl_cells(ec_config.load(mini)))}\b", plans[0]), plans[0]
    # a chain of overlays, a missing base and a cycle
    (tmp_path / "sub").mkdir()
    write_config(tmp_path / "over.yaml", {"extends": str(ROOT / "config.yaml"), "results": "x"})
    top = write_config(tmp_path / "sub" / "top.yaml", {"extends": "../over.yaml", "grid": {"seeds": [7]}})
    cfg = ec_config.load(top)
    assert (cfg["results"], cfg["grid"]["seeds"], cfg["pretrain"]["lr"]) == ("x", [7], GOOD["pretrain"]["lr"])
    missing = write_config(tmp_path / "missing.yaml", {"extends": "nowhere.yaml"})
    with pytest.raises(ec_config.ConfigError, match="missing.yaml: extends: 'nowhere.yaml' does not exist"):
        ec_config.load(missing)
    write_config(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write_config(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ec_config.ConfigError, match="a cycle"):
        ec_config.load(tmp_path / "a.yaml")


def test_the_mini_paper_plans_the_cells_its_figures_need():
    cli = subprocess.run([sys.executable, "-m", "echochamber.cli", "validate", str(ROOT / "config.yaml"),
                          str(ROOT / "configs" / "mini_paper.yaml")], capture_output=True, text=True)
    assert cli.returncode == 0 and "15 pretrain cells, 33 RL cells" in cli.stdout, cli.stderr
    cfg = ec_config.load(*SHIPPED[2])
    cells = grid.rl_cells(cfg)
    assert {c.scale for c in cells} == {"s", "sm"} and {c.seed for c in cells} == {0, 1, 2}   # unchosen seeds
    main = ec_config.load(SHIPPED[0][0])["grid"]["mixtures"][0]     # the embedded study's mixture
    assert cfg["grid"]["mixtures"] == [main]
    default = [c for c in cells if c.mixture == main and c.scale == "s"]
    assert sorted({c.kl for c in default if c.algo == "ppo"}) == [0.0, 0.001, 0.01, 0.1, 0.3]
    assert {c.algo for c in default} == {"ppo", "grpo", "ei"}
    assert {(c.algo, c.kl) for c in cells if c.mixture != main or c.scale == "sm"} == {("ppo", 0.0)}
    # the repetition sweep: OMI1 at 2, 4 and 8 times its weight in the main mixture, the rest unchanged
    base = cfg["mixtures"][main]
    sweep = sorted({c.mixture for c in cells} - {main}, key=lambda m: cfg["mixtures"][m]["omi1"])
    assert [cfg["mixtures"][m]["omi1"] / base["omi1"] for m in sweep] == pytest.approx([2, 4, 8])
    assert all({k: v for k, v in cfg["mixtures"][m].items() if k != "omi1"} ==
               {k: v for k, v in base.items() if k != "omi1"} for m in sweep)


def test_the_seed_sweep_is_the_embedded_study_at_eight_seeds_under_ppo_at_kl_0():
    """configs/seeds.yaml: every seed 0-7, none left out, and nothing of the embedded study changed but the
    seeds, the algorithms and how many threads a pretraining job takes (a runtime setting)."""
    sweep, default = ec_config.load(*SHIPPED[4]), ec_config.load(*SHIPPED[0])
    assert sweep["grid"]["seeds"] == list(range(8))
    assert {(c.algo, c.kl) for c in grid.rl_cells(sweep)} == {("ppo", 0.0)}
    assert len(grid.rl_cells(sweep)) == len(grid.pretrain_cells(sweep)) == 8
    for z in default["grid"]["scales"]:
        assert ec_pretrain.settings(sweep, z, 0) == ec_pretrain.settings(default, z, 0)   # the same models
    assert rl_settings.cell_spec(sweep, grid.rl_cells(sweep)[0]) == rl_settings.cell_spec(
        default, next(c for c in grid.rl_cells(default) if c.algo == "ppo" and c.kl == 0 and c.seed == 0))


def test_larger_scales_pretrain_first(tmp_path):
    """Pretraining jobs carry a Snakemake priority that grows with the scale's size, above RL and evaluation,
    so a grid's longest runs start first (the mini-paper's sm runs had started last, ending it on one core)."""
    cfg = ec_config.load(*SHIPPED[2])
    priority = {z: grid.pretrain_priority(cfg, z) for z in cfg["scales"]}
    assert sorted(priority.values()) == list(range(1, len(priority) + 1))
    size = [grid.block_params(cfg["scales"][z]) for z in sorted(priority, key=priority.get)]
    assert size == sorted(size)                                         # a larger scale, a higher priority
    plan = snakemake("-n", "--configfile", str(ROOT / "configs" / "mini_paper.yaml"),
                     "--config", f"results={tmp_path / 'r'}", cwd=tmp_path).stdout
    jobs = [block for block in plan.split("\n\n") if "rule pretrain:" in block]
    found = {(re.search(r"scale=(\w+)", b).group(1), int(re.search(r"priority: (\d+)", b).group(1))) for b in jobs}
    assert len(jobs) == len(grid.pretrain_cells(cfg)) == 15
    assert found == {("s", grid.pretrain_priority(cfg, "s")), ("sm", grid.pretrain_priority(cfg, "sm"))}
    assert grid.pretrain_priority(cfg, "sm") > grid.pretrain_priority(cfg, "s") > 0
    later = [b for b in plan.split("\n\n") if re.search(r"rule (rl|eval_\w+):", b)]
    evals = 2 * len(grid.pretrain_cells(cfg)) + 2 * len(grid.rl_cells(cfg))     # test and hard, base and RL
    assert len(later) == len(grid.rl_cells(cfg)) + evals and not any("priority:" in b for b in later)  # priority 0


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: [unclosed\n")
    with pytest.raises(ec_config.ConfigError, match="bad.yaml: YAML syntax error at line 2, column 1"):
        ec_config.load(bad)
    with pytest.raises(ec_config.ConfigError, match="does not exist"):
        ec_config.load(tmp_path / "nope.yaml")


def test_grid_expansion_and_exclusion():
    cfg = mutate(lambda c: c["grid"].update(
        mixtures=[next(iter(c["mixtures"]))], scales=["xs", "s"], seeds=[0, 1],
        algos={"ppo": {"kl": [0.0, 0.01]}, "grpo": {"kl": [0.001]}},
        exclude=[{"scale": "xs", "algo": "grpo"}, {"kl": 0.01, "seed": 1}]))
    cells = grid.rl_cells(cfg)
    # ppo: 2 scales x 2 kl x 2 seeds - (kl 0.01, seed 1) x 2 scales = 6; grpo: s only x 2 seeds = 2
    assert len(cells) == 8
    assert not any(c.scale == "xs" and c.algo == "grpo" for c in cells)
    assert {c.kl for c in cells if c.seed == 1 and c.algo == "ppo"} == {0.0}
    assert cells[0].id.count("=") == 5 and "kl=0/" in cells[0].id
    assert grid.kl_str(0.001) == "0.001" and grid.kl_str(0) == "0"
    assert len(grid.pretrain_cells(cfg)) == 4


def test_grid_also_adds_products_that_take_the_keys_they_leave_out_from_the_main_one():
    """The mini-paper's shape: a main study, a sweep of mixtures at one algorithm, a second scale."""
    mix = next(iter(GOOD["mixtures"]))
    cfg = mutate(lambda c: (c["mixtures"].update(rep2={**c["mixtures"][mix], "omi1": 2}, tg_only={"tg": 1}),
                            c["grid"].update(mixtures=[mix], scales=["s"], seeds=[0, 1],
                                             algos={"ppo": {"kl": [0.0, 0.01]}, "grpo": {"kl": [0.0]}},
                                             also=[{"mixtures": ["rep2", "tg_only"], "algos": {"ppo": {"kl": [0.0]}}},
                                                   {"scales": ["xs"], "seeds": [0], "algos": {}},
                                                   {"algos": {"ppo": {"kl": [0.0]}}}],   # all in the main: no new cell
                                             exclude=[{"mixture": "tg_only", "seed": 1}])))
    ec_config.validate(cfg)
    cells = {(c.mixture, c.scale, c.algo, c.kl, c.seed) for c in grid.rl_cells(cfg)}
    main = {(mix, "s", a, kl, s) for a, kl in (("ppo", 0.0), ("ppo", 0.01), ("grpo", 0.0)) for s in (0, 1)}
    sweep = {("rep2", "s", "ppo", 0.0, 0), ("rep2", "s", "ppo", 0.0, 1), ("tg_only", "s", "ppo", 0.0, 0)}
    assert cells == main | sweep and len(grid.rl_cells(cfg)) == len(cells)   # each cell once
    # the xs block pretrains only (algos: {}); its model is a cell of its own
    assert {(c.mixture, c.scale, c.seed) for c in grid.pretrain_cells(cfg)} == {
        (mix, "s", 0), (mix, "s", 1), ("rep2", "s", 0), ("rep2", "s", 1), ("tg_only", "s", 0), (mix, "xs", 0)}
    assert grid.values(cfg, "mixtures") == [mix, "rep2", "tg_only"] and grid.scales_by_size(cfg) == ["xs", "s"]
    assert grid.algos(cfg) == {"ppo": {"kl": [0.0, 0.01]}, "grpo": {"kl": [0.0]}}
    assert "tg" in grid.mixture_sources(cfg) and set(grid.sources_needed(cfg)) >= set(GOOD["mixtures"][mix])
    # every stage's checks see the blocks' scales: a batch that does not split at xs is refused
    cfg["pretrain"]["per_scale"] = {"xs": {"micro_batch_size": 3}}
    with pytest.raises(ec_config.ConfigError, match="at scale xs"):
        ec_config.validate(cfg)


# --- the grid is a set of buildable cells --------------------------------------------------------------

GRID_BAD = {
    "duplicate_mixture": (lambda c: c["grid"].update(mixtures=c["grid"]["mixtures"] * 2), ["grid.mixtures", "twice"]),
    "duplicate_scale": (lambda c: c["grid"].update(scales=["s", "xs", "s"]), ["grid.scales", "'s'", "twice"]),
    "duplicate_seed": (lambda c: c["grid"].update(seeds=[0, 1, 0]), ["grid.seeds", "0", "twice"]),
    "kl_equal_as_numbers": (lambda c: c["grid"]["algos"]["ppo"].update(kl=[0.01, 1.0e-2]), ["grid.algos.ppo.kl", "equal", "kl=0.01"]),
    "kl_same_path": (lambda c: c["grid"]["algos"]["ppo"].update(kl=[0.001, 0.0010000001]), ["grid.algos.ppo.kl", "too close", "kl=0.001"]),
    "no_cells_left": (lambda c: c["grid"].update(exclude=[{"scale": z} for z in c["grid"]["scales"]]), ["grid", "no cells"]),
    "also_unknown_mixture": (lambda c: c["grid"].update(also=[{"mixtures": ["nope"]}]),
                             ["grid.also.0.mixtures", "unknown mixture 'nope'"]),
    "also_empty_entry": (lambda c: c["grid"].update(also=[{}]), ["grid.also.0", "names at least one"]),
    "also_kl_same_path": (lambda c: c["grid"].update(algos={"ppo": {"kl": [0.001]}},
                                                     also=[{"algos": {"ppo": {"kl": [0.0010000001]}}}]),
                          ["grid.also.0.algos.ppo.kl", "too close", "kl=0.001"]),
    "1B_without_gpus": (lambda c: c["grid"].update(scales=["1B"]), ["pretrain.gpus", "1B", "not meant for CPUs"]),
    "1B_rl_without_gpus": (lambda c: (c["grid"].update(scales=["1B"]), c["pretrain"].update(gpus=8)),
                           ["rl.gpus", "1B", "not meant for CPUs"]),
}


MORE_BAD = {
    "path_like_mixture": (lambda c: (c["mixtures"].update({"a/b": {"tg": 1}}), c["grid"].update(mixtures=["a/b"])),
                          ["mixtures.a/b", "must match"]),
    "path_like_scale": (lambda c: (c["scales"].update({"x/y": c["scales"]["xs"]}), c["grid"].update(scales=["x/y"])),
                        ["scales.x/y", "must match"]),
    "path_like_benchmark": (lambda c: c["eval"]["benchmarks"].update({"a/b": {"source": "gsm8k", "split": "test"}}),
                            ["eval.benchmarks.a/b", "must match"]),
    "negative_seed": (lambda c: c["grid"].update(seeds=[-1]), ["grid.seeds", "-1", ">= 0"]),
    "seed_as_word": (lambda c: c["grid"].update(seeds=["zero"]), ["grid.seeds", "'zero'", "integer"]),
    "top_p_above_one": (lambda c: c["rl"].update(top_p=2.0), ["rl.top_p", "2.0", "<= 1"]),
    "rl_gpus_as_word": (lambda c: c["rl"].update(gpus="two"), ["rl.gpus", "'two'", "integer"]),
    "vocab_too_small": (lambda c: c["tokenizer"].update(vocab_size=10), ["tokenizer.vocab_size", "10", ">= 300"]),
    "unknown_prompt_split": (lambda c: c["rl"]["prompts"].update(split="validation"),
                             ["rl.prompts.split", "'validation'", "train"]),
    "exclude_names_no_grid_value": (lambda c: c["grid"].update(exclude=[{"scale": "m"}]),
                                    ["grid.exclude.0.scale", "'m'", "not in the grid"]),
    "difficulty_steps_reversed": (lambda c: c["data"]["synthetic"]["difficulty"].update(min_steps=3, max_steps=2),
                                  ["data.synthetic.difficulty.min_steps", "3", "max_steps 2"]),
    "grpo_single_sample": (lambda c: (c["grid"]["algos"].update(grpo={"kl": [0.0]}),
                                      c["rl"].update(samples_per_prompt=1, train_batch_size=2, micro_batch_size=2)),
                           ["rl.samples_per_prompt", "GRPO"]),
}
CROSS_FIELD = {
    "k_above_n": (lambda c: c["eval"].update(k=8, n_samples=4), ["eval.k (8) must not exceed eval.n_samples (4)"]),
    "pretrain_batch": (lambda c: c["pretrain"].update(batch_size=12, micro_batch_size=8), ["pretrain.batch_size 12"]),
    "rl_train_batch": (lambda c: c["rl"].update(train_batch_size=5), ["rl.train_batch_size: 5 does not divide"]),
    "ei_with_kl": (lambda c: c["grid"]["algos"].update(ei={"kl": [0.01]}), ["grid.algos.ei.kl"]),
    "reward_clip_order": (lambda c: c["rl"].update(reward_clip=[1, -1]), ["rl.reward_clip"]),
}
BROKEN = {**BAD, **GRID_BAD, **MORE_BAD, **CROSS_FIELD}


def _validate_cli(path):
    return subprocess.run([sys.executable, "-m", "echochamber.cli", "validate", str(path)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Both commands on every broken config, two cases at a time (each command keeps one core busy)."""
    def both(name):
        folder = tmp_path_factory.mktemp(name)
        cfg = tiny_config(folder / "results")
        BROKEN[name][0](cfg)
        path = write_config(folder / "bad.yaml", cfg)
        wf = snakemake("-n", "--configfile", str(path), cwd=folder, check=False)
        return name, (folder, path, _validate_cli(path), wf)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(both, sorted(BROKEN)))


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_validate_and_the_workflow_refuse_a_broken_config_with_the_same_sentence(name, refusals):
    """Both commands exit non-zero before any job, with one sentence that names the key as written and
    what is allowed, and write nothing under results/."""
    folder, path, cli, wf = refusals[name]
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    sentence = cli.stderr.strip().removeprefix("echochamber: ")
    assert sentence.startswith(f"{path}: ")
    for w in BROKEN[name][1]:
        assert w in sentence, sentence
    out = wf.stdout + wf.stderr
    assert wf.returncode != 0 and f"Config error: {sentence}" in out and "Traceback" not in out, out[-2000:]
    assert not (folder / "results").exists()


def test_every_accepted_kl_value_is_a_cell_path_the_workflow_builds(tmp_path):
    """Large and exponent-form KL values plan their cells (the wildcard accepts every spelling kl_str makes)."""
    cfg = tiny_config(tmp_path / "results")
    cfg["grid"]["algos"] = {"ppo": {"kl": [0, 1e-05, 0.001, 2.5, 1e20]}}
    ec_config.validate(cfg, origin="cfg")
    path = write_config(tmp_path / "config.yaml", cfg)
    dry = snakemake("-n", "--cores", "1", f"--configfile={path}", cwd=tmp_path)
    out = dry.stdout + dry.stderr
    for spelling in ("0", "1e-05", "0.001", "2.5", "1e+20"):
        assert f"algo=ppo/kl={spelling}/seed=0" in out, spelling


def test_numbers_written_with_an_exponent_are_numbers(tmp_path):
    cfg = tiny_config(tmp_path / "results")
    cfg["pretrain"]["lr"] = 0.003
    path = write_config(tmp_path / "config.yaml", cfg)
    text = path.read_text().replace("lr: 0.003", "lr: 3e-3", 1)   # YAML 1.1 reads 3e-3 as a string
    assert "lr: 3e-3" in text
    path.write_text(text)
    loaded = ec_config.load(path)
    assert loaded["pretrain"]["lr"] == 0.003
    assert _validate_cli(path).returncode == 0
    assert snakemake("-n", "--configfile", str(path), cwd=tmp_path).returncode == 0


def test_a_yaml_syntax_error_is_one_sentence_with_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("results: results\ngrid:\n  seeds: [0, 1\n  scales: [s]\n")
    out = _validate_cli(bad)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert f"{bad}: YAML syntax error at line " in out.stderr and ", column " in out.stderr
    # Snakemake parses a --configfile itself, before the workflow's code runs: its own message (no line
    # number), but it too stops before any job
    wf = snakemake("-n", "--configfile", str(bad), cwd=tmp_path, check=False)
    assert wf.returncode != 0 and "not valid JSON or YAML" in wf.stdout + wf.stderr
    assert not (tmp_path / "results").exists()


def test_a_grid_too_large_for_one_machine_gets_a_one_line_warning(tmp_path):
    cfg = tiny_config(tmp_path / "results")
    assert grid.size_warning(cfg, local=True) is None
    # n_jobs counts the jobs the workflow plans (all of them but the `all` target)
    dry = snakemake("-n", "--configfile", str(write_config(tmp_path / "one.yaml", cfg)), cwd=tmp_path)
    planned = int(re.search(r"^total\s+(\d+)$", dry.stdout + dry.stderr, re.MULTILINE).group(1))
    assert grid.n_jobs(cfg) == planned - 1
    cfg["grid"]["seeds"] = list(range(100))
    message = grid.size_warning(cfg, local=True)
    assert message.startswith(f"warning: this grid is {grid.n_jobs(cfg)} jobs (100 pretraining and 100 RL cells)")
    assert "\n" not in message and "profiles/slurm" in message
    assert grid.size_warning(cfg, local=False) is None          # a cluster executor takes it
    # the workflow says it before its first job
    path = write_config(tmp_path / "config.yaml", cfg)
    target = str(tmp_path / "results" / "data" / "source=tg" / "test.parquet")
    proc = snakemake(target, "--cores", "1", "--configfile", str(path), cwd=tmp_path)
    assert message in proc.stdout + proc.stderr


# --- the schema is generated from echochamber.settings -------------------------------------------------

def test_committed_schema_is_the_generated_one():
    assert ec_config.SCHEMA_FILE.read_text() == ec_config.schema_yaml(), \
        "schemas/config.schema.yaml is stale: run `echochamber schema --write`"


def test_snakemake_validates_against_the_generated_schema_and_fills_in_the_defaults():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate as sm_validate

    from echochamber import settings
    from echochamber.rl import settings as rl_settings

    for paths in SHIPPED:
        cfg = ec_config.load(*paths)
        sm_validate(cfg, str(ec_config.SCHEMA_FILE), set_default=True)
        ec_config.validate(cfg, origin=str(paths))        # the filled-in config is still valid
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    del cfg["rl"]["critic_lr"], cfg["eval"]["batch_size"]
    sm_validate(cfg, str(ec_config.SCHEMA_FILE), set_default=True)
    assert cfg["rl"]["critic_lr"] == rl_settings.DEFAULTS["critic_lr"] == settings.RL().critic_lr
    assert cfg["eval"]["batch_size"] == settings.Eval().batch_size
    with pytest.raises(WorkflowError):
        sm_validate(mutate(lambda c: c["pretrain"].update(precision="fp8")), str(ec_config.SCHEMA_FILE))


def test_every_setting_has_help_and_the_runtime_ones_are_marked_in_the_schema():
    from echochamber import settings

    def models(m, seen):
        if m in seen:
            return seen
        seen.add(m)
        for f in m.model_fields.values():
            for t in _types(f.annotation):
                if isinstance(t, type) and issubclass(t, settings.Section):
                    models(t, seen)
        return seen

    def _types(t):
        from typing import get_args
        return [t, *[x for a in get_args(t) for x in _types(a)]]

    for model in models(settings.Config, set()):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no help line"
    schema = settings.json_schema()["$defs"]
    assert schema["RL"]["properties"]["threads"]["runtime"] is True
    assert "runtime" not in schema["RL"]["properties"]["micro_batch_size"]
