"""Every recipe in recipes/ composes, passes the launcher's start-up checks (prepare_config + verl's
validate_config) and holds the published values; ablations differ from the full recipe only in their key;
tiny_cpu is what ``hapo-verl tiny`` runs; ``hapo-verl train --config-path recipes`` composes the same config."""

import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from hapo_verl.launcher import validate
from hapo_verl.tools.recipes import compose_recipe, list_recipes, recipes_dir

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
MODELS = ("qwen2.5_math_1.5b", "qwen2.5_math_7b", "qwen3_8b_base", "llama3.1_8b_instruct")
ABLATIONS = {
    "no_ats": {"hapo.adaptive_temperature": False},
    "no_tlga": {"algorithm.adv_estimator": "grpo"},
    "no_dar": {"actor_rollout_ref.actor.policy_loss.adaptive_advantage": False},
    "no_aac": {"actor_rollout_ref.actor.policy_loss.adaptive_clip": False},
}
GPU_RECIPES = [f"{m}_{v}" for m in MODELS for v in ("hapo", "dapo", *(f"hapo_{a}" for a in ABLATIONS))]
#: the models on which every other method has a recipe beside HAPO and DAPO
METHOD_MODELS = ("qwen2.5_math_7b", "qwen3_8b_base")
#: configs of hapo_verl/conf that predate the per-method recipes (their recipes are GPU_RECIPES, or none yet)
NO_METHOD_RECIPES = {"hapo", "dapo", "archer", "edge_grpo", "forking", "haepo"}


def method_recipes() -> list[str]:
    """``<model>_<config>`` for every config of hapo_verl/conf added since (e.g. cegppo, clip_cov)."""
    from hapo_verl.conf import config_names

    return [f"{m}_{c}" for c in config_names() if c not in NO_METHOD_RECIPES for m in METHOD_MODELS]
#: published per-model settings (the authors' recipe/<model>.sh, https://github.com/starriver030515/HAPO): model, max_resp, overlong buffer, sp=gen_tp, nodes
PER_MODEL = {
    "qwen2.5_math_1.5b": ("starriver030515/Qwen2.5-Math-1.5B-16k", 10240, True, 2, 4),
    "qwen2.5_math_7b": ("starriver030515/Qwen2.5-Math-7B-32k", 10240, True, 4, 4),
    "qwen3_8b_base": ("Qwen/Qwen3-8B-Base", 12288, True, 8, 8),
    "llama3.1_8b_instruct": ("meta-llama/Llama-3.1-8B-Instruct", 4096, False, 2, 4),
}


@lru_cache(maxsize=None)
def composed(name):
    return compose_recipe(name, [], RECIPES)


def flat(config) -> dict:
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(config, resolve=False), "")
    return out


def test_recipe_set_is_complete():
    assert recipes_dir(RECIPES) == RECIPES.resolve()
    assert set(list_recipes(RECIPES)) == set(GPU_RECIPES) | set(method_recipes()) | {"tiny_cpu"}


@pytest.mark.parametrize("name", GPU_RECIPES + method_recipes() + ["tiny_cpu"])
def test_recipe_composes_and_passes_start_up_checks(name):
    config = compose_recipe(name, [], RECIPES)  # fresh: prepare_config fills launcher-owned keys
    validate(config)
    assert config.recipe.name == name == config.trainer.experiment_name
    OmegaConf.to_container(config, resolve=True)  # every interpolation resolves (no model or data file needed)


@pytest.mark.parametrize("name", GPU_RECIPES + ["tiny_cpu"])
def test_recipe_names_versions_and_layout(name):
    import verl

    config = composed(name)
    header = "\n".join(line for line in (RECIPES / f"{name}.yaml").read_text().splitlines() if line.startswith("#"))
    assert str(config.recipe.verl) == verl.__version__ == "0.9.1"
    assert "verl 0.9.1" in header
    if name == "tiny_cpu":
        assert "no vLLM" in header and config.recipe.vllm == "none"
        return
    assert str(config.recipe.vllm) == "0.24.0" and "vLLM 0.24.0" in header
    layout = re.search(r"expects (\d+) nodes x (\d+) GPUs", header)
    assert layout, header
    assert (int(layout[1]), int(layout[2])) == (config.trainer.nnodes, config.trainer.n_gpus_per_node)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_ablation_differs_from_full_recipe_only_in_its_key(model, ablation):
    full, ablated = flat(composed(f"{model}_hapo")), flat(composed(f"{model}_hapo_{ablation}"))
    assert set(full) == set(ablated)
    diff = {k: ablated[k] for k in full if full[k] != ablated[k]}
    assert diff == {"recipe.name": f"{model}_hapo_{ablation}", **ABLATIONS[ablation]}


