"""Fast mode of the learning benchmark: one process, the plugin's own code paths, no Ray.

A method is a config of ``hapo_verl/conf`` plus overrides (:mod:`hapo_verl.bench_learning.methods`); what it does
is read from the composed config through the trainer's ``StepPlan``. Per RL step (one method, one seed):

1. sample ``prompts_per_step`` training problems, ``n`` responses each (KV-cache decoding of the HF model; with
   adaptive temperature: per-token temperature ``T * f`` with ``f`` from :func:`temperature_factor_from_entropy`
   and the previous step's entropy statistics, the rule of the ``hfcpu`` rollout; the behaviour log-prob is that of
   the sampled temperature and the training log-prob uses the same per-token temperature);
2. rewards (task reward, + DAPO's overlong shaping when the config has DAPO's reward), verl token-level rewards on
   the last response token;
3. with ``algorithm.filter_groups.enable``: dynamic sampling, groups whose rewards have zero variance are dropped and
   refilled with new generation batches (at most ``max_gen_batches``);
4. the batch statistics of the method's algorithms (their specs' hooks, over the whole batch, as the trainer), and
   advantages through verl's estimator registry (``get_adv_estimator_fn``) with what the estimator's spec needs;
5. the enabled selection steps (D³S) on the whole batch: the update learns from the kept tokens;
6. ``ppo_epochs`` x ``ppo_mini_batches`` optimizer steps (AdamW, grad clip 1.0) with verl's own loss (vanilla,
   clip_cov, kl_cov) or the registered one, after the mini-batch pass for a loss that needs it; aggregation as
   verl's global batch (the loss of every micro-batch is weighted by its share of the mini-batch, as
   ``global_batch_info``).

Every ``eval_every`` steps: greedy accuracy on the fixed held-out prompts.

The task is any family of :mod:`hapo_verl.tinyworld.tasks` (reversed addition, Countdown): problems are opaque
here, the family's ``Codec`` encodes their prompts and scores the responses.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hapo_verl.registry import BATCH_STATS, CURRENT_ENTROPY, MINIBATCH_STATS, OLD_ENTROPY, RESPONSE_STEPS
from hapo_verl.tinyworld.tasks import family

from hapo_verl.bench_learning.methods import FastSettings, fast_settings, grid_methods, methods

METHOD_NAMES = tuple(methods())
#: the default grid: every method but the algorithms' variants (run those with --methods)
GRID_METHODS = tuple(grid_methods())
#: a token is "high-entropy" in the clip-fraction split when its old-policy entropy is in the step's top 20%
HIGH_ENTROPY_QUANTILE = 0.8


@dataclass(frozen=True)
class RLConfig:
    steps: int = 600
    prompts_per_step: int = 16
    n: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    temperature: float = 1.0
    ppo_mini_batches: int = 2
    #: passes over the batch's mini-batches (verl's ``actor.ppo_epochs``, same order every pass)
    ppo_epochs: int = 1
    micro_batch_size: int = 32
    max_gen_batches: int = 8
    eval_every: int = 50
    threads: int = 1


# ------------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new: int, eos: int, pad: int, *, greedy: bool = False,
             temperature: float = 1.0, factor_fn=None, generator: torch.Generator | None = None) -> dict:
    """Decode ``max_new`` tokens at most for equal-length prompts [B, P] with the KV cache.

    Returns tokens, mask (response tokens up to and including eos), behaviour log-probs and per-token
    temperatures (``temperature * factor_fn(entropy)``), and the T=1 entropy of every decoding position (computed
    once per step, for both).
    """
    from transformers import DynamicCache

    from hapo_verl.algorithms.entropy import token_entropy_from_logits

    was_training = model.training
    model.eval()
    B = prompt_ids.shape[0]
    cache = DynamicCache()
    logits = model(input_ids=prompt_ids, past_key_values=cache, use_cache=True).logits[:, -1].float()
    done = torch.zeros(B, dtype=torch.bool)
    toks, masks, logps, temps, ents = [], [], [], [], []
    for _ in range(max_new):
        ent = token_entropy_from_logits(logits)
        if greedy:
            tok = logits.argmax(-1)
            t_eff = torch.ones(B)
            lp = torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
        else:
            t_eff = torch.full((B,), float(temperature))
            if factor_fn is not None:
                t_eff = t_eff * factor_fn(ent).float()
            logp_all = torch.log_softmax(logits / t_eff[:, None], -1)
            tok = torch.multinomial(logp_all.exp(), 1, generator=generator)[:, 0]
            lp = logp_all.gather(-1, tok[:, None])[:, 0]
        valid = ~done
        tok = torch.where(valid, tok, torch.full_like(tok, pad))
        toks.append(tok); masks.append(valid); logps.append(lp); temps.append(t_eff); ents.append(ent)
        done = done | (tok == eos)
        if bool(done.all()):
            break
        logits = model(input_ids=tok[:, None], past_key_values=cache, use_cache=True).logits[:, -1].float()
    model.train(was_training)
    mask = torch.stack(masks, 1)
    return {"tokens": torch.stack(toks, 1), "mask": mask.float(), "old_log_prob": torch.stack(logps, 1) * mask,
            "temperature": torch.where(mask, torch.stack(temps, 1), torch.ones_like(mask, dtype=torch.float)),
            "entropy": torch.stack(ents, 1) * mask}


def score_responses(codec, tokens: torch.Tensor, mask: torch.Tensor, problems) -> list[float]:
    """The task reward of each response (its tokens up to and including eos, decoded without special tokens)."""
    return [codec.score(problem, codec.decode(tokens[row][mask[row].bool()].tolist()))
            for row, problem in enumerate(problems)]


def prompt_tensor(codec, problems) -> torch.Tensor:
    return torch.tensor([codec.encode_prompt(p) for p in problems], dtype=torch.long)


def greedy_accuracy(model, codec, problems, batch_size: int = 500) -> float:
    correct = 0.0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        out = generate(model, prompt_tensor(codec, chunk), codec.task.max_new_tokens, codec.eos, codec.pad,
                       greedy=True)
        correct += sum(score_responses(codec, out["tokens"], out["mask"], chunk))
    return correct / max(1, len(problems))


# ------------------------------------------------------------------------------------------------ one RL run
def _pad_cat(tensors: list[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    if tensors[0].dim() == 1:
        return torch.cat(tensors, 0)
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors], 0)


class FastRun:
    def __init__(self, model, codec, method: FastSettings, rl: RLConfig, seed: int):
        import hapo_verl.registration  # noqa: F401  (registers the hapo estimator / loss names in verl)
        from verl.trainer.ppo.core_algos import get_adv_estimator_fn

        hapo_verl.registration.ensure_registered()
        self.model, self.codec, self.method, self.rl, self.seed = model, codec, method, rl, seed
        self.task = codec.task
        self.sampler = family(self.task).ProblemSampler(self.task, seed)
        self.gen = torch.Generator().manual_seed(seed * 1000 + 1)
        plan = method.plan  # what the trainer does for this config (hapo_trainer.StepPlan)
        self.plan = plan
        self.config = method.actor
        self.loss_spec, self.loss_options, self.loss_needs = plan.loss_spec, plan.loss_options, plan.loss_needs
        self.estimator_spec, self.estimator_options = plan.estimator_spec, plan.estimator_options
        self.estimator_config = method.algorithm  # verl's algorithm section (the estimator reads its options there)
        self.adv_fn = get_adv_estimator_fn(method.estimator)
        self.sampling_spec = plan.sampling_spec if plan.adaptive_temperature else None
        self.opt = torch.optim.AdamW(model.parameters(), lr=rl.lr, weight_decay=rl.weight_decay,
                                     betas=(0.9, 0.999))
        self.prev_stats = None  # entropy statistics of the previous step (adaptive temperature)
        self.uid = 0
        self.step_index = 0

    # -- rollout
    def _factor_fn(self):
        if self.sampling_spec is None or self.prev_stats is None:
            return None
        from hapo_verl.algorithms.entropy import temperature_factor_from_entropy

        stats, sampling = self.prev_stats, self.plan.sampling
        return lambda entropy: temperature_factor_from_entropy(entropy, stats, sampling.temperature_tau,
                                                               sampling.reference_compat)

    def _gen_batch(self) -> dict:
        rl, task = self.rl, self.task
        problems = self.sampler.sample(rl.prompts_per_step)
        rows = [p for p in problems for _ in range(rl.n)]
        uids = [str(self.uid + i) for i in range(len(problems)) for _ in range(rl.n)]
        self.uid += len(problems)
        out = generate(self.model, prompt_tensor(self.codec, rows), task.max_new_tokens, self.codec.eos,
                       self.codec.pad, temperature=rl.temperature, factor_fn=self._factor_fn(),
                       generator=self.gen)
        out["prompts"] = prompt_tensor(self.codec, rows)
        out["score"] = torch.tensor(score_responses(self.codec, out["tokens"], out["mask"], rows))
        out["uid"] = uids
        return out

    def rollout(self) -> tuple[dict, dict]:
        rl, m = self.rl, self.method
        batches, kept_groups, n_gen, n_samples, score_sum = [], 0, 0, 0, 0.0
        while True:
            b = self._gen_batch()
            n_gen += 1
            n_samples += len(b["uid"])
            score_sum += float(b["score"].sum())
            if m.dynamic_sampling:
                score = b["score"].view(-1, rl.n)
                # verl's filter_groups on the reward metric: keep groups with std > 0
                keep_groups = (score.std(1) > 0).nonzero()[:, 0].tolist()
                keep_groups = keep_groups[:rl.prompts_per_step - kept_groups]
                rows = [g * rl.n + j for g in keep_groups for j in range(rl.n)]
                if rows:
                    idx = torch.tensor(rows)
                    batches.append({k: (v[idx] if isinstance(v, torch.Tensor) else [v[i] for i in rows])
                                    for k, v in b.items()})
                kept_groups += len(keep_groups)
                if kept_groups >= rl.prompts_per_step or n_gen >= rl.max_gen_batches:
                    break
            else:
                batches.append(b)
                break
        info = {"gen_batches": n_gen, "samples_generated": n_samples, "score_all": score_sum / max(1, n_samples),
                "kept_group_frac": kept_groups / rl.prompts_per_step if m.dynamic_sampling else 1.0}
        if not batches:
            return {}, info
        batch = {}
        for k in batches[0]:
            if k == "uid":
                batch[k] = [u for bb in batches for u in bb[k]]
            elif k == "prompts":
                batch[k] = torch.cat([bb[k] for bb in batches], 0)
            else:
                fill = 1.0 if k == "temperature" else (self.codec.pad if k == "tokens" else 0.0)
                batch[k] = _pad_cat([bb[k] for bb in batches], fill)
        return batch, info

    # -- rewards and advantages
    def rewards(self, batch: dict) -> torch.Tensor:
        mask = batch["mask"]
        lengths = mask.sum(1).long()
        reward = batch["score"].clone()
        if self.method.overlong_shaping:
            buf = self.task.overlong_buffer
            expected = self.task.max_new_tokens - buf
            reward = reward + torch.clamp(-(lengths - expected).float() / buf, max=0.0)
        tlr = torch.zeros_like(mask)
        tlr[torch.arange(mask.shape[0]), (lengths - 1).clamp_min(0)] = reward
        return tlr * mask

    def advantages(self, batch: dict, token_level_rewards: torch.Tensor, batch_stats: dict) -> torch.Tensor:
        from hapo_verl.integration.estimator import estimator_inputs

        index = np.array(batch["uid"], dtype=object)
        spec = self.estimator_spec
        if spec is not None:
            steps = None
            if RESPONSE_STEPS in self.plan.estimator_needs:  # lines of the responses, as on verl's driver
                from hapo_verl.integration.steps import line_end_tokens, step_ends

                steps = step_ends(batch["tokens"], line_end_tokens(self.codec.tokenizer))
            with estimator_inputs(old_log_prob=batch["old_log_prob"], entropy=batch["entropy"],
                                  batch_stats=batch_stats.get(spec.name), step_ends=steps):
                adv, _ = self.adv_fn(token_level_rewards=token_level_rewards, response_mask=batch["mask"],
                                     index=index, config=self.estimator_config)
        else:
            adv, _ = self.adv_fn(token_level_rewards=token_level_rewards, response_mask=batch["mask"], index=index,
                                 epsilon=1e-6, norm_adv_by_std_in_grpo=True, config=None)
        return adv

    # -- update
    def _forward(self, batch: dict, rows: torch.Tensor):
        from hapo_verl.algorithms.entropy import token_entropy_from_logits

        prompts, tokens = batch["prompts"][rows], batch["tokens"][rows]
        P, L = prompts.shape[1], tokens.shape[1]
        logits = self.model(input_ids=torch.cat([prompts, tokens], 1)).logits[:, P - 1:P + L - 1].float()
        temps = batch["temperature"][rows]
        logp = torch.log_softmax(logits / temps[..., None], -1).gather(-1, tokens[..., None])[..., 0]
        if CURRENT_ENTROPY not in self.loss_needs:  # e.g. only HAPO's fork mode uses the current policy's entropy
            return logp, None
        with torch.no_grad():
            entropy = token_entropy_from_logits(logits.detach())
        return logp, entropy

    def select(self, batch: dict, adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The tokens the update learns from: the mask, or what the enabled selection steps keep (the trainer's
        :func:`~hapo_verl.integration.selection.run_selections`, on the whole batch)."""
        from hapo_verl.algorithms.groups import group_ids_from_index
        from hapo_verl.integration.selection import run_selections

        if not self.plan.selections:
            return batch["mask"], {}
        mask = batch["mask"]
        group_ids = group_ids_from_index(np.array(batch["uid"], dtype=object))
        keep, metrics = run_selections(self.plan.selections, adv.float(), mask.float(), group_ids,
                                       {"entropy": batch["entropy"], "old_log_probs": batch["old_log_prob"]},
                                       step=self.step_index, total_steps=self.rl.steps, lengths=mask.sum(1).long())
        return keep.to(mask.dtype), metrics

    def _loss_entropy(self, batch, rows, cur_entropy):
        if CURRENT_ENTROPY in self.loss_needs:
            return cur_entropy
        return batch["entropy"][rows] if OLD_ENTROPY in self.loss_needs else None

    @torch.no_grad()
    def minibatch_stats(self, batch: dict, rows: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor,
                        batch_stats) -> dict:
        """The mini-batch pass before one mini-batch's update (:mod:`hapo_verl.integration.minibatch`): the spec's
        statistics of every micro-batch at the current policy, combined over the mini-batch."""
        from hapo_verl import registry
        from hapo_verl.integration.minibatch import combine, part_statistics

        spec, options = self.loss_spec, self.loss_options
        forward = spec.minibatch_pass_runs_forward(options)
        parts = []
        for micro in torch.split(torch.arange(len(rows)), self.rl.micro_batch_size):
            sub = rows[micro]
            logp = entropy = None
            if forward:
                logp, entropy = self._forward(batch, sub)
            part = registry.MiniBatchPart(old_log_prob=batch["old_log_prob"][sub], advantages=adv[sub],
                                          response_mask=mask[micro].bool(), log_prob=logp,
                                          entropy=self._loss_entropy(batch, sub, entropy), batch_stats=batch_stats)
            parts.append(part_statistics(spec, options, part))
        return combine(spec, options, parts)

    def update(self, batch: dict, adv: torch.Tensor, batch_stats: dict, update_mask: torch.Tensor) -> dict:
        """``ppo_epochs`` x ``ppo_mini_batches`` optimizer steps on the tokens of ``update_mask``."""
        from hapo_verl.integration.loss import compute_policy_loss, run_loss

        rl, m = self.rl, self.method
        agg = self.config.loss_agg_mode
        B = batch["mask"].shape[0]
        n_mini = max(1, min(rl.ppo_mini_batches, B // rl.n))
        group_order = torch.arange(B)  # verl keeps the batch order (shuffle off): groups stay together
        mini_rows = torch.tensor_split(group_order, n_mini) * rl.ppo_epochs
        n_updates = len(mini_rows)
        # the clip fraction split by old-policy entropy: top 20% of the step's tokens vs the rest, with the
        # method's nominal clip range (for verl's vanilla loss, exactly the tokens it clips)
        valid = batch["mask"].bool()
        high_cut = torch.quantile(batch["entropy"][valid].float(), HIGH_ENTROPY_QUANTILE) if valid.any() else 0.0
        high = (batch["entropy"] >= high_cut) & update_mask.bool()
        low = (~(batch["entropy"] >= high_cut)) & update_mask.bool()
        clipped_high = clipped_low = torch.zeros(())
        metrics = {"pg_clipfrac": 0.0, "pg_loss": 0.0, "grad_norm": 0.0}
        loss_metrics: dict[str, float] = {}
        self.model.train()
        needs_pass = self.loss_spec is not None and MINIBATCH_STATS in self.loss_needs
        stats = batch_stats.get(self.loss_spec.name) if self.loss_spec is not None and BATCH_STATS in self.loss_needs \
            else None
        for rows in mini_rows:
            mask = update_mask[rows]
            old, a = batch["old_log_prob"][rows], adv[rows]
            mb_stats = self.minibatch_stats(batch, rows, mask, adv, stats) if needs_pass else None
            logp, cur_entropy = self._forward(batch, rows)
            mini_tokens, mini_seqs = mask.sum().clamp_min(1), (mask.sum(1) > 0).sum().clamp_min(1)
            loss = torch.zeros(())
            clipfrac = 0.0
            for micro in torch.split(torch.arange(len(rows)), rl.micro_batch_size):
                mm = mask[micro]
                if agg == "token-mean":
                    weight = mm.sum() / mini_tokens
                else:
                    weight = (mm.sum(1) > 0).sum() / mini_seqs
                if self.loss_spec is not None:
                    entropy = self._loss_entropy(batch, rows[micro], None if cur_entropy is None else cur_entropy[micro])
                    part, pm = run_loss(self.loss_spec, self.loss_options, old_log_prob=old[micro],
                                        log_prob=logp[micro], advantages=a[micro], response_mask=mm,
                                        loss_agg_mode=agg, config=self.config, entropy=entropy, batch_stats=stats,
                                        minibatch_stats=mb_stats)
                else:  # verl's own losses (vanilla, clip_cov, kl_cov) through verl's registry
                    part, pm = compute_policy_loss(m.loss_mode, old[micro], logp[micro], a[micro], mm, agg,
                                                   self.config)
                loss = loss + part * weight
                for key, value in pm.items():
                    value = float(value.item() if isinstance(value, torch.Tensor) else value)
                    loss_metrics[key] = loss_metrics.get(key, 0.0) + value * float(weight) / n_updates
                cf = pm.get("actor/pg_clipfrac", 0.0)
                clipfrac += float(cf.item() if isinstance(cf, torch.Tensor) else cf) * float(weight)
            with torch.no_grad():
                ratio = torch.exp(logp.detach() - old)
                outside = ((a > 0) & (ratio > 1 + self.config.clip_ratio_high)) | \
                    ((a < 0) & (ratio < 1 - self.config.clip_ratio_low))
                clipped_high = clipped_high + (outside & high[rows]).sum()
                clipped_low = clipped_low + (outside & low[rows]).sum()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), rl.grad_clip)
            self.opt.step()
            metrics["pg_clipfrac"] += clipfrac / n_updates
            metrics["pg_loss"] += float(loss.detach()) / n_updates
            metrics["grad_norm"] += float(gn) / n_updates
        metrics["clipfrac_high_entropy"] = float(clipped_high) / max(1.0, float(high.sum()) * rl.ppo_epochs)
        metrics["clipfrac_low_entropy"] = float(clipped_low) / max(1.0, float(low.sum()) * rl.ppo_epochs)
        metrics.update({k: v for k, v in loss_metrics.items() if k != "actor/pg_clipfrac"})
        return metrics

    def batch_stats(self, batch: dict) -> dict:
        """The batch statistics of the method's algorithm and, with adaptive temperature, the rollout's entropy
        statistics: each spec's hook once over the whole batch, as the trainer does."""
        from hapo_verl import registry

        hooks = registry.batch_stats_hooks(self.loss_spec, self.loss_options, self.estimator_spec,
                                           self.estimator_options, self.sampling_spec)
        view = registry.OldPolicyBatch(response_mask=batch["mask"], entropy=batch["entropy"],
                                       old_log_prob=batch["old_log_prob"])
        return {spec.name: spec.batch_stats(view, options) for spec, options in hooks}

    def step(self) -> dict:
        from hapo_verl.algorithms.entropy import EntropyStats

        t0 = time.time()
        self.step_index += 1
        batch, info = self.rollout()
        if not batch:
            return {**info, "skipped": 1.0, "step_time": time.time() - t0}
        mask = batch["mask"]
        tlr = self.rewards(batch)
        batch_stats = self.batch_stats(batch)
        adv = self.advantages(batch, tlr, batch_stats)
        update_mask, selected = self.select(batch, adv)
        metrics = self.update(batch, adv, batch_stats, update_mask)
        metrics.update(selected)
        if self.sampling_spec is not None:
            # the next step's sampler uses this step's statistics
            self.prev_stats = EntropyStats.from_dict(batch_stats[self.sampling_spec.name])
        lengths = mask.sum(1)
        temps = batch["temperature"][mask.bool()]
        metrics.update(info)
        metrics.update({
            "score": float(batch["score"].mean()), "reward": float(tlr.sum(1).mean()),
            "response_length": float(lengths.mean()),
            "entropy": float((batch["entropy"] * mask).sum() / mask.sum()),
            "temperature_mean": float(temps.mean()), "temperature_std": float(temps.std()) if temps.numel() > 1 else 0.0,
            "mixed_group_frac": float((batch["score"].view(-1, self.rl.n).std(1) > 0).float().mean()),
            "step_time": time.time() - t0,
        })
        return metrics


