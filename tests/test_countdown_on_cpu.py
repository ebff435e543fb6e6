"""The Countdown task of the learning benchmark (``hapo_verl/tinyworld/countdown.py``): the reward checks validity
line by line (never string equality with a reference), the solver finds exactly the solutions, the held-out set
is fixed, the sampler is deterministic per seed, and the fast engine and the task report run on the task."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from hapo_verl.bench_learning import task_report
from hapo_verl.tinyworld import countdown as cd
from hapo_verl.tinyworld import reversed_addition, tasks, world

PUZZLE = ((3, 4, 7), 25)


# ------------------------------------------------------------------------------------------------ reward
@pytest.mark.parametrize("text", [
    "7 * 4 = 28\n28 - 3 = 25\n",  # the canonical form
    "7*4=28\n28-3=25",  # no spaces
    "4 * 7 = 28\n28 - 3 = 25",  # operands in the other order: still valid
    "7 * 3 = 21\n21 + 4 = 25",  # the other solution
    "  7 * 4 = 28\n28 - 3 = 25  \n\n",  # surrounding whitespace is stripped
])
def test_valid_responses_score_one(text):
    assert cd.check_solution(*PUZZLE, text) == (True, "ok")
    assert cd.score_text(PUZZLE, text) == 1.0
    assert cd.compute_score(cd.DATA_SOURCE, text, "3,4,7:25") == {"score": 1.0, "acc": 1.0}


def test_division_is_allowed_when_exact():
    assert cd.check_solution((2, 3, 6), 9, "6 / 2 = 3\n3 * 3 = 9")[0]
    assert cd.check_solution((2, 3, 7), 10, "7 / 2 = 3\n3 + 7 = 10")[1].startswith("line 1: 7 / 2 is not 3")
    assert not cd.check_solution((0, 3, 7), 10, "7 / 0 = 0\n3 + 7 = 10")[0]


@pytest.mark.parametrize("text, reason", [
    ("7 * 4 = 27\n27 - 2 = 25", "line 1: 7 * 4 is not 27"),  # wrong arithmetic
    ("7 * 4 = 28\n28 - 3 = 24", "line 2: 28 - 3 is not 24"),
    ("3 - 4 = 1\n7 * 4 = 28", "line 1: 3 - 4 is not 1"),  # negative difference
    ("7 * 7 = 49\n49 - 24 = 25", "line 1: 7 is not available"),  # one 7 only
    ("7 * 4 = 28\n28 - 4 = 24", "line 2: 4 is not available"),  # 4 used twice
    ("7 * 4 = 28\n25 + 0 = 25", "line 2: 25 is not available"),  # a value out of nowhere
    ("7 + 4 = 11\n11 + 3 = 14", "last value 14 is not the target 25"),  # valid steps, wrong final value
    ("7 * 4 = 28", "numbers left unused: [3, 28]"),  # stops early
    ("", "empty response"),
    ("25", "line 1 is not 'a op b = c'"),  # the bare answer is not a solution
    ("7 * 4 = 28\nthe answer is 25", "line 2 is not 'a op b = c'"),
    ("7 * 4 = 28\n\n28 - 3 = 25", "line 2 is not 'a op b = c'"),  # blank line inside
    ("07 * 4 = 28\n28 - 3 = 25", "line 1 is not 'a op b = c'"),  # leading zero
    ("7 x 4 = 28\n28 - 3 = 25", "line 1 is not 'a op b = c'"),
    ("7 * 4 = 28 = 28\n28 - 3 = 25", "line 1 is not 'a op b = c'"),
    ("7 * 4 = 28\n28 - 3 = 25\n25 + 0 = 25", "line 3: 0 is not available"),  # a line too many
])
def test_invalid_responses_score_zero(text, reason):
    ok, why = cd.check_solution(*PUZZLE, text)
    assert not ok and why.startswith(reason), why
    assert cd.score_text(PUZZLE, text) == 0.0
    assert cd.compute_score(cd.DATA_SOURCE, text, "3,4,7:25")["acc"] == 0.0


def test_compute_score_reads_the_puzzle_from_the_prompt_text():
    text = cd.prompt_text(cd.TaskConfig(), PUZZLE)
    assert text == "03,04,07:25" and cd.parse_prompt(text) == PUZZLE  # numbers padded to the width of 12
    assert cd.prompt_text(cd.TaskConfig(max_number=9), PUZZLE) == "3,4,7:25"
    wide = cd.TaskConfig(max_number=12, max_target=120)
    assert cd.prompt_text(wide, ((3, 4, 11), 7)) == "03,04,11:007"
    assert cd.parse_prompt("03,04,11:007") == ((3, 4, 11), 7)
    assert cd.compute_score("x", "7 * 4 = 28\n28 - 3 = 25", text)["score"] == 1.0
    assert cd.compute_score("x", None, "3,4,7:25")["score"] == 0.0


# ------------------------------------------------------------------------------------------------ solver
def test_solver_on_a_hand_solved_puzzle():
    # 25 from 3, 4, 7 with + - *: 7*4-3 and 7*3+4; nothing else (e.g. (7+3)*... or 4*3... cannot reach 25)
    assert cd.solutions(*PUZZLE) == [((7, "*", 3, 21), (21, "+", 4, 25)), ((7, "*", 4, 28), (28, "-", 3, 25))]
    assert cd.solutions((1, 1), 2) == [((1, "+", 1, 2),)] and cd.solutions((1, 1), 0) == [((1, "-", 1, 0),)]
    assert cd.solutions((2, 2), 4) == [((2, "*", 2, 4),), ((2, "+", 2, 4),)]
    assert ((6, "/", 2, 3), (3, "*", 3, 9)) in cd.solutions((2, 3, 6), 9, "+-*/")
    assert ((6, "/", 2, 3), (3, "*", 3, 9)) not in cd.solutions((2, 3, 6), 9, "+-*")


def _brute_force_targets(numbers, operators="+-*"):
    """Every value of every bracketing and order of three numbers, independently of the solver."""
    values = set()
    for a, b, c in itertools.permutations(numbers):
        for op1, op2 in itertools.product(operators, repeat=2):
            first = cd.apply(a, op1, b)
            if first is None:
                continue
            for x, y in ((first, c), (c, first)):
                value = cd.apply(x, op2, y)
                if value is not None:
                    values.add(value)
    return values


def test_solver_finds_every_reachable_target_and_only_valid_solutions():
    task = cd.TaskConfig(min_target=0, max_target=10 ** 6)
    for numbers in itertools.combinations_with_replacement(range(1, 10), 3):
        reachable = cd.reachable_targets(task, numbers)
        assert set(reachable) == _brute_force_targets(numbers), numbers
    rng = random.Random(0)
    for _ in range(40):
        numbers = tuple(sorted(rng.randint(1, 9) for _ in range(4)))
        for target, count in list(cd.reachable_targets(task, numbers).items())[:5]:
            found = cd.solutions(numbers, target)
            assert len(found) == count == len(set(found)) > 0
            for steps in found:
                assert all(a >= b for a, _, b, _ in steps)  # the canonical order: larger operand first
                for spaced in (True, False):
                    assert cd.check_solution(numbers, target, cd.solution_text(steps, spaced)) == (True, "ok")


# ------------------------------------------------------------------------------------------------ data
def test_heldout_set_is_fixed_valid_and_disjoint_from_training():
    task = cd.TaskConfig()
    held = cd.heldout_problems(task)
    assert held == cd.heldout_problems(cd.TaskConfig()) and len(held) == len(set(held)) == task.num_heldout
    assert held[:3] == [((1, 7, 12), 85), ((4, 5, 6), 15), ((3, 6, 7), 16)]  # pinned: records depend on it
    for numbers, target in held:
        assert list(numbers) == sorted(numbers) and len(numbers) == task.count
        assert task.min_target <= target <= task.max_target and cd.solutions(numbers, target, task.operators)
    assert not set(held) & set(cd.ProblemSampler(task, 0).sample(3000))
    assert cd.heldout_problems(cd.TaskConfig(heldout_seed=1)) != held


def test_sampler_is_deterministic_per_seed():
    task = cd.TaskConfig()
    first = cd.ProblemSampler(task, 3).sample(50)
    assert first == cd.ProblemSampler(task, 3).sample(50)
    assert first != cd.ProblemSampler(task, 4).sample(50)
    stream = cd.ProblemSampler(task, 3)
    assert stream.sample(20) + stream.sample(30) == first


def test_task_config_lengths_and_validation(tmp_path):
    task = cd.TaskConfig()
    assert task.prompt_len == world.CHAT_FRAME_TOKENS + len("12,12,12:99")
    assert task.longest_solution_tokens == len("10 * 10 = 100\n100 - 10 = 90\n") + 1  # the longest, with eos
    assert task.max_new_tokens == task.longest_solution_tokens + task.overlong_buffer
    nine = cd.TaskConfig(max_number=9)
    assert nine.prompt_len == world.CHAT_FRAME_TOKENS + len("9,9,9:99")
    assert nine.longest_solution_tokens == len("9 * 9 = 81\n81 + 9 = 90\n") + 1
    four = cd.TaskConfig(count=4, max_number=9, spaced=False)
    assert four.longest_solution_tokens == len("5*4=20\n20*5=100\n100-1=99\n") + 1
    for bad in ({"count": 1}, {"count": 5}, {"max_number": 1}, {"min_target": 5, "max_target": 4},
                {"operators": "+%"}, {"operators": "++"}, {"operators": ""}, {"kind": "add"}):
        with pytest.raises(ValueError):
            cd.TaskConfig(**bad)
    assert task.key() == cd.TaskConfig().key() != nine.key()
    world.create(tmp_path / "model", cd.SHAPE, seed=0)
    tokenizer = world.load(tmp_path / "model")[0]
    rng = random.Random(0)
    for config in (task, nine, four):
        codec = cd.Codec(tokenizer, config)
        for problem in cd.ProblemSampler(config, 0).sample(200):
            assert len(codec.encode_prompt(problem)) == config.prompt_len
            ids = codec.reference_ids(problem, rng)
            assert ids[-1] == codec.eos and len(ids) <= config.longest_solution_tokens
            assert codec.score(problem, codec.decode(ids)) == 1.0
    codec = cd.Codec(tokenizer, task)
    text = codec.tokenizer.decode(codec.encode_prompt(PUZZLE))
    assert text == "<|im_start|>user\n03,04,07:25<|im_end|>\n<|im_start|>assistant\n"
    seen = {codec.decode(codec.reference_ids(PUZZLE, rng)) for _ in range(40)}
    assert seen == {"7 * 3 = 21\n21 + 4 = 25\n", "7 * 4 = 28\n28 - 3 = 25\n"}  # the warm-up sees both solutions
    unspaced = cd.Codec(tokenizer, four).decode(cd.Codec(tokenizer, four).reference_ids(((1, 3, 4, 7), 26), rng))
    assert unspaced in {cd.solution_text(steps, spaced=False) for steps in cd.solutions((1, 3, 4, 7), 26)}


def test_rl_rows_carry_the_puzzle_for_verls_reward():
    task = cd.TaskConfig()
    row = cd.rl_rows(task, [PUZZLE], "train")[0]
    assert row["prompt"] == [{"role": "user", "content": "03,04,07:25"}] and row["data_source"] == cd.DATA_SOURCE
    assert cd.compute_score(row["data_source"], "7*4=28\n28-3=25", row["reward_model"]["ground_truth"])["score"] == 1.0
    assert row["extra_info"] == {"split": "train", "index": 0, "numbers": [3, 4, 7], "target": 25}


def test_task_names_and_the_shared_codec_interface(tmp_path):
    assert tasks.TASK_NAMES == ("addvar", "add", "countdown")
    assert tasks.family(tasks.make_task("countdown")) is cd
    assert tasks.family(tasks.make_task("add", digits=2)) is reversed_addition
    assert tasks.make_task("addvar") == reversed_addition.TaskConfig()
    with pytest.raises(ValueError):
        tasks.make_task("sudoku")
    # reversed addition's generic methods are its old ones: same prompt, same answer, same score
    add = reversed_addition.TaskConfig()
    world.create(tmp_path / "model", reversed_addition.SHAPE, seed=0)
    codec = reversed_addition.Codec(world.load(tmp_path / "model")[0], add)
    assert codec.encode_prompt((123, 4)) == codec.prompt_ids(123, 4)
    assert codec.reference_ids((123, 4), random.Random(0)) == codec.answer_ids(123, 4)
    for text in (" 721 ", "721", "127", ""):
        assert codec.score((123, 4), text) == reversed_addition.compute_score("x", text, "721")["score"]
    assert add.tag == "addvar3" and tasks.make_task("countdown").tag == "countdown3"


# ------------------------------------------------------------------------------------------------ entropy report
def test_entropy_profile_by_hand():
    entropy = torch.tensor([[0.0, 0.05, 1.0, 2.0, 0.5], [3.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    prof = task_report.entropy_profile(entropy, mask)
    assert prof["tokens"] == 5 and prof["share_below_0.1"] == pytest.approx(2 / 5)
    assert prof["top20_mass"] == pytest.approx(2.0 / 3.55)  # ceil(0.2 * 5) = 1 token holds 2.0 of 3.55
    assert prof["mean"] == pytest.approx(0.71) and prof["max"] == 2.0  # the masked 3.0 is not a token
    ten = task_report.entropy_profile(torch.arange(10.0)[None], torch.ones(1, 10))
    assert ten["top20_mass"] == pytest.approx((9 + 8) / 45) and ten["share_below_0.1"] == pytest.approx(0.1)
    flat = task_report.entropy_profile(torch.full((1, 10), 0.7), torch.ones(1, 10))
    assert flat["top20_mass"] == pytest.approx(0.2) and flat["share_below_0.1"] == 0.0  # homogeneous


def test_token_classes_by_hand():
    pieces = list("7 * 4 = 28\n28 - 3 = 25\n") + [""]
    classes = task_report.token_classes(pieces, "")
    assert classes[:11] == ["operand digit", "space", "operator", "space", "operand digit", "space", "=", "space",
                            "result digit", "result digit", "newline"]
    assert classes[11:13] == ["operand digit", "operand digit"] and classes[-2:] == ["newline", "eos"]


# ------------------------------------------------------------------------------------------------ the engine
SMALL = world.ModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("countdown") / "model"
    world.create(path, SMALL, seed=0)
    return str(path)


@pytest.mark.parametrize("method", ["grpo", "hapo"])
def test_fast_engine_runs_two_steps_on_countdown(small_model, method):
    from hapo_verl.bench_learning.fast import RLConfig, run_fast

    torch.set_num_threads(1)
    task = cd.TaskConfig(num_heldout=16)
    rl = RLConfig(steps=2, prompts_per_step=4, n=4, micro_batch_size=8, ppo_mini_batches=2, ppo_epochs=2,
                  eval_every=2)
    rec = run_fast(small_model, task, method, 0, rl, log=lambda *a: None)
    assert [e["step"] for e in rec["evals"]] == [0, 2] and len(rec["history"]) == 2
    assert rec["task"] == task.to_dict() and rec["rl"]["ppo_epochs"] == 2
    for h in rec["history"]:
        assert h["samples_generated"] == 16 and 1 <= h["response_length"] <= task.max_new_tokens
        assert torch.isfinite(torch.tensor([h["pg_loss"], h["entropy"], h["grad_norm"]])).all()
        assert 0.0 <= h["pg_clipfrac"] <= 1.0


def test_task_report_measures_a_checkpoint(small_model):
    from hapo_verl.bench_learning.fast import RLConfig

    task = cd.TaskConfig(num_heldout=16)
    rl = RLConfig(prompts_per_step=4, n=4, micro_batch_size=8)
    rep = task_report.measure(small_model, task, 0, rl, [task_report.Candidate(1e-3, 2, 2)], rl_steps=1,
                              sample_prompts=4, log=lambda *a: None)
    sampled = rep["sampled"]
    assert sampled["responses"] == 16 and 1 <= sampled["mean_length"] <= task.max_new_tokens
    assert 0 <= sampled["entropy"]["share_below_0.1"] <= 1 and 0.2 <= sampled["entropy"]["top20_mass"] <= 1
    assert sum(v["token_share"] for v in sampled["entropy_by_class"].values()) == pytest.approx(1.0)
    (clip,) = rep["clip"]
    assert clip["candidate"] == {"lr": 1e-3, "ppo_mini_batches": 2, "ppo_epochs": 2} and clip["cpu_s_per_step"] > 0
    assert "| 0 | lr 0.001, 2 mini-batches, 2 epoch(s) | 1 |" in task_report.markdown([rep])