@pytest.mark.parametrize("model", MODELS)
def test_hapo_recipe_has_published_hyperparameters(model):
    path, max_resp, overlong, parallel, nodes = PER_MODEL[model]
    c = composed(f"{model}_hapo")
    actor, rollout, loss = c.actor_rollout_ref.actor, c.actor_rollout_ref.rollout, c.actor_rollout_ref.actor.policy_loss
    assert c.algorithm.adv_estimator == "hapo" and loss.loss_mode == "hapo"
    assert (c.hapo.adaptive_temperature, c.hapo.temperature_tau) == (True, 0.05)
    assert (loss.adaptive_clip, loss.clip_alpha, loss.adaptive_advantage, loss.adv_beta, loss.entropy_pivot) == (
        True, 1.0, True, 1.0, 0.8)
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.2, 0.2, 10.0)
    assert actor.loss_agg_mode == "token-mean" and not actor.use_kl_loss and not c.algorithm.use_kl_in_reward
    assert (c.data.train_batch_size, rollout.n, actor.ppo_mini_batch_size, actor.ppo_epochs) == (512, 16, 32, 1)
    assert (actor.optim.lr, actor.optim.lr_warmup_steps, actor.optim.weight_decay, actor.optim.clip_grad) == (
        1e-6, 10, 0.1, 1.0)
    assert (rollout.temperature, rollout.top_p, rollout.top_k) == (1.0, 1.0, -1)
    val = rollout.val_kwargs
    assert (val.n, val.temperature, val.top_p, val.do_sample) == (8, 0.5, 0.7, True)
    assert (c.data.max_prompt_length, c.data.truncation) == (1024, "left")
    assert (c.trainer.test_freq, c.trainer.save_freq, c.trainer.total_epochs, c.trainer.val_before_train) == (
        5, 50, 1, True)
    # per model
    assert c.actor_rollout_ref.model.path == path
    assert c.data.max_response_length == max_resp
    assert c.reward.reward_kwargs.overlong_buffer_cfg.enable is overlong
    assert (c.reward.reward_kwargs.overlong_buffer_cfg.len, c.reward.reward_kwargs.max_resp_len) == (4096, max_resp)
    assert actor.fsdp_config.ulysses_sequence_parallel_size == parallel == rollout.tensor_model_parallel_size
    assert (c.trainer.nnodes, c.trainer.n_gpus_per_node) == (nodes, 8)
    assert actor.use_dynamic_bsz and actor.ppo_max_token_len_per_gpu == 2 * (1024 + max_resp)
    # DAPO's reward through verl's dapo manager; no dynamic sampling (the fork's filter_groups flag was a no-op)
    assert c.reward.reward_manager.name == "dapo"
    assert c.reward.custom_reward_function.path == "pkg://hapo_verl.tools.reward"
    assert c.algorithm.filter_groups.enable is False
    if model == "qwen2.5_math_7b":
        assert c.actor_rollout_ref.model.override_config.max_position_embeddings == 32768


@pytest.mark.parametrize("model", MODELS)
def test_dapo_baseline_shares_data_lengths_batches_and_reward(model):
    hapo, dapo = flat(composed(f"{model}_hapo")), flat(composed(f"{model}_dapo"))
    algorithm_keys = ("hapo.", "algorithm.", "actor_rollout_ref.actor.policy_loss.", "actor_rollout_ref.actor.clip_ratio",
                      "actor_rollout_ref.actor.calculate_entropy", "actor_rollout_ref.rollout.agent.", "recipe.name")
    diff = {k for k in set(hapo) | set(dapo) if hapo.get(k) != dapo.get(k)}
    assert all(k.startswith(algorithm_keys) for k in diff), sorted(k for k in diff if not k.startswith(algorithm_keys))
    c = composed(f"{model}_dapo")
    assert c.algorithm.adv_estimator == "grpo" and c.actor_rollout_ref.actor.policy_loss.loss_mode == "vanilla"
    assert (c.actor_rollout_ref.actor.clip_ratio_low, c.actor_rollout_ref.actor.clip_ratio_high) == (0.2, 0.28)
    assert c.algorithm.filter_groups.enable and c.algorithm.filter_groups.metric == "acc"
    assert not c.hapo.adaptive_temperature