def run_fast(model_dir: str, task, method_name: str, seed: int, rl: RLConfig, out_path: str | None = None,
             log=print, stop_after: int | None = None) -> dict:
    """One RL run from the warmed-up checkpoint ``model_dir``; returns (and writes) the run record.
    ``stop_after``: stop after that step (schedules still span ``rl.steps``): how a cell's first evaluation
    interval is rerun to check that it reproduces."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(rl.threads)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    codec = family(task).Codec(tokenizer, task)
    method = fast_settings(method_name)
    run = FastRun(model, codec, method, rl, seed)
    heldout = family(task).heldout_problems(task)
    evals, history = [], []
    start = time.time()
    evals.append({"step": 0, "acc": greedy_accuracy(model, codec, heldout), "time": 0.0})
    log(f"[bench] {method_name} s{seed} step 0 acc {evals[-1]['acc']:.3f}")
    for step in range(1, (stop_after or rl.steps) + 1):
        metrics = run.step()
        metrics["step"] = step
        history.append(metrics)
        if step % rl.eval_every == 0 or step == rl.steps or step == stop_after:
            acc = greedy_accuracy(model, codec, heldout)
            evals.append({"step": step, "acc": acc, "time": round(time.time() - start, 2)})
            recent = history[-rl.eval_every:]
            log(f"[bench] {method_name} s{seed} step {step} acc {acc:.3f} score "
                f"{np.mean([h.get('score', 0) for h in recent]):.3f} ent "
                f"{np.mean([h.get('entropy', 0) for h in recent]):.3f} len "
                f"{np.mean([h.get('response_length', 0) for h in recent]):.2f} "
                f"({time.time() - start:.0f} s)")
    record = {"mode": "fast", "method": method_name, "seed": seed, "task": task.to_dict(), "rl": asdict(rl),
              "method_config": method.describe(), "evals": evals, "history": history,
              "seconds": round(time.time() - start, 2), "model_dir": model_dir}
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, out_path)
    return record