@pytest.mark.parametrize("name", method_recipes())
def test_method_recipe_shares_data_lengths_batches_optimizer_and_reward_with_dapo(name):
    model = next(m for m in METHOD_MODELS if name.startswith(m + "_"))
    method, dapo = flat(composed(name)), flat(composed(f"{model}_dapo"))
    shared = ("data.", "actor_rollout_ref.model.", "actor_rollout_ref.actor.optim.", "actor_rollout_ref.actor.ppo_",
              "actor_rollout_ref.rollout.n", "actor_rollout_ref.rollout.temperature", "reward.", "trainer.nnodes",
              "trainer.n_gpus_per_node", "trainer.total_training_steps")
    diff = sorted(k for k in set(method) | set(dapo) if k.startswith(shared) and method.get(k) != dapo.get(k))
    assert diff == [], diff


def test_tiny_cpu_recipe_is_what_hapo_verl_tiny_runs(tmp_path, monkeypatch):
    from hapo_verl.cli import tiny_overrides
    from hapo_verl.cpu import cpu_env
    from hapo_verl.launcher import compose

    # as `hapo-verl train --recipe tiny_cpu` does before composing: cpu_env() in the environment
    monkeypatch.setenv("TQ_NUM_THREADS", cpu_env()["TQ_NUM_THREADS"])
    composed.cache_clear()
    tiny = flat_resolved(compose("hapo", tiny_overrides("hapo", 4, str(tmp_path), [])))
    recipe = flat_resolved(composed("tiny_cpu"))
    # the run's name (and what interpolates it) and the recipe's metadata block are all that may differ
    ignore = ("recipe.", "trainer.default_local_dir")
    tiny = {k: v for k, v in tiny.items() if not (k.startswith(ignore) or k.endswith("experiment_name"))}
    recipe = {k: v for k, v in recipe.items() if not (k.startswith(ignore) or k.endswith("experiment_name"))}
    assert recipe == tiny, {k: (recipe.get(k), tiny.get(k)) for k in set(recipe) | set(tiny)
                            if recipe.get(k) != tiny.get(k)}


def flat_resolved(config) -> dict:
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(config, resolve=True), "")
    return out


def test_hydra_config_path_route_composes_the_same_recipe():
    """``hapo-verl train --config-path recipes --config-name NAME`` (Hydra's own flags) composes the recipe."""
    name = "qwen2.5_math_1.5b_hapo_no_dar"
    proc = subprocess.run([sys.executable, "-m", "hapo_verl.cli", "train", "--config-path", str(RECIPES),
                           "--config-name", name, "--cfg", "job", "trainer.total_epochs=2"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = OmegaConf.create(proc.stdout)
    expected = compose_recipe(name, ["trainer.total_epochs=2"], RECIPES)
    assert OmegaConf.to_container(printed) == OmegaConf.to_container(expected)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ValueError, match="qwen2.5_math_1.5b_hapo"):
        compose_recipe("qwen2.5_math_1.5b_hapoo", [], RECIPES)


def test_tiny_cpu_recipe_trains_through_hapo_verl_train(tmp_path):
    """``hapo-verl train --recipe tiny_cpu``: the recipe route runs verl's trainer end to end on CPU (2 steps)."""
    import json

    from cpu_run_utils import run_verl

    metrics = tmp_path / "metrics.jsonl"
    result = run_verl(["train", "--recipe", "tiny_cpu", "--recipes-dir", str(RECIPES),
                       "trainer.total_training_steps=2", "trainer.save_freq=-1"],
                      module="hapo_verl.cli", timeout=900, env_extra={"VERL_FILE_LOGGER_PATH": str(metrics)},
                      cwd=tmp_path)
    assert result.rc == 0, result.tail()
    assert "[hapo-verl] recipe tiny_cpu" in result.output
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert {s["step"] for s in steps} == {1, 2}
    assert all("hapo/rollout/temperature_mean" in s["data"] for s in steps)
